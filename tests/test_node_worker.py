"""The warm node worker behind the deployment's ClientApp (``fedrank.node_app``): the same answers as the
in-process ClientApp, errors as replies, one worker per SuperNode process, and no worker outliving its node."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import RecordDict  # noqa: E402

from fedrank import node_app  # noqa: E402
from fedrank.client import with_head  # noqa: E402
from fedrank.config import load_config  # noqa: E402
from fedrank.experiment import build  # noqa: E402
from fedrank.methods import Task  # noqa: E402
from fedrank.runtime import flower  # noqa: E402

from test_run import TINY  # noqa: E402

NODE = {"partition-id": 1, "num-partitions": 2}


@pytest.fixture
def supernode() -> Iterator[subprocess.Popen]:
    """A stand-in for a SuperNode's ``flower-superexec``: the process whose life the worker follows."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc
    proc.kill()
    proc.wait()


def message(kind: str, client: int = 1) -> RecordDict:
    """A round-1 message for ``client`` (served by node 1 of 2) at rank 4, as the server sends it."""
    cfg = load_config(None, TINY)
    task = Task(client=client, rank=4, round=1)
    content = RecordDict({"task": flower.task_record(task, flower.config_text(cfg))})
    if kind == "train":
        exp = build(cfg)
        payload = with_head(exp.method.payload(exp.method.init_state(), task),
                            exp.heads.for_client(exp.heads.init_state(exp.model.get_head()), task.rank))
        content["tensors"] = flower.to_record(payload)
    return content


def test_the_worker_answers_as_the_in_process_client_app_and_survives_an_error(supernode: subprocess.Popen) -> None:
    query = message("query.partition")
    with node_app.worker_connection(supernode.pid, idle_s=60) as conn:
        got = node_app.ask(conn, "query.partition", query, NODE)
    assert dict(got["partition"]) == {"partition-id": 1, "num-partitions": 2}
    with node_app.worker_connection(supernode.pid, idle_s=60) as conn, pytest.raises(RuntimeError, match="KeyError"):
        node_app.ask(conn, "no-such-kind", query, NODE)
    train = message("train")
    with node_app.worker_connection(supernode.pid, idle_s=60) as conn:  # the same worker, still serving
        warm = node_app.ask(conn, "train", train, NODE)
    here = flower.answer("train", train, NODE)  # threads=1: the same code gives the same bits
    assert dict(warm["reply"]) == dict(here["reply"])
    ours, theirs = flower.from_record(warm["tensors"]), flower.from_record(here["tensors"])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_worker_exits_with_its_supernode(supernode: subprocess.Popen) -> None:
    with node_app.worker_connection(supernode.pid, idle_s=600) as conn:
        node_app.ask(conn, "query.partition", message("query.partition"), NODE)
    path = node_app.socket_path(supernode.pid)
    assert path.exists()
    supernode.kill()  # and not reaped yet: a zombie, as a killed SuperNode's superexec may stay
    deadline = time.monotonic() + 60
    while path.exists():
        assert time.monotonic() < deadline, "the worker outlived its SuperNode by a minute"
        time.sleep(0.2)
    assert not path.with_suffix(".lock").exists()


def test_the_warm_switch_takes_true_or_false_and_refuses_anything_else() -> None:
    assert node_app.warm({}) and node_app.warm({"warm": True}) and node_app.warm({"warm": "TRUE"})
    assert not node_app.warm({"warm": False}) and not node_app.warm({"warm": "false"})
    with pytest.raises(ValueError, match=r"^node config warm='maybe': set --node-config \"warm=true\" or"):
        node_app.warm({"warm": "maybe"})
