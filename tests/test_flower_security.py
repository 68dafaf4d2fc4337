"""Deployment security on loopback: TLS between SuperLink and SuperNodes, and SuperNode authentication.

One SuperLink with TLS (a CA made here) and ``--enable-supernode-auth``; two SuperNodes whose
public keys are registered (``flwr supernode register``) serve a one-round fedrank run.  Nodes
with an unregistered key, with no key, without the CA or with ``--insecure`` are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedrank.config import load_config, save_config  # noqa: E402
from fedrank.runtime import flower, loopback  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_run import TINY  # noqa: E402

pytestmark = pytest.mark.skipif(not loopback.binaries_available(),
                                reason="Flower deployment binaries (flower-superlink, flower-supernode, flwr) are not installed")

# a refused node must give up quickly instead of retrying forever
GIVE_UP = ["--max-retries", "2", "--max-wait-time", "10"]
# flwr's ExitCode 305, "could not establish a connection to the SuperLink": logged by the SuperNode,
# whose process then exits with status 1
REFUSED = "Exit Code: 305"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[loopback.Deployment, list[loopback.NodeKey]]]:
    """A TLS + node-auth deployment with two listed nodes; also yields an unlisted key."""
    work = tmp_path_factory.mktemp("secure")
    certs = loopback.make_certificates(work / "certs")
    keys = loopback.make_node_keys(work / "keys", 3)
    env = dict(os.environ)
    env.pop(flower.FAULT_ENV, None)
    with loopback.loopback_deployment(work, 2, tls=certs, auth=keys[:2], env=env) as dep:
        dep.wait_online(2)
        yield dep, keys


def wait_refused(dep: loopback.Deployment, procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    """Wait for each of ``procs`` to exit; stop them (by PID) in any case; their logs."""
    try:
        for name, p in procs.items():
            rc = p.wait(timeout=90)
            assert rc != 0 and REFUSED in dep.log(name), (name, rc, dep.log(name))
    finally:
        loopback.stop_processes(list(procs.values()))
    return {name: dep.log(name) for name in procs}


def activated(dep: loopback.Deployment) -> int:
    return dep.log("superlink").count("[Fleet.ActivateNode] Activated node_id=")


def test_listed_nodes_connect_over_tls_and_a_run_completes(secure, tmp_path: Path) -> None:
    dep, _ = secure
    assert f"Uvicorn running on https://{dep.address}" in dep.log("superlink")
    cfg_path, out = tmp_path / "tiny.toml", tmp_path / "run"
    save_config(load_config(None, TINY + ["rounds=1", "clients.per_round=2", "train.local_steps=1",
                                          "eval.tiers=false"]), cfg_path)
    run = dep.run(cfg_path, out, timeout=300, run_config="timeout-s=240.0")
    assert run.returncode == 0 and (out / "summary.json").is_file(), run.stdout + run.stderr + dep.log("superlink")
    assert len(dep.supernodes()) == 2


def test_an_unlisted_node_is_refused(secure) -> None:
    dep, keys = secure
    before = activated(dep)
    logs = wait_refused(dep, {
        "unlisted": dep.start_supernode("unlisted", 0, 2, key=keys[2], extra=GIVE_UP),  # a key nobody registered
        "keyless": dep.start_supernode("keyless", 1, 2, extra=GIVE_UP),                 # no key: would self-register
    })
    assert "Failed to activate SuperNode" in logs["unlisted"]
    assert "All SuperNodes must be registered via the CLI" in logs["keyless"]
    link = dep.log("superlink")
    assert "No SuperNode found with the given public key" in link
    assert "[/v1/fleet/register-node][ApiError:2001]" in link
    assert activated(dep) == before
    assert len(dep.supernodes()) == 2  # only the two registered keys are known to the SuperLink


def test_a_node_without_the_ca_or_insecure_cannot_connect(secure) -> None:
    dep, keys = secure
    before = activated(dep)
    # "no-ca" holds a listed key: only its transport is wrong
    logs = wait_refused(dep, {
        "no-ca": dep.start_supernode("no-ca", 0, 2, key=keys[0], trust="system", extra=GIVE_UP),
        "insecure": dep.start_supernode("insecure", 1, 2, trust="insecure", extra=GIVE_UP),
    })
    assert "CERTIFICATE_VERIFY_FAILED" in logs["no-ca"] or "certificate verify failed" in logs["no-ca"], logs["no-ca"]
    assert "Giving up reconnection" in logs["insecure"], logs["insecure"]
    assert activated(dep) == before
