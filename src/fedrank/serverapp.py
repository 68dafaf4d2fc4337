"""The Flower ServerApp of a deployment (``flwr run deploy/flower``): one fedrank job through a ``FlowerRuntime``.

The run config (``deploy/flower/pyproject.toml``, ``flwr run ... --run-config``): ``config`` (a fedrank TOML path;
``""`` = the defaults), ``out`` (the run folder, required; a folder with checkpoints resumes), ``set`` (overrides
separated by ``;``), ``timeout-s`` (how long a round waits for replies; 0 = the config's ``runtime_timeout_s``) and
``wait-nodes-s`` (how long the start waits for all ``num-partitions`` SuperNodes, or with node-local data for
``clients.count`` of them; 0 = as long as a round).

Node-local data (``data.dataset = "nodes"``): the SuperNodes enrol before the job is built, each with its own data
file; the run folder's ``nodes.json`` keeps what the server knows of those files.

Its lines (one per round, the runtime's events, the final line) start with ``fedrank:`` and go to the ServerApp's
standard output, which Flower streams to ``flwr run --stream`` and keeps for ``flwr log <run-id>``.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrank.config import ConfigError, load_config
from fedrank.headline import final_line
from fedrank.job import Hooks, execute, round_line
from fedrank.checkpoint import atomic_write
from fedrank.runtime.flower import FlowerRuntime, NodeShard
from fedrank.server import RunFiles

server_app = ServerApp()


def say(line: str) -> None:
    """One ``fedrank:`` line on the ServerApp's output, at once (Flower forwards it to ``flwr run --stream``)."""
    print(f"fedrank: {line}", flush=True)


def _positive(value: object) -> float | None:
    """A run-config number of seconds; ``None`` for 0 (or unset): the default applies."""
    seconds = float(value or 0)
    return seconds if seconds > 0 else None


def record_enrolment(run_dir: Path, shards: list[NodeShard]) -> None:
    """Node-local data: keep what the server knows of the clients' files in the run folder (``nodes.json``, in
    client order); resuming, check that the same files enrolled, since they fix the client ids."""
    path = RunFiles(run_dir).nodes
    now = [shard.known() for shard in shards]
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(now, indent=2).encode())
        return
    before = json.loads(path.read_text())
    if [n["fingerprint"] for n in now] != [n["fingerprint"] for n in before]:
        raise ConfigError(f"resuming {run_dir}: the nodes that enrolled ({[n['name'] for n in now]}) are not those of "
                          f"its start ({[n['name'] for n in before]}, {path}): start the missing ones with their "
                          "files, or run into a new folder")


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
    if sizes is not None:
        record_enrolment(Path(out), runtime.enrolled)
    hooks = Hooks(round=lambda row: say(round_line(row, runtime.cfg)), log=say)
    summary = execute(runtime.cfg, Path(out), hooks, lambda exp: runtime, sizes)
    say(f"{final_line(summary)}; outputs in {out}")
