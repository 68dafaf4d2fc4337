"""The Flower ServerApp of a deployment (``flwr run deploy/flower``): one fedrank job through a ``FlowerRuntime``.

The run config (``deploy/flower/pyproject.toml``, ``flwr run ... --run-config``): ``config`` (a fedrank TOML path;
``""`` = the defaults), ``out`` (the run folder, required; a folder with checkpoints resumes), ``set`` (overrides
separated by ``;``), ``timeout-s`` (how long a round waits for replies; 0 = the config's ``runtime_timeout_s``) and
``wait-nodes-s`` (how long the start waits for all ``num-partitions`` SuperNodes; 0 = as long as a round).

Its lines (one per round, the runtime's events, the final line) start with ``fedrank:`` and go to the ServerApp's
standard output, which Flower streams to ``flwr run --stream`` and keeps for ``flwr log <run-id>``.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrank.config import ConfigError, load_config
from fedrank.headline import final_line
from fedrank.job import Hooks, execute, round_line
from fedrank.runtime.flower import FlowerRuntime

server_app = ServerApp()


def say(line: str) -> None:
    """One ``fedrank:`` line on the ServerApp's output, at once (Flower forwards it to ``flwr run --stream``)."""
    print(f"fedrank: {line}", flush=True)


def _positive(value: object) -> float | None:
    """A run-config number of seconds; ``None`` for 0 (or unset): the default applies."""
    seconds = float(value or 0)
    return seconds if seconds > 0 else None


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    """Run the job the run config describes; log one line per round and the final line."""
    rc = context.run_config
    path, out = str(rc.get("config", "")), str(rc.get("out", ""))
    if not out:
        raise ConfigError("flower: pass the run folder: flwr run ... --run-config 'out=\"/abs/run\"'")
    cfg = load_config(path or None, [s for s in str(rc.get("set", "")).split(";") if s.strip()])
    runtime = FlowerRuntime(grid, cfg, timeout_s=_positive(rc.get("timeout-s")),
                            wait_nodes_s=_positive(rc.get("wait-nodes-s")), log=say)
    sizes = runtime.node_sizes()  # node-local data: the nodes enrol first; runtime.cfg has their number
    hooks = Hooks(round=lambda row: say(round_line(row, runtime.cfg)), log=say)
    summary = execute(runtime.cfg, Path(out), hooks, lambda exp: runtime, sizes)
    say(f"{final_line(summary)}; outputs in {out}")
