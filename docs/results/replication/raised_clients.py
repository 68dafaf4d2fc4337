"""Which clients the quality policy raised to rank 20 in each replication run of the study, and what they hold.

Run from the repository root: .venv/bin/python docs/results/replication/raised_clients.py
(output: raised_clients.txt). The policy's per-client ranks come from each run's last checkpoint manifest.
"""

import collections
import json
from pathlib import Path

from fedrank.config import load_config
from fedrank.data.partition import partition
from fedrank.tasks import make_task

RUNS = Path(__file__).parent / "quality" / "runs"

for seed in range(5):
    run = RUNS / f"replication-seed{seed}"
    cfg = load_config(run / "config.toml")
    manifest = sorted((run / "checkpoints").glob("round-*.json"))[-1]
    ranks = json.loads(manifest.read_text())["meta"]["policy"]["ranks"]
    splits = make_task(cfg).load_data()
    shards = partition(splits.train.labels, cfg.clients.count, cfg.data, cfg.seed)
    labels = [collections.Counter(splits.train.labels[i] for i in shard) for shard in shards]
    raised = [c for c, r in enumerate(ranks) if r == max(cfg.ranks.values)]
    data_rich = sorted(range(cfg.clients.count), key=lambda c: -len(shards[c]))[:len(raised)]
    held = sum((labels[c] for c in raised), collections.Counter())
    print(f"seed {seed}: raised {raised}; their label counts {[len(labels[c]) for c in raised]}; "
          f"balanced data-rich clients raised: {len(set(raised) & set(data_rich))}/{len(raised)}; "
          f"labels held by raised clients: {dict(held)}")
