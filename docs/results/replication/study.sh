#!/usr/bin/env bash
# The replication study (docs/results/replication/README.md): every command, in the order it ran.
# Rerunning resumes: compare skips finished runs and resumes unfinished ones from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../../.."
F=.venv/bin/fedrank
OUT=docs/results/replication
# The cuts, the same for every arm: 10 of the config's 20 rounds; 4 local steps of 8 paragraphs of 48 tokens
# (as the earlier bbc_hetero study); the per-round evaluation on 200 test paragraphs every 2nd round; 1 thread.
CUTS=(--set rounds=10 --set train.local_steps=4 --set train.batch_size=8 --set train.max_length=48
      --set eval.max_examples=200 --set eval.every=2 --set eval.dynamics=true --set threads=1)
Q=configs/bbc_hetero.toml

# H1-H3 on the quality split (Byun & Lee's setting), same partitions and ranks per seed. The head rules ran on
# seed 0 only (the CPU budget went to 5 seeds of the four padding rules).
$F compare $Q --methods replication,zeropad,orderedfold,updatepad,replication+tier,replication+frozen \
  --seeds 0 "${CUTS[@]}" --out $OUT/quality --target 0.6 --jobs 2
$F compare $Q --methods replication,zeropad,updatepad,orderedfold --seeds 0,1,2,3,4 "${CUTS[@]}" \
  --out $OUT/quality --target 0.6 --jobs 2
# H6: who gets the high rank. The same quality policy, but after round 1 the data-rich (balanced, high-quality)
# clients are raised instead of the best local validation scores.
$F compare $Q --methods replication,zeropad --seeds 0,1,2 "${CUTS[@]}" --set ranks.quality_by=size \
  --out $OUT/quality_by_size --target 0.6 --baseline zeropad --jobs 2
# The references at the same budget: fedit@5 (seed 0: identical to zeropad), fedit@20 and FlexLoRA (5 seeds),
# Fed-PLoRA (seed 0).
$F compare $Q --methods fedit@5,fedit@20,flexlora,fedplora --seeds 0 "${CUTS[@]}" --out $OUT/quality --target 0.6 --jobs 2
$F compare $Q --methods fedit@20,flexlora --seeds 1,2,3,4 "${CUTS[@]}" --out $OUT/quality --target 0.6 --jobs 2
# H6 on seeds 3 and 4.
$F compare $Q --methods replication,zeropad --seeds 3,4 "${CUTS[@]}" --set ranks.quality_by=size \
  --out $OUT/quality_by_size --target 0.6 --baseline zeropad --jobs 2
# H4: one change at a time against the base setting (lr 1e-3, top 10% at rank 20, 4 local steps), seeds 0-2.
h4 () { $F compare $Q --methods replication,zeropad --seeds $1 "${CUTS[@]}" --set $2 --out $OUT/$3 --target 0.6 \
          --baseline zeropad --jobs 2; }
h4 0,1,2 train.lr=5e-4 h4_lr5e-4
h4 0,1,2,3,4 ranks.top_fraction=0.3 h4_top30
h4 0,1,2,3,4 train.lr=2e-3 h4_lr2e-3
h4 0,1,2 train.local_epochs=1 h4_epoch
.venv/bin/python $OUT/h4_gap.py
.venv/bin/python $OUT/raised_clients.py > $OUT/raised_clients.txt
.venv/bin/python $OUT/raised_clients.py h4_top30 > $OUT/raised_clients_top30.txt
# H2's head rules on the default job's Dirichlet label skew (20 clients, ranks 4/16 from round 1), seeds 0-1, one
# thread per run, the global model evaluated every 2nd round (the final accuracy on the whole test split).
$F compare --methods replication,replication+tier,replication+frozen --seeds 0,1 --set threads=1 --set eval.every=2 \
  --out $OUT/default_job_heads --target 0.85 --baseline replication --jobs 2
# H2's head refit (linear probe on training features) of the final models, 5 seeds.
$F report $OUT/quality/runs/{replication,zeropad,updatepad}-seed{0,1,2,3,4} --head-refit 1000 \
  --out $OUT/quality/head_refit --baseline zeropad --target 0.6
# Reports as committed (paired against zeropad; and against replication).
$F report $OUT/quality/runs/* --out $OUT/quality --target 0.6 --baseline zeropad
$F report $OUT/quality/runs/{replication,zeropad,updatepad,orderedfold}-seed* --out $OUT/quality/vs_replication \
  --target 0.6 --baseline replication
