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
  --seeds 0 "${CUTS[@]}" --out $OUT/quality --target 0.8 --jobs 2
$F compare $Q --methods replication,zeropad,updatepad,orderedfold --seeds 0,1,2,3,4 "${CUTS[@]}" \
  --out $OUT/quality --target 0.8 --jobs 2
# H6: who gets the high rank. The same quality policy, but after round 1 the data-rich (balanced, high-quality)
# clients are raised instead of the best local validation scores.
$F compare $Q --methods replication,zeropad --seeds 0,1,2 "${CUTS[@]}" --set ranks.quality_by=size \
  --out $OUT/quality_by_size --target 0.8 --jobs 2
# The default job's setting (Dirichlet alpha=1 label skew, ranks 4/16 half and half), for the default rule.
$F compare --methods replication,zeropad,flexlora --seeds 0 \
  --set eval.every=2 --set eval.dynamics=true --set threads=1 --out $OUT/dirichlet --target 0.8 --jobs 2
