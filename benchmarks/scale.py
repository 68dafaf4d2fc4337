"""Scale: peak memory and time per round with 10 vs 1,000 registered clients at the same clients per round.

Each setting runs in its own process so peak RSS (``ru_maxrss``) belongs to it alone. IID shards: a
Dirichlet split of 7.7k BBC paragraphs cannot give 1,000 clients one example each.

    python benchmarks/scale.py [--counts 10 1000] [--per-round 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(count: int, per_round: int, rounds: int) -> dict[str, float]:
    from fedrank.job import execute
    from fedrank.config import load_config

    cfg = load_config(None, [f"clients.count={count}", f"clients.per_round={per_round}", f"rounds={rounds}",
                             "ranks.values=[4,16]", "eval.final_full=false", "clients.val_fraction=0.0",
                             "data.partition=iid"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        execute(cfg, Path(tmp))
        total = time.perf_counter() - start
        rows = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return {"clients": count, "round_s": sum(r["wall_s"] for r in rows) / len(rows), "run_s": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.child, args.per_round, args.rounds)))
        return
    print(f"{'clients':>8}{'s / round':>12}{'whole run s':>13}{'peak RSS MB':>13}")
    for count in args.counts:
        out = subprocess.run([sys.executable, __file__, "--child", str(count), "--per-round", str(args.per_round),
                              "--rounds", str(args.rounds)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['clients']:>8}{r['round_s']:>12.1f}{r['run_s']:>13.1f}{r['peak_rss_mb']:>13.0f}")


if __name__ == "__main__":
    main()
