"""The Flower runtime: wire codec, faults, and parity with the local runtime (simulation, loopback deployment)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import torch

pytest.importorskip("flwr")

from fedrank.config import load_config, save_config  # noqa: E402
from fedrank.headline import final_line  # noqa: E402
from fedrank.job import Hooks, execute, round_line  # noqa: E402
from fedrank.methods import Task  # noqa: E402
from fedrank.runtime import flower, loopback  # noqa: E402
from fedrank.server import RunFiles, Server, sample_clients  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from closeness import assert_same_metrics, assert_same_model  # noqa: E402
from test_run import EVAL_EXAMPLES, TINY, adapter, assert_identical_runs, metrics, untimed  # noqa: E402


# Waits of the deployment tests: only a hung deployment ever uses them up, so they are generous (a loaded
# machine starts Flower's processes slowly); the SuperNodes get a round's timeout to answer.
DEPLOY_WAIT_S = 300.0
DEPLOY_RUN_CONFIG = f"timeout-s={DEPLOY_WAIT_S} wait-nodes-s={DEPLOY_WAIT_S}"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local")
    execute(load_config(None, TINY), out)
    return out


def assert_same_run(a: Path, b: Path, exact: bool) -> None:
    """Two runs of the same config: bit for bit (``exact``: the same code path, deterministic), or else the same
    model and metrics to the tolerances of ``closeness`` (Ray's actors may use other fp32 kernels)."""
    ra, rb = untimed(metrics(a)), untimed(metrics(b))
    assert len(ra) == len(rb) == 2
    if exact:
        assert_identical_runs(a, b)
    else:
        assert_same_metrics(ra, rb, EVAL_EXAMPLES)
        assert_same_model(adapter(a), adapter(b))


# --------------------------------------------------------------------------- codec


def test_codec_round_trips_tensors_and_tasks() -> None:
    tensors = {"layer.0#A": torch.randn(3, 5), "layer.0#B": torch.randn(7, 3).t().t(),
               "idx": torch.tensor([2, 0, 1]), "head.weight": torch.randn(4, 6)[:, ::2]}
    back = flower.from_record(flower.to_record(tensors))
    assert list(back) == list(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])
    cfg = load_config(None, TINY)
    rec = flower.task_record(Task(3, 8, 2), flower.config_text(cfg))
    assert flower.record_task(rec) == Task(3, 8, 2)
    assert flower.config_from_text(str(rec["config"])) == cfg


# --------------------------------------------------------------------------- faults (in-process grid)


class ThreadGrid:
    """A Grid stand-in that runs fedrank's ClientApp in threads: ``nodes`` partitions (or one node per node config
    of a list, node ids 1000, 1001, ...), no Ray, no sockets.

    ``workers`` threads handle messages, so a hanging client does not hold up the others; ``app``: the ClientApp.
    """

    def __init__(self, nodes: int | list[dict], workers: int = 8, app=flower.client_app) -> None:
        from flwr.app import RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # what a SuperLink / the simulation sets for a ServerApp before it creates messages
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        configs = nodes if isinstance(nodes, list) else [{"partition-id": i, "num-partitions": nodes}
                                                         for i in range(nodes)]
        self.contexts = {1000 + i: self._context(1000 + i, config) for i, config in enumerate(configs)}
        self.pool = ThreadPoolExecutor(workers)
        self.app = app
        self.replies: dict[str, object] = {}
        self.lock = threading.Lock()

    @staticmethod
    def _context(node: int, node_config: dict):
        from flwr.app import Context, RecordDict

        return Context(run_id=1, node_id=node, state=RecordDict(), run_config={}, node_config=node_config)

    def restart(self, node: int) -> int:
        """The node comes back under a new node id with the same node config (a restarted SuperNode without an
        auth key); its new id."""
        new = max(self.contexts) + 1
        self.contexts[new] = self._context(new, self.contexts.pop(node).node_config)
        return new

    def get_node_ids(self):
        return list(self.contexts)

    def _handle(self, mid: str, msg) -> None:
        try:
            if msg.metadata.dst_node_id not in self.contexts:
                raise RuntimeError("Node Unavailable")
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - becomes an error reply, as in Flower
            from flwr.app import Error, Message

            reply = Message(Error(code=0, reason=str(err)), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        with self.lock:
            self.replies[mid] = reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self.pool.submit(self._handle, mid, msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        with self.lock:
            return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        ids = set(self.push_messages(messages))
        out, end = [], time.monotonic() + (timeout or 1e9)
        while ids and time.monotonic() < end:
            got = self.pull_messages(ids)
            ids -= {m.metadata.reply_to_message_id for m in got}
            out += got
            time.sleep(0.01)
        return out


@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_a_failing_or_hanging_client_is_missing_and_the_run_goes_on(fault: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1's first client fails, or hangs until the run is over; the round closes after its timeout
    without it, and round 2 goes on with every client."""
    from fedrank.experiment import build

    cfg = load_config(None, TINY + ["train.local_steps=1", "eval.tiers=false", "clients.per_round=2"])
    exp = build(cfg)
    first = sample_clients(cfg.seed, 1, cfg.clients.count, cfg.clients.per_round)[0]
    # the clients' experiment is built before any round's clock starts, and the round timeout is a multiple of
    # that build: a healthy client (one local step) finishes well inside it however loaded the machine is
    started = time.monotonic()
    flower.cached_client(flower.config_text(cfg))
    timeout_s = max(5.0, 5 * (time.monotonic() - started))
    release = threading.Event()
    if fault == "hang":  # hangs until released at the end of the test, so no timeout can be too short for it
        monkeypatch.setattr(flower, "_maybe_fault",
                            lambda task: release.wait() if (task.client, task.round) == (first, 1) else None)
    else:
        monkeypatch.setenv(flower.FAULT_ENV, f"fail:{first}:1")
    logs: list[str] = []
    grid = ThreadGrid(2)
    runtime = flower.FlowerRuntime(grid, cfg, timeout_s=timeout_s, log=logs.append)
    try:
        files = RunFiles(tmp_path)
        save_config(cfg, files.config)
        Server(exp, runtime, files, log=logs.append).run()
    finally:
        release.set()
        grid.pool.shutdown(wait=True)
    rows = metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["missing"] == [first] and rows[1]["missing"] == []
    assert any(f"client {first}" in line for line in logs)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_a_node_back_under_a_new_node_id_serves_its_partition_again(tmp_path: Path) -> None:
    """A SuperNode restarted without an auth key registers under a new node id: the runtime asks the new node what
    it serves and sends that partition's clients there; no round misses a client."""
    cfg = load_config(None, TINY + ["train.local_steps=1", "eval.tiers=false"])
    grid, logs, moved = ThreadGrid(2), [], []
    runtime = flower.FlowerRuntime(grid, cfg, timeout_s=DEPLOY_WAIT_S, log=logs.append)

    def restart_node_1(row: dict) -> None:
        if row["round"] == 1:
            moved.append(grid.restart(1001))

    try:
        execute(cfg, tmp_path, Hooks(round=restart_node_1, log=logs.append), lambda exp: runtime)
    finally:
        grid.pool.shutdown(wait=True)
    assert [r["missing"] for r in metrics(tmp_path)] == [[], []]
    assert logs == [f"flower: node {moved[0]} serves partition 1 now"]


def test_the_deployment_client_app_with_warm_false_answers_in_its_own_process(local_run: Path, tmp_path: Path) -> None:
    """``fedrank.node_app`` with ``warm=false`` in the node config runs the client in the ClientApp's process (no
    worker): the run equals the local one bit for bit."""
    from fedrank import node_app

    cfg = load_config(None, TINY)
    grid = ThreadGrid([{"partition-id": i, "num-partitions": 2, "warm": "false"} for i in range(2)],
                      app=node_app.client_app)
    try:
        execute(cfg, tmp_path, Hooks(), lambda exp: flower.FlowerRuntime(grid, cfg, timeout_s=DEPLOY_WAIT_S))
    finally:
        grid.pool.shutdown(wait=True)
    assert_same_run(local_run, tmp_path, exact=True)
    assert not node_app.socket_path(os.getppid()).exists()  # no worker was started


# --------------------------------------------------------------------------- simulation


def test_simulation_from_fedrank_run_matches_local(local_run: Path, tmp_path: Path) -> None:
    execute(load_config(None, TINY + ["runtime=flower"]), tmp_path)
    # another process under Ray: its fp32 kernels may round differently from this one's
    assert_same_run(local_run, tmp_path, exact=False)
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "checkpoints").is_dir()


# --------------------------------------------------------------------------- loopback deployment


@pytest.mark.skipif(not loopback.binaries_available(),
                    reason="Flower deployment binaries (flower-superlink, flower-supernode, flwr) are not installed")
def test_loopback_deployment_matches_local(local_run: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.pop(flower.FAULT_ENV, None)
    cfg_path, out = tmp_path / "tiny.toml", tmp_path / "run"
    save_config(load_config(None, TINY), cfg_path)
    env.pop("OMP_NUM_THREADS", None)
    with loopback.loopback_deployment(tmp_path, 2, env=env, start_timeout=DEPLOY_WAIT_S) as dep:
        # co-located nodes share the CPUs instead of each taking them all
        share = str(max(1, (os.cpu_count() or 1) // 2))
        assert [psutil.Process(n.pid).environ().get("OMP_NUM_THREADS") for n in dep.nodes] == [share, share]
        run = dep.run(cfg_path, out, timeout=3 * DEPLOY_WAIT_S, run_config=DEPLOY_RUN_CONFIG)
        assert (out / "summary.json").is_file(), run.stdout + run.stderr + dep.log("superlink")
    assert_same_run(local_run, out, exact=True)
    # `flwr run --stream` shows the ServerApp's line per round and its final line
    said = [line.removeprefix("fedrank: ") for line in run.stdout.splitlines() if line.startswith("fedrank: ")]
    rows = metrics(out)
    assert said == [round_line(row, load_config(None, TINY)) for row in rows] + [
        f"{final_line(json.loads((out / 'summary.json').read_text()))}; outputs in {out}"], run.stdout
