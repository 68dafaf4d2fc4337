"""Wall time of one config on the local runtime, Flower's simulation and a loopback deployment, and the fixed
cost a Flower ClientApp pays per message.

    .venv/bin/python benchmarks/runtimes.py [--job small|default] [--rounds 2] [--nodes 2 4]
                                            [--skip-simulation] [--skip-deployment] [--skip-runs]

Per message (Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message), measured in fresh
processes for node 0 of ``--nodes``' first value: ``import`` (fedrank's client path: flwr, torch, transformers,
PEFT), ``build`` (the node's clients' data) and ``load`` (base model, adapters, method), for the first message
of a run (empty shard cache: the dataset is loaded, partitioned and the node's clients tokenised) and for a later
one (cache hit), beside what a message built before the shard cache (the whole experiment: every client and the
test split, and the imports of the partitioners).  And what the deployment's ClientApp (``fedrank.node_app``) pays
once its node's warm worker runs: its imports (flwr) and, as "load", one message's round trip to the worker, which
already holds the model and the data.

Runs: seconds per runtime (building the experiment, the rounds, the final evaluation and export) and the ratio to
the local runtime; the deployment starts its own flower-superlink and ``--nodes`` flower-supernode processes on
free 127.0.0.1 ports and stops them (by PID) at the end (``fedrank.runtime.loopback``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = [
    "clients.count=4", "clients.per_round=3", "train.local_steps=2", "train.batch_size=4",
    "train.max_length=32", "ranks.values=[2,4,2,8]", "eval.max_examples=32", "eval.final_full=false",
    "data.max_train_examples=120", "data.partition=iid",
]
JOBS = {"small": SMALL, "default": []}


def probe(mode: str, config: Path, clients: list[int]) -> None:
    """In this (fresh) process, what a ClientApp does for one message; print the seconds per phase as JSON.

    ``mode``: ``node`` (the client path in the ClientApp's own process), ``whole`` (the whole experiment, as every
    message built it before) or ``warm`` (the deployment's ClientApp handing the message to its node's worker)."""
    t0 = time.perf_counter()
    if mode == "warm":
        warm_message(config, t0)
        return
    import fedrank.experiment  # noqa: F401 - the ClientApp's imports
    import fedrank.runtime.flower  # noqa: F401
    if mode == "whole":
        import fedrank.data.partition  # noqa: F401 - imported with the client path before
    from fedrank.config import load_config
    from fedrank.experiment import build, build_node_client

    laps = {"import": time.perf_counter() - t0}
    last = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        laps[phase], last[0] = now - last[0], now

    cfg = load_config(config)
    if mode == "node":
        build_node_client(cfg, clients, lap)
    else:
        build(cfg, lap)
    print(json.dumps({"import": laps["import"], "build": laps["labels"] + laps["data"],
                      "load": laps["model"] + laps["client"]}))


def warm_message(config: Path, t0: float) -> None:
    """The deployment's ClientApp (``fedrank.node_app``) with its node's worker running: its imports, then one
    message's round trip to the worker, which holds the model and the data (``$BENCH_WATCH_PID``: the worker's
    SuperNode stand-in)."""
    from flwr.app import ConfigRecord, RecordDict

    from fedrank import node_app

    imported = time.perf_counter()
    text = config.read_text()
    content = RecordDict({"task": ConfigRecord({"client": 0, "rank": 1, "round": 1, "config": text})})
    with node_app.worker_connection(int(os.environ["BENCH_WATCH_PID"]), 600) as conn:
        node_app.ask(conn, "query.partition", content, {})
    print(json.dumps({"import": imported - t0, "build": 0.0, "load": time.perf_counter() - imported}))


def per_message(config: Path, count: int, nodes: int, cache: Path) -> dict[str, dict[str, float]]:
    """Seconds per phase of one message in a fresh process: first (empty cache), later (cache hit), before."""
    clients = ",".join(str(c) for c in range(0, count, nodes))  # node 0's clients
    env = {**os.environ, "FEDRANK_CACHE": str(cache)}

    def run(mode: str) -> dict[str, float]:
        # output to a file, not a pipe: the warm worker a probe starts inherits it and outlives the probe
        with tempfile.TemporaryFile("w+") as out:
            subprocess.run([sys.executable, __file__, "--probe", mode, str(config), clients], env=env, stdout=out,
                           check=True)
            out.seek(0)
            return json.loads(out.read().strip().splitlines()[-1])

    costs = {"first message (cache miss)": run("node"), "later message (cache hit)": run("node"),
             "before: whole experiment": run("whole")}
    watch = subprocess.Popen(["sleep", "3600"])  # the worker lives as long as this stand-in for its SuperNode
    env["BENCH_WATCH_PID"] = str(watch.pid)
    try:
        run("warm")  # starts the worker
        costs["later message, warm worker"] = run("warm")
    finally:
        watch.kill()
        watch.wait()
    return costs


def phases(out: Path, wall: float) -> dict[str, float]:
    """Where a run's wall time went: the rounds' training (send, local training, replies, aggregation), their
    evaluations, and the rest (start-up: processes, the experiment and model; the final evaluation and export)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = sum(r["train_s"] + r["aggregate_s"] for r in rows)
    evaluation = sum(r["eval_s"] for r in rows)
    return {"wall": wall, "train": train, "eval": evaluation, "rest": wall - train - evaluation}


def run_local(overrides: list[str], out: Path) -> dict[str, float]:
    from fedrank.config import load_config
    from fedrank.job import execute

    t = time.perf_counter()
    execute(load_config(None, overrides), out)
    return phases(out, time.perf_counter() - t)


def run_deployment(config: Path, work: Path, nodes: int) -> dict[str, float]:
    from fedrank.runtime.loopback import loopback_deployment

    with loopback_deployment(work, nodes, connection="bench") as dep:
        t = time.perf_counter()
        run = dep.run(config, work / "run", timeout=3600)
        elapsed = time.perf_counter() - t
        if run.returncode != 0 or not (work / "run" / "summary.json").is_file():
            raise RuntimeError(f"the deployment run did not finish: see {dep.logs}\n{run.stdout}{run.stderr}")
        return phases(work / "run", elapsed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", choices=list(JOBS), default="small", help="small (tiny, the default) or the default job")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nodes", type=int, nargs="+", default=[2], help="SuperNodes of the loopback deployment(s)")
    ap.add_argument("--skip-simulation", action="store_true")
    ap.add_argument("--skip-deployment", action="store_true")
    ap.add_argument("--skip-runs", action="store_true", help="only the per-message cost")
    ap.add_argument("--probe", nargs=3, metavar=("MODE", "CONFIG", "CLIENTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        mode, config, clients = args.probe
        probe(mode, Path(config), [int(c) for c in clients.split(",")])
        return
    from fedrank.config import load_config, save_config

    overrides = JOBS[args.job] + [f"rounds={args.rounds}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "job.toml"
        cfg = load_config(None, overrides)
        save_config(cfg, config)
        costs = per_message(config, cfg.clients.count, args.nodes[0], work / "cache")
        print(f"\nper-message fixed cost of a ClientApp, s ({args.job} job, node 0 of {args.nodes[0]}, "
              f"{os.cpu_count()} CPUs)")
        print(f"{'':<30} {'import':>8} {'build':>8} {'load':>8} {'total':>8}")
        for name, c in costs.items():
            print(f"{name:<30} {c['import']:8.2f} {c['build']:8.2f} {c['load']:8.2f} {sum(c.values()):8.2f}")
        if args.skip_runs:
            return
        times = {"local": run_local(overrides + ["runtime=local"], work / "local")}
        if not args.skip_simulation:
            times["flower simulation"] = run_local(overrides + ["runtime=flower"], work / "simulation")
        if not args.skip_deployment:
            for n in args.nodes:
                times[f"loopback deployment, {n} nodes"] = run_deployment(config, work / f"deployment{n}", n)
    print(f"\n{'runtime':<32} {'wall s':>8} {'x local':>8} {'train s':>8} {'eval s':>8} {'rest s':>8}"
          f"   ({args.job} job, {args.rounds} rounds; train: the rounds' messages, training and aggregation; "
          "rest: start-up, final evaluation, export)")
    for name, t in times.items():
        print(f"{name:<32} {t['wall']:8.1f} {t['wall'] / times['local']['wall']:8.2f} {t['train']:8.1f} "
              f"{t['eval']:8.1f} {t['rest']:8.1f}")


if __name__ == "__main__":
    main()
