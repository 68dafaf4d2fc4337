"""Wall time of one small config on the local runtime, Flower's simulation and a loopback deployment.

    .venv/bin/python benchmarks/runtimes.py [--rounds 2] [--skip-deployment]

Prints seconds per runtime (whole run: building the experiment, the rounds, the final
evaluation and export) and the ratio to the local runtime.  The deployment starts its own
flower-superlink and two flower-supernode processes on free 127.0.0.1 ports and stops
them (by PID) at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = [
    "clients.count=4", "clients.per_round=3", "train.local_steps=2", "train.batch_size=4",
    "train.max_length=32", "ranks.values=[2,4,2,8]", "eval.max_examples=32", "eval.final_full=false",
    "data.max_train_examples=120", "data.partition=iid",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(overrides: list[str], out: Path) -> float:
    from fedrank.cli import execute
    from fedrank.config import load_config

    t = time.perf_counter()
    execute(load_config(None, overrides), out)
    return time.perf_counter() - t


def run_deployment(overrides: list[str], work: Path) -> float:
    import psutil

    from fedrank.config import load_config, save_config

    link = free_port()
    home = work / "flwr-home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    cfg_path = work / "small.toml"
    save_config(load_config(None, overrides), cfg_path)
    procs: list[subprocess.Popen] = []
    log = open(work / "flower.log", "w")
    try:
        procs.append(subprocess.Popen(
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
             "--disable-runtime-dependency-installation", "--database", str(work / "link.db")],
            env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT))
        for i in range(2):
            procs.append(subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                 "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=2"],
                env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT))
        while socket.socket().connect_ex(("127.0.0.1", link)) != 0:
            time.sleep(0.2)
        t = time.perf_counter()
        subprocess.run(["flwr", "run", str(ROOT / "deploy" / "flower"), "bench", "--stream", "--run-config",
                        f'config="{cfg_path}" out="{work / "run"}"'],
                       env=env, cwd=work, check=True, capture_output=True, timeout=1800)
        elapsed = time.perf_counter() - t
        if not (work / "run" / "summary.json").is_file():
            raise RuntimeError(f"the deployment run did not finish: see {work / 'flower.log'}")
        return elapsed
    finally:
        family = []
        for p in procs:
            try:
                family += [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                family.append(p.pid)
        for pid in reversed(family):
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
        for pid in family:
            deadline = time.monotonic() + 15
            while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    break
                time.sleep(0.2)


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
