"""A deployment survives its processes dying: a SuperNode killed mid-round, then the SuperLink.

Loopback, TLS and SuperNode authentication (the nodes' keys are registered), two nodes that each serve one client
of every round.  During round 2 node 1 is SIGKILLed once it has received its message.  The SuperLink lists it online
until it misses two heartbeats (about a minute); then Flower answers its message with "Node Unavailable", round 2
closes with client 1 missing, and the node may activate again: it is restarted with the same key, gets its old node
id back, and serves round 3, which waits for it.  During round 3 the SuperLink is SIGKILLed (its `flwr run` fails)
and restarted with the same ``--database``; the nodes reconnect by themselves, what the killed SuperLink left running
(its ServerApp) is stopped by PID, and `flwr run` on the same run folder resumes from the checkpoint of round 2.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedrank.config import load_config, save_config  # noqa: E402
from fedrank.runtime import flower, loopback  # noqa: E402

from test_flower import DEPLOY_WAIT_S  # noqa: E402
from test_run import TINY, metrics  # noqa: E402

pytestmark = pytest.mark.skipif(not loopback.binaries_available(),
                                reason="Flower deployment binaries (flower-superlink, flower-supernode, flwr) are not "
                                       "installed")

RUN_CONFIG = f"timeout-s={DEPLOY_WAIT_S} wait-nodes-s={DEPLOY_WAIT_S}"
CONFIG = TINY + ["clients.count=2", "clients.per_round=2", "rounds=3", "ranks.values=[2,4]", "train.local_steps=1",
                 "eval.tiers=false"]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEPLOY_WAIT_S) -> None:
    """Poll ``condition`` every half second until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not after {timeout:.0f} s: {what}"
        time.sleep(0.5)


def rows_written(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def received(dep: loopback.Deployment, name: str, rnd: int) -> bool:
    """Whether SuperNode ``name`` has received its train message of round ``rnd`` (its Flower log says so)."""
    log = dep.log(name)
    at = log.find(f"ROUND {rnd}]")
    return at >= 0 and re.search(r"Receiving: train message.*?Received successfully", log[at:], re.S) is not None


def node_id(dep: loopback.Deployment, name: str) -> str:
    """The node id SuperNode ``name`` got from the SuperLink (its log says so)."""
    found = re.search(r"SuperNode ID: (\d+)", dep.log(name))
    assert found, dep.log(name)
    return found.group(1)


def status(dep: loopback.Deployment, node: str) -> str:
    """``online`` / ``offline`` / ... of a node id in ``flwr supernode ls``."""
    return next((str(n["status"]) for n in dep.supernodes() if str(n["node-id"]) == node), "unknown")


def run_statuses(dep: loopback.Deployment) -> list[str]:
    """The sorted statuses of the SuperLink's runs (``flwr ls``)."""
    listed = dep.flwr("ls", dep.connection, "--format", "json").stdout
    return sorted(str(r["status"]) for r in json.loads(listed[listed.index("{"):])["runs"])


def test_a_killed_node_misses_one_round_and_a_killed_superlink_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    certs = loopback.make_certificates(tmp_path / "certs")
    keys = loopback.make_node_keys(tmp_path / "keys", 2)
    cfg_path, out = tmp_path / "tiny.toml", tmp_path / "run"
    save_config(load_config(None, CONFIG), cfg_path)
    env = {k: v for k, v in os.environ.items() if k != flower.FAULT_ENV}
    with loopback.loopback_deployment(tmp_path, 2, tls=certs, auth=keys, env=env, start_timeout=DEPLOY_WAIT_S) as dep:
        first = dep.start_run(cfg_path, out, run_config=RUN_CONFIG)
        wait_for(lambda: rows_written(out) == 1 and received(dep, "supernode1", 2), "node 1 got its round-2 message")
        victim = node_id(dep, "supernode1")
        dep.kill(dep.nodes[1])
        # the SuperLink lists a node online until it misses 2 heartbeats; only then may its key activate again
        wait_for(lambda: status(dep, victim) == "offline", "the SuperLink lists the killed node offline")
        dep.nodes[1] = dep.start_supernode("supernode1", 1, 2, key=keys[1])
        wait_for(lambda: status(dep, victim) == "online", "the restarted node is online under its old node id")
        wait_for(lambda: received(dep, "supernode1", 3), "the restarted node got its round-3 message")
        dep.kill(dep.link)
        assert first.wait(timeout=DEPLOY_WAIT_S) != 0  # `flwr run --stream` loses its SuperLink
        dep.start_superlink()
        dep.wait_online(2, DEPLOY_WAIT_S)  # the nodes come back by themselves
        # the old ServerApp is refused by the restarted SuperLink (its task token is gone); it often exits within
        # seconds, but once it was still waiting 5 minutes later: stop what the killed processes left, by PID
        loopback.stop_processes([], strays=dep.strays)
        assert not dep.strays_alive()
        second = dep.run(cfg_path, out, timeout=3 * DEPLOY_WAIT_S, run_config=RUN_CONFIG)
        assert (out / "summary.json").is_file(), second.stdout + second.stderr + dep.log("superlink")
        # the killed run is marked failed once the restarted SuperLink misses its ServerApp's heartbeats
        wait_for(lambda: run_statuses(dep) == ["finished:completed", "finished:failed"],
                 "the SuperLink lists the resumed run completed and the killed one failed")
    rows = metrics(out)
    assert [(r["round"], r["clients"], r["missing"]) for r in rows] == [(1, [0, 1], []), (2, [0, 1], [1]),
                                                                        (3, [0, 1], [])]
    assert "fedrank: resuming after round 2 of 3" in second.stdout, second.stdout
