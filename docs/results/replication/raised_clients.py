"""Which clients the quality policy raised to rank 20 in each replication run of a study folder, and what they hold.

Run from the repository root: .venv/bin/python docs/results/replication/raised_clients.py [FOLDER]
(FOLDER: quality, the default, output raised_clients.txt; h4_top30, output raised_clients_top30.txt). The policy's
per-client ranks come from each run's last checkpoint manifest; "balanced" clients hold every label.
"""

import collections
import json
import sys
from pathlib import Path

from fedrank.config import load_config
from fedrank.data.partition import partition
from fedrank.tasks import make_task

RUNS = Path(__file__).parent / (sys.argv[1] if len(sys.argv) > 1 else "quality") / "runs"

for run in sorted(RUNS.glob("replication-seed*")):
    seed = int(run.name.removeprefix("replication-seed"))
    cfg = load_config(run / "config.toml")
    manifest = sorted((run / "checkpoints").glob("round-*.json"))[-1]
    ranks = json.loads(manifest.read_text())["meta"]["policy"]["ranks"]
    splits = make_task(cfg).load_data()
    shards = partition(splits.train.labels, cfg.clients.count, cfg.data, cfg.seed)
    labels = [collections.Counter(splits.train.labels[i] for i in shard) for shard in shards]
    raised = [c for c, r in enumerate(ranks) if r == max(cfg.ranks.values)]
    balanced = {c for c in range(cfg.clients.count) if len(labels[c]) == len(splits.train.label_names)}
    held = sum((labels[c] for c in raised), collections.Counter())
    print(f"seed {seed}: raised {raised}; their label counts {[len(labels[c]) for c in raised]}; "
          f"balanced clients raised: {len(set(raised) & balanced)}/{len(balanced)}; "
          f"labels held by raised clients: {dict(held)}")
