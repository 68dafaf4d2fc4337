"""Wall time of one small config on the local runtime, Flower's simulation and a loopback deployment.

    .venv/bin/python benchmarks/runtimes.py [--rounds 2] [--skip-deployment]

Prints seconds per runtime (whole run: building the experiment, the rounds, the final
evaluation and export) and the ratio to the local runtime.  The deployment starts its own
flower-superlink and two flower-supernode processes on free 127.0.0.1 ports and stops
them (by PID) at the end (`fedrank.runtime.loopback`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SMALL = [
    "clients.count=4", "clients.per_round=3", "train.local_steps=2", "train.batch_size=4",
    "train.max_length=32", "ranks.values=[2,4,2,8]", "eval.max_examples=32", "eval.final_full=false",
    "data.max_train_examples=120", "data.partition=iid",
]


def run_local(overrides: list[str], out: Path) -> float:
    from fedrank.job import execute
    from fedrank.config import load_config

    t = time.perf_counter()
    execute(load_config(None, overrides), out)
    return time.perf_counter() - t


def run_deployment(overrides: list[str], work: Path) -> float:
    from fedrank.config import load_config, save_config
    from fedrank.runtime.loopback import loopback_deployment

    work.mkdir(parents=True)
    cfg_path = work / "small.toml"
    save_config(load_config(None, overrides), cfg_path)
    with loopback_deployment(work, 2, connection="bench") as dep:
        t = time.perf_counter()
        run = dep.run(cfg_path, work / "run", timeout=1800)
        elapsed = time.perf_counter() - t
        if run.returncode != 0 or not (work / "run" / "summary.json").is_file():
            raise RuntimeError(f"the deployment run did not finish: see {dep.logs}\n{run.stdout}{run.stderr}")
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-deployment", action="store_true")
    args = ap.parse_args()
    overrides = SMALL + [f"rounds={args.rounds}"]
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        times["local"] = run_local(overrides + ["runtime=local"], work / "local")
        times["flower simulation"] = run_local(overrides + ["runtime=flower"], work / "simulation")
        if not args.skip_deployment:
            times["flower deployment (loopback)"] = run_deployment(overrides, work / "deployment")
    print(f"\n{'runtime':<30} {'wall s':>8} {'x local':>8}   ({args.rounds} rounds, {os.cpu_count()} CPUs)")
    for name, t in times.items():
        print(f"{name:<30} {t:8.1f} {t / times['local']:8.2f}")


if __name__ == "__main__":
    main()
