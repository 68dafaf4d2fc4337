"""One federated job, below every front end: build the experiment, run its rounds in a run folder, summarise.

``fedrank run`` and ``fedrank compare`` (``fedrank.cli``), ``compare``'s worker processes (``fedrank.compare``)
and the Flower ServerApp (``fedrank.serverapp``) all run jobs through ``execute``; each reports progress through
its own ``Hooks``.  Heavy modules (torch, the model) are imported when a job runs, not when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedrank.config import Config, save_config
from fedrank.headline import HEADLINES

if TYPE_CHECKING:
    from fedrank.experiment import Experiment
    from fedrank.methods import Task
    from fedrank.runtime import Runtime


def _ignore(_: Any) -> None:
    """A hook that does nothing."""


@dataclass(frozen=True)
class Hooks:
    """What a running job reports: ``start`` (the rounds already done, before the first new round: a resumed
    run's checkpoint), ``client`` (each sampled client's job as it ends), ``round`` (each round's metrics row,
    once it is on disk) and ``log`` (events: rejected updates, missing clients, resuming)."""

    start: Callable[[int], None] = _ignore
    client: Callable[[Task], None] = _ignore
    round: Callable[[dict[str, Any]], None] = _ignore
    log: Callable[[str], None] = print


def execute(cfg: Config, run_dir: Path, hooks: Hooks = Hooks(),
            runtime: Callable[[Experiment], Runtime] | None = None,
            sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Run ``cfg`` in ``run_dir`` (resuming from its checkpoints if any) and return the summary.

    Writes ``config.toml``, builds the experiment, runs the rounds through ``runtime(experiment)`` (default: the
    config's ``runtime``), then writes ``summary.json`` and the adapter.  The runtime is closed whatever happens.
    ``sizes``: node-local data, each client's training examples as its SuperNode reported them (``build``).
    """
    from fedrank.experiment import build
    from fedrank.runtime.registry import make_runtime
    from fedrank.server import RunFiles, Server

    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunFiles(run_dir)
    save_config(cfg, files.config)
    exp = build(cfg, sizes=sizes)
    carrier = runtime(exp) if runtime is not None else make_runtime(cfg.runtime, exp)
    server = Server(exp, carrier, files, on_client=hooks.client, on_round=hooks.round, on_start=hooks.start,
                    log=hooks.log)
    try:
        return server.run()
    finally:
        carrier.close()


def round_line(row: dict[str, Any], cfg: Config) -> str:
    """One line per round: ``round 3/10 · accuracy 0.8120 · 3 clients, 0 missing · 41.2 s`` (the task's
    headline metric, when the round was evaluated; the missing clients by id)."""
    metric = next((f" · {key} {row[key]:.4f}" for key in HEADLINES if key in row), "")
    missing = row["missing"]
    gone = f"{len(missing)} missing {missing}" if missing else "0 missing"
    return (f"round {row['round']}/{cfg.rounds}{metric} · {len(row['clients'])} clients, {gone} · "
            f"{row['wall_s']:.1f} s")
