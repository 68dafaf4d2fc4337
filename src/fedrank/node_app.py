"""The deployment's ClientApp: a light process that hands each message to its SuperNode's warm worker.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message.  This module imports only Flower and the
standard library.  The worker (``fedrank.runtime.node_worker``), started by a node's first message and reused by
the later ones, holds torch, the model and the node's data, so a message costs Flower's process start and a local
socket round trip instead of fedrank's imports and model load.

* The worker listens on ``<tmp>/fedrank-<uid>/node-<pid>.sock`` (a directory only this user can open), where
  ``pid`` is this process's parent, the SuperNode's ``flower-superexec``; the worker exits when that process does
  (the SuperNode stopped or was killed) or after ``warm-idle-s`` seconds without a message.
* The request is the message type, the node config and the message content (Flower's protobuf bytes); the answer
  is the reply content or the one-line error, which this process raises so that Flower sends an error reply.
* ``--node-config "warm=false"`` answers in this process instead (every message pays the imports and the load,
  and a hanging message does not hold the node's later ones).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

START_TIMEOUT_S = 600.0  # how long a message waits for a new worker to listen (imports and model load, loaded CPU)
IDLE_S = 600.0  # default ``warm-idle-s``


def to_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def socket_path(watch_pid: int) -> Path:
    """The worker's socket for the SuperNode process ``watch_pid``, in a directory only this user can open."""
    folder = Path(tempfile.gettempdir()) / f"fedrank-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise RuntimeError(f"{folder} must belong to this user and be closed to others (chmod 700 {folder})")
    return folder / f"node-{watch_pid}.sock"


def _connect(path: Path) -> Connection | None:
    try:
        return Client(str(path), family="AF_UNIX")
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def worker_connection(watch_pid: int, idle_s: float) -> Connection:
    """A connection to the warm worker of SuperNode process ``watch_pid``, started first if none listens (one at a
    time: concurrent messages of the node wait on a lock file instead of starting a second one)."""
    path = socket_path(watch_pid)
    conn = _connect(path)
    if conn is not None:
        return conn
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)
        if conn is not None:
            return conn
        path.unlink(missing_ok=True)  # left by a worker that was killed
        worker = subprocess.Popen([sys.executable, "-m", "fedrank.runtime.node_worker", str(path), str(watch_pid),
                                   str(idle_s)], stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while (conn := _connect(path)) is None:
            if worker.poll() is not None:
                raise RuntimeError(f"fedrank's node worker exited with status {worker.returncode} before it listened "
                                   "(see the SuperNode's output)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fedrank's node worker did not listen on {path} within {START_TIMEOUT_S:g} s")
            time.sleep(0.1)
        return conn


def ask(conn: Connection, kind: str, content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """Send one message to the worker and return its reply content; raise its error."""
    conn.send_bytes(json.dumps({"kind": kind, "node_config": dict(node_config)}).encode())
    conn.send_bytes(to_bytes(content))
    try:
        status = json.loads(conn.recv_bytes())
        if "error" in status:
            raise RuntimeError(status["error"])
        return from_bytes(conn.recv_bytes())
    except EOFError:
        raise RuntimeError("fedrank's node worker died while answering (see the SuperNode's output); the next "
                           "message starts a new one") from None


def warm(node_config: Mapping[str, Any]) -> bool:
    """The node config's ``warm`` (default true); anything but true/false is refused in one line."""
    value = str(node_config.get("warm", "true")).lower()
    if value not in ("true", "false"):
        raise ValueError(f"node config warm={node_config['warm']!r}: set --node-config \"warm=true\" or \"warm=false\"")
    return value == "true"


def _reply(msg: Message, context: Context) -> Message:
    config = context.node_config
    kind = msg.metadata.message_type
    if not warm(config):
        from fedrank.runtime.flower import answer

        return Message(answer(kind, msg.content, config), reply_to=msg)
    with worker_connection(os.getppid(), float(config.get("warm-idle-s", IDLE_S))) as conn:
        return Message(ask(conn, kind, msg.content, config), reply_to=msg)


client_app = ClientApp()
client_app.train()(_reply)
client_app.evaluate()(_reply)
client_app.query("partition")(_reply)
