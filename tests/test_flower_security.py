"""Deployment security on loopback: TLS between SuperLink and SuperNodes, and SuperNode authentication.

One SuperLink with TLS (a CA made here) and ``--enable-supernode-auth``; two SuperNodes whose
public keys are registered (``flwr supernode register``) serve a one-round fedrank run.  Nodes
with an unregistered key, with no key, without the CA or with ``--insecure`` are refused.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedrank.config import load_config, save_config  # noqa: E402
from fedrank.runtime import flower, loopback  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_flower import DEPLOY_RUN_CONFIG, DEPLOY_WAIT_S  # noqa: E402
from test_run import TINY  # noqa: E402

pytestmark = pytest.mark.skipif(not loopback.binaries_available(),
                                reason="Flower deployment binaries (flower-superlink, flower-supernode, flwr) are not installed")

# a refused node must give up quickly instead of retrying forever
GIVE_UP = ["--max-retries", "2", "--max-wait-time", "10"]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[loopback.Deployment, list[loopback.NodeKey]]]:
    """A TLS + node-auth deployment with two listed nodes; also yields an unlisted key."""
    work = tmp_path_factory.mktemp("secure")
    certs = loopback.make_certificates(work / "certs")
    keys = loopback.make_node_keys(work / "keys", 3)
    env = dict(os.environ)
    env.pop(flower.FAULT_ENV, None)
    with loopback.loopback_deployment(work, 2, tls=certs, auth=keys[:2], env=env, start_timeout=DEPLOY_WAIT_S) as dep:
        dep.wait_online(2, timeout=DEPLOY_WAIT_S)
        yield dep, keys


def known_nodes(dep: loopback.Deployment) -> dict[int, str]:
    """node-id → status of every SuperNode the SuperLink knows (``flwr supernode ls``)."""
    return {int(n["node-id"]): str(n["status"]) for n in dep.supernodes()}


def assert_refused(dep: loopback.Deployment, procs: dict[str, subprocess.Popen]) -> None:
    """Each of ``procs`` gives up with a non-zero exit status and the SuperLink knows no new node; the
    processes are stopped (by PID) in any case.  Flower's log lines are shown on failure, never matched."""
    before = known_nodes(dep)
    try:
        for name, p in procs.items():
            rc = p.wait(timeout=DEPLOY_WAIT_S)
            assert rc != 0, (name, rc, dep.log(name))
    finally:
        loopback.stop_processes(list(procs.values()))
    assert known_nodes(dep) == before, dep.log("superlink")
    assert sorted(known_nodes(dep).values()) == ["online", "online"]


def tls_handshake(port: int, cafile: Path | None) -> None:
    """A TLS handshake with 127.0.0.1:``port``, verifying its certificate against ``cafile`` (else the
    system's CAs)."""
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection((loopback.HOST, port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname=loopback.HOST):
            pass


def test_listed_nodes_connect_over_tls_and_a_run_completes(secure, tmp_path: Path) -> None:
    dep, _ = secure
    assert dep.tls is not None
    tls_handshake(dep.link_port, dep.tls.ca)  # the SuperLink serves TLS with a certificate from our CA
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_handshake(dep.link_port, None)
    cfg_path, out = tmp_path / "tiny.toml", tmp_path / "run"
    save_config(load_config(None, TINY + ["rounds=1", "clients.per_round=2", "train.local_steps=1",
                                          "eval.tiers=false"]), cfg_path)
    run = dep.run(cfg_path, out, timeout=3 * DEPLOY_WAIT_S, run_config=DEPLOY_RUN_CONFIG)
    assert run.returncode == 0 and (out / "summary.json").is_file(), run.stdout + run.stderr + dep.log("superlink")
    assert len(known_nodes(dep)) == 2


def test_an_unlisted_node_is_refused(secure) -> None:
    dep, keys = secure
    assert_refused(dep, {
        "unlisted": dep.start_supernode("unlisted", 0, 2, key=keys[2], extra=GIVE_UP),  # a key nobody registered
        "keyless": dep.start_supernode("keyless", 1, 2, extra=GIVE_UP),                 # no key: would self-register
    })


def test_a_node_without_the_ca_or_insecure_cannot_connect(secure) -> None:
    dep, keys = secure
    # "no-ca" holds a listed key: only its transport is wrong
    assert_refused(dep, {
        "no-ca": dep.start_supernode("no-ca", 0, 2, key=keys[0], trust="system", extra=GIVE_UP),
        "insecure": dep.start_supernode("insecure", 1, 2, trust="insecure", extra=GIVE_UP),
    })
