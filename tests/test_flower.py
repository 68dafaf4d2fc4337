"""The Flower runtime: wire codec, faults, and parity with the local runtime (simulation, loopback deployment)."""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fedrank.cli import execute  # noqa: E402
from fedrank.config import load_config, save_config  # noqa: E402
from fedrank.methods import Task  # noqa: E402
from fedrank.runtime import flower, loopback  # noqa: E402
from fedrank.server import RunFiles, Server, sample_clients  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_run import TINY, adapter, metrics, untimed  # noqa: E402


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local")
    execute(load_config(None, TINY), out)
    return out


def assert_same_run(a: Path, b: Path, exact: bool) -> None:
    ra, rb = untimed(metrics(a)), untimed(metrics(b))
    assert len(ra) == len(rb) == 2
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if exact or not isinstance(x[k], float):
                assert x[k] == y[k], k
            else:
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-4)


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
    """A Grid stand-in that runs fedrank's ClientApp in threads: ``nodes`` partitions, no Ray, no sockets."""

    def __init__(self, nodes: int) -> None:
        from flwr.app import Context, RecordDict
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # what a SuperLink / the simulation sets for a ServerApp before it creates messages
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.contexts = {1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config={},
                                           node_config={"partition-id": i, "num-partitions": nodes})
                         for i in range(nodes)}
        self.pool = ThreadPoolExecutor(nodes)
        self.replies: dict[str, object] = {}
        self.lock = threading.Lock()

    def get_node_ids(self):
        return list(self.contexts)

    def _handle(self, mid: str, msg) -> None:
        try:
            reply = flower.client_app(msg, self.contexts[msg.metadata.dst_node_id])
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
    from fedrank.experiment import build

    cfg = load_config(None, TINY + ["train.local_steps=1", "eval.tiers=false", "clients.per_round=2"])
    exp = build(cfg)
    first = sample_clients(cfg.seed, 1, cfg.clients.count, cfg.clients.per_round)[0]
    monkeypatch.setenv(flower.FAULT_ENV, f"{fault}:{first}:1:6" if fault == "hang" else f"fail:{first}:1")
    logs: list[str] = []
    grid = ThreadGrid(2)
    runtime = flower.FlowerRuntime(grid, cfg, timeout_s=3.0, log=logs.append)
    try:
        files = RunFiles(tmp_path)
        save_config(cfg, files.config)
        Server(exp, runtime, files, log=logs.append).run()
    finally:
        grid.pool.shutdown(wait=True)
    rows = metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["missing"] == [first] and rows[1]["missing"] == []
    assert any(f"client {first}" in line for line in logs)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- simulation


def test_simulation_from_fedrank_run_matches_local(local_run: Path, tmp_path: Path) -> None:
    execute(load_config(None, TINY + ["runtime=flower"]), tmp_path)
    # Ray actors run with one torch thread, so float sums may differ in the last bits
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
    with loopback.loopback_deployment(tmp_path, 2, env=env) as dep:
        run = dep.run(cfg_path, out, timeout=420, run_config="timeout-s=300.0")
        assert (out / "summary.json").is_file(), run.stdout + run.stderr + dep.log("superlink")
    assert_same_run(local_run, out, exact=True)
