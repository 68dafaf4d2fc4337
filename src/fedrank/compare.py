"""Side-by-side runs: every method on the same partitions, rank assignment and seeds."""

from __future__ import annotations

import multiprocessing
import os
import re
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fedrank.config import Config, ConfigError, load_config, to_dict
from fedrank.heads import HEAD_RULES
from fedrank.job import execute
from fedrank.methods import METHODS
from fedrank.server import RunFiles

_VARIANT = re.compile(r"^(?P<method>[a-z]+)(@(?P<rank>\d+))?(\+(?P<head>[a-z]+))?$")


@dataclass(frozen=True)
class PlannedRun:
    label: str
    seed: int
    cfg: Config
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / "summary.json").is_file()

    @property
    def rounds_done(self) -> int:
        """Rounds recorded in the run's metrics.jsonl so far (how far a run in another process has got)."""
        return len(RunFiles(self.folder).read_metrics())


def method_overrides(spec: str) -> list[str]:
    """``replication`` → method only; ``fedit@5`` → every client at rank 5; ``replication+tier`` → that
    method with ``server.head=tier``."""
    match = _VARIANT.match(spec.strip())
    if not match or match["method"] not in METHODS or (match["head"] and match["head"] not in HEAD_RULES):
        raise ConfigError(f"`{spec}` is not a method: use one of {', '.join(METHODS)}, optionally with @RANK "
                          f"(fedit@5 runs every client at rank 5) and +HEAD, one of {', '.join(HEAD_RULES)} "
                          "(replication+tier)")
    out = [f"method={match['method']}"]
    if match["rank"]:
        out += ["ranks.policy=fixed", f"ranks.values=[{match['rank']}]", "ranks.fractions=[]"]
    if match["head"]:
        out.append(f"server.head={match['head']}")
    return out


def plan(config: Path | None, methods: list[str], seeds: list[int], overrides: list[str], out: Path) -> list[PlannedRun]:
    """One run per (seed, method); identical configs apart from the method (and rank for ``@R`` variants)."""
    if not methods or not seeds:
        raise ConfigError("give at least one method (--methods a,b) and one seed (--seeds 0,1)")
    runs = []
    for seed in seeds:  # seed-major: every method has a result as early as possible
        for spec in methods:
            cfg = load_config(config, overrides + method_overrides(spec) + [f"seed={seed}"])
            folder = out / "runs" / f"{spec.strip()}-seed{seed}"
            saved = folder / "config.toml"
            if saved.is_file() and to_dict(load_config(saved)) != to_dict(cfg):
                raise ConfigError(f"{folder} holds a run with another config: use a new --out or delete that folder")
            runs.append(PlannedRun(spec.strip(), seed, cfg, folder))
    return runs


def _run_in_worker(cfg: Config, folder: Path, threads: int) -> None:
    import torch

    if not cfg.threads:  # the config leaves threads to torch: share the cores between the parallel runs
        torch.set_num_threads(threads)
    execute(cfg, folder)


def run_parallel(runs: list[PlannedRun], jobs: int, on_progress: Callable[[int], None]) -> None:
    """Run the unfinished runs, ``jobs`` at a time, each in its own (spawned) process.

    ``on_progress`` gets the total number of rounds recorded across ``runs`` every couple of seconds.
    The first failure stops new runs from starting; the ones already running finish (their checkpoints
    stay), then the error is raised.
    """
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = [r for r in runs if not r.finished]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: set[Future[None]] = {pool.submit(_run_in_worker, r.cfg, r.folder, threads) for r in todo}
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_EXCEPTION)
            on_progress(sum(r.rounds_done for r in runs))
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:
                for future in pending:
                    future.cancel()
                wait(pending)
                raise failed.exception()  # type: ignore[misc]
