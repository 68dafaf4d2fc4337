"""A Flower deployment on 127.0.0.1 (one SuperLink, N SuperNodes), for tests, benchmarks and demos.

    with loopback_deployment(work_dir, 2, tls=make_certificates(work_dir / "certs"),
                             auth=make_node_keys(work_dir / "keys", 2)) as dep:
        dep.run(config_path, out_dir, timeout=600)

Everything listens on free 127.0.0.1 ports.  ``$FLWR_HOME`` (``work_dir/flwr-home``) holds the
``config.toml`` with the connection to the SuperLink.  On exit (also when the body raises)
exactly the processes this module started are stopped, with the Flower processes they
spawned (``flower-superexec``, ``flwr-clientapp``, ``flwr-serverapp``), each by its PID.

Security (Flower 1.41): TLS is ``flower-superlink --ssl-ca-certfile --ssl-certfile
--ssl-keyfile`` and ``flower-supernode --root-certificates``; SuperNode authentication is
``flower-superlink --enable-supernode-auth`` (requires TLS), each allowed node's public key
registered with ``flwr supernode register KEY.pub <connection>``, and ``flower-supernode
--auth-supernode-private-key KEY``.  A node whose key is not registered is refused when it
activates (the SuperNode logs "Exit Code: 305" and exits with status 1).  See
docs/flower.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[3]
DEPLOY_APP = ROOT / "deploy" / "flower"
BIN = Path(sys.executable).parent
BINARIES = ("flower-superlink", "flower-supernode", "flwr", "flower-superexec")
HOST = "127.0.0.1"
Trust = Literal["ca", "system", "insecure"]


def binaries_available() -> bool:
    """Whether the Flower deployment executables are installed (next to this Python or on PATH)."""
    return all((BIN / b).exists() or shutil.which(b) for b in BINARIES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, why: Path | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        if time.monotonic() > deadline:
            detail = why.read_text() if why is not None and why.is_file() else ""
            raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:.0f} s\n{detail}")
        time.sleep(0.2)


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float = 15.0, strays: Sequence[Any] = ()) -> None:
    """Stop exactly ``procs`` and the processes they spawned, each by its PID: SIGTERM, then SIGKILL.  ``strays``:
    ``psutil.Process`` es left behind by a killed process (``Deployment.kill``), stopped too while they still run
    (a reused PID is left alone)."""
    import psutil

    family: list[int] = [s.pid for s in strays if s.is_running()]
    for p in procs:
        try:
            family += [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family.append(p.pid)
    for pid in reversed(family):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    deadline = time.monotonic() + grace_s
    for pid in family:
        try:
            while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.2)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass


# --------------------------------------------------------------------------- certificates and node keys


@dataclass(frozen=True)
class Certificates:
    """A CA and the SuperLink's certificate signed by it."""

    ca: Path           # ca.crt: given to every SuperNode (--root-certificates) and to `flwr`
    certfile: Path     # server.pem
    keyfile: Path      # server.key


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's ECDSA (P-384) key pair in OpenSSH format."""

    private: Path
    public: Path


def _cmd(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def make_certificates(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                      days: int = 365) -> Certificates:
    """A self-signed CA and a SuperLink certificate whose subjectAltName covers ``hosts`` (openssl)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    _cmd("openssl", "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-days", str(days), "-nodes",
         "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-subj", "/CN=fedrank-ca")
    _cmd("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server.key"),
         "-out", str(d / "server.csr"), "-subj", f"/CN={hosts[0]}")
    (d / "server.ext").write_text(f"subjectAltName={san}\n")
    _cmd("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.pem"), "-days", str(days),
         "-sha256", "-extfile", str(d / "server.ext"))
    return Certificates(ca=d / "ca.crt", certfile=d / "server.pem", keyfile=d / "server.key")


def make_node_keys(directory: Path, n: int, prefix: str = "node") -> list[NodeKey]:
    """``n`` SuperNode key pairs (``ssh-keygen -t ecdsa -b 384``): ``<prefix><i>`` and ``<prefix><i>.pub``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        private = d / f"{prefix}{i}"
        _cmd("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", f"{prefix}{i}", "-f", str(private))
        keys.append(NodeKey(private=private, public=d / f"{prefix}{i}.pub"))
    return keys


# --------------------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    """A running loopback deployment: ports, ``$FLWR_HOME``, the environment, and its processes."""

    work_dir: Path
    home: Path                       # $FLWR_HOME, with config.toml
    link_port: int                   # the SuperLink's one port (Fleet, Control and Runtime API)
    env: dict[str, str]
    connection: str = "loopback"
    tls: Certificates | None = None
    auth: bool = False  # SuperNode authentication
    start_timeout: float = 60  # seconds the SuperLink gets to open its port
    node_threads: int = 0  # OMP_NUM_THREADS of every SuperNode (and its ClientApps); 0: inherit
    procs: list[subprocess.Popen] = field(default_factory=list)
    nodes: list[subprocess.Popen] = field(default_factory=list)
    link: subprocess.Popen | None = None  # the SuperLink
    strays: list[Any] = field(default_factory=list)  # psutil.Process es whose parent was killed (``kill``)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.link_port}"

    @property
    def logs(self) -> Path:
        return self.work_dir / "logs"

    def log(self, name: str) -> str:
        """The combined stdout/stderr of the process started as ``name`` (``superlink``, ``supernode0``...)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start a process whose output goes to ``logs/<name>.log`` (appended: a restarted process keeps the earlier
        output), with the deployment's environment updated by ``env``; it is stopped with the deployment."""
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "a") as f:
            p = subprocess.Popen([*args], env={**self.env, **(env or {})}, cwd=self.work_dir, stdout=f,
                                 stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL one process of the deployment by its PID, as a crash would; the processes it had spawned are
        left running (they notice on their own, or are stopped with the deployment)."""
        import psutil

        try:
            self.strays += psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def strays_alive(self) -> list[int]:
        """PIDs of the processes left behind by killed ones (``kill``) that still run (a zombie does not)."""
        import psutil

        alive = []
        for p in self.strays:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def start_superlink(self) -> subprocess.Popen:
        """Start the ``flower-superlink`` of this deployment (again, after it died: the same port and
        ``--database``) and wait until its port accepts connections."""
        link = ["flower-superlink", "--host", HOST, "--port", str(self.link_port),
                "--disable-runtime-dependency-installation", "--database", str(self.work_dir / "link.db")]
        if self.tls is None:
            link.append("--insecure")
        else:
            link += ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.certfile),
                     "--ssl-keyfile", str(self.tls.keyfile)]
        if self.auth:
            link.append("--enable-supernode-auth")
        self.link = self.start("superlink", *link)
        wait_for_port(self.link_port, self.start_timeout, self.logs / "superlink.log")
        return self.link

    def start_supernode(self, name: str, partition_id: int = 0, num_partitions: int = 1, *,
                        key: NodeKey | None = None, trust: Trust | None = None, extra: Sequence[str] = (),
                        node_config: str = "", env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start one ``flower-supernode`` serving ``partition-id``; ``key``: its auth private key.

        ``trust``: how it dials the SuperLink: ``"ca"`` (``--root-certificates`` = the deployment's
        CA), ``"system"`` (TLS verified against the system's CAs only), ``"insecure"`` (plain
        HTTP); default: ``"ca"`` with TLS, ``"insecure"`` without.  Other values test refusals.
        ``node_config``: its whole ``--node-config`` instead of the partition (e.g. ``data='/path/shard.jsonl'``);
        ``env``: changes to its environment (and its ClientApps').
        """
        trust = trust or ("insecure" if self.tls is None else "ca")
        args = ["flower-supernode", "--superlink", self.address, "--host", HOST, "--port", str(free_port()),
                "--node-config", node_config or f"partition-id={partition_id} num-partitions={num_partitions}"]
        if trust == "insecure":
            args.append("--insecure")
        elif trust == "ca":
            if self.tls is None:
                raise ValueError("trust='ca' needs a deployment with TLS")
            args += ["--root-certificates", str(self.tls.ca)]
        if key is not None:
            args += ["--auth-supernode-private-key", str(key.private)]
        threads = {"OMP_NUM_THREADS": str(self.node_threads)} if self.node_threads else {}
        return self.start(name, *args, *extra, env={**threads, **(env or {})})

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI against this deployment's ``$FLWR_HOME``."""
        return subprocess.run(["flwr", *args], env=self.env, cwd=self.work_dir, capture_output=True, text=True,
                              timeout=timeout)

    def register(self, key: NodeKey, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Allow a SuperNode key on the SuperLink (``flwr supernode register``); raises if still refused after
        ``timeout`` seconds (the Control API may answer a while after the port opens on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.flwr("supernode", "register", str(key.public), self.connection, timeout=max(timeout, 120))
            if done.returncode == 0:
                return done
            if time.monotonic() > deadline:
                raise RuntimeError(f"flwr supernode register {key.public} failed for {timeout:.0f} s:\n"
                                   f"{done.stdout}{done.stderr}")
            time.sleep(1.0)

    def supernodes(self) -> list[dict]:
        """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``): node-id, status, ..."""
        done = self.flwr("supernode", "ls", self.connection, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode ls failed:\n{done.stdout}{done.stderr}")
        data = json.loads(done.stdout[done.stdout.index("{"):])
        return list(data["nodes"])

    def wait_online(self, n: int, timeout: float = 60) -> list[dict]:
        """Wait until ``n`` SuperNodes are online (``flwr supernode ls``, retried while the Control API does
        not answer yet); the online ones."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                online = [node for node in self.supernodes() if node.get("status") == "online"]
            except RuntimeError:
                online = []
            if len(online) >= n:
                return online
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(online)} of {n} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)

    def run_args(self, config_path: Path, out_dir: Path, run_config: str = "") -> list[str]:
        """The arguments of ``flwr run deploy/flower <connection> --stream`` with fedrank's ``config``/``out``
        (+ ``run_config``)."""
        rc = f'config="{config_path}" out="{out_dir}"' + (f" {run_config}" if run_config else "")
        return ["run", str(DEPLOY_APP), self.connection, "--stream", "--run-config", rc]

    def run(self, config_path: Path, out_dir: Path, timeout: float, *,
            run_config: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``flwr run ... --stream`` (``run_args``) to its end."""
        return self.flwr(*self.run_args(config_path, out_dir, run_config), timeout=timeout)

    def start_run(self, config_path: Path, out_dir: Path, *, run_config: str = "",
                  name: str = "flwr-run") -> subprocess.Popen:
        """Start ``flwr run ... --stream`` (``run_args``) in the background; its output goes to ``logs/<name>.log``."""
        return self.start(name, "flwr", *self.run_args(config_path, out_dir, run_config))


def _config_toml(connection: str, port: int, tls: Certificates | None) -> str:
    security = "insecure = true" if tls is None else f'root-certificates = "{tls.ca}"'
    return (f'[superlink]\ndefault = "{connection}"\n\n[superlink.{connection}]\n'
            f'address = "{HOST}:{port}"\n{security}\n')


@contextmanager
def loopback_deployment(work_dir: Path, num_nodes: int, *, tls: Certificates | None = None,
                        auth: Sequence[NodeKey] | None = None, connection: str = "loopback",
                        env: dict[str, str] | None = None, start_timeout: float = 60) -> Iterator[Deployment]:
    """Start a SuperLink and ``num_nodes`` SuperNodes (``partition-id=i num-partitions=num_nodes``) on 127.0.0.1.

    ``tls``: serve the SuperLink over TLS with these certificates (else ``--insecure``).
    ``auth``: enable SuperNode authentication (requires ``tls``), register these public keys
    and give node ``i`` the private key ``auth[i]`` (``len(auth) >= num_nodes``).
    ``env``: the environment of every process (default: ``os.environ``); ``PATH`` gets the
    venv's bin, ``FLWR_HOME`` and ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` are set.
    ``start_timeout``: seconds the SuperLink gets to open its port and then to accept each key registration.
    Each node gets ``OMP_NUM_THREADS`` = the CPUs divided between the nodes, unless ``env`` sets it.
    """
    if auth is not None and tls is None:
        raise ValueError("SuperNode authentication requires TLS (Flower refuses --enable-supernode-auth with --insecure)")
    if auth is not None and len(auth) < num_nodes:
        raise ValueError(f"{num_nodes} nodes need {num_nodes} keys, got {len(auth)}")
    work = Path(work_dir)
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(_config_toml(connection, port, tls))
    base = dict(os.environ if env is None else env)
    base.update({"FLWR_HOME": str(home), "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
                 "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    # the nodes share this machine's CPUs, as nodes on their own machines would not: each gets its share of torch
    # threads (a config's own `threads` still wins), so that nodes training at once do not oversubscribe the cores
    share = 0 if "OMP_NUM_THREADS" in base else max(1, (os.cpu_count() or 1) // max(num_nodes, 1))
    dep = Deployment(work_dir=work, home=home, link_port=port, env=base, connection=connection, tls=tls,
                     auth=auth is not None, start_timeout=start_timeout, node_threads=share)
    try:
        dep.start_superlink()
        for key in auth or ():
            dep.register(key, timeout=start_timeout)
        for i in range(num_nodes):
            dep.nodes.append(dep.start_supernode(f"supernode{i}", i, num_nodes,
                                                 key=None if auth is None else auth[i]))
        yield dep
    finally:
        stop_processes(dep.procs, strays=dep.strays)
