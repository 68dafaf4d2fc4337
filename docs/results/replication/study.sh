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

# H1-H3 on the quality split (Byun & Lee's setting): 5 seeds, same partitions and ranks per seed.
$F compare $Q --methods replication,zeropad,orderedfold,updatepad,replication+tier,replication+frozen \
  --seeds 0,1,2,3,4 "${CUTS[@]}" --out $OUT/quality --target 0.8 --jobs 2
# H2 (and the default job's rule) on label skew: the default job (Dirichlet alpha=1, ranks 4/16 half and half).
$F compare --methods replication,zeropad,updatepad,orderedfold,replication+frozen --seeds 0,1,2 \
  --set eval.every=2 --set eval.dynamics=true --set threads=1 --out $OUT/dirichlet --target 0.8 --jobs 2
# H4: a larger share of high-rank clients.
$F compare $Q --methods replication,zeropad,updatepad,orderedfold --seeds 0,1,2 "${CUTS[@]}" \
  --set ranks.top_fraction=0.3 --out $OUT/top30 --target 0.8 --jobs 2
# References at one and three times the heterogeneous upload.
$F compare $Q --methods fedit@20,flexlora,fedit@5,fedplora --seeds 0,1,2 "${CUTS[@]}" --out $OUT/quality_refs \
  --target 0.8 --jobs 2
# H4: a smaller learning rate.
$F compare $Q --methods replication,zeropad --seeds 0,1,2 "${CUTS[@]}" --set train.lr=5e-4 --out $OUT/lr5e-4 \
  --target 0.8 --jobs 2
