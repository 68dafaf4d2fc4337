"""A SuperNode's warm worker: answers the messages that ``fedrank.node_app``'s ClientApps hand it, one at a time.

    python -m fedrank.runtime.node_worker SOCKET WATCH_PID IDLE_S

It imports fedrank's client path once and keeps the built clients (``flower.cached_client``: the model, the method
and the node's data) between messages.  It exits, removing its socket, when process ``WATCH_PID`` (the SuperNode's
``flower-superexec``) is gone or after ``IDLE_S`` seconds without a message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from fedrank.node_app import from_bytes, to_bytes
from fedrank.runtime.flower import answer


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie nobody reaped has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): os.kill is all there is
        return True


def handle(conn: Connection) -> None:
    """Answer one request: the reply content, or the error as one line (the reply of a failed client)."""
    request = json.loads(conn.recv_bytes())
    content = from_bytes(conn.recv_bytes())
    try:
        reply = answer(request["kind"], content, request["node_config"])
    except Exception as err:  # noqa: BLE001 - any failure of a client is its error reply, the worker goes on
        traceback.print_exc()
        conn.send_bytes(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
        return
    conn.send_bytes(json.dumps({}).encode())
    conn.send_bytes(to_bytes(reply))


def serve(path: Path, watch_pid: int, idle_s: float) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    server.settimeout(1.0)
    last = time.monotonic()
    try:
        while alive(watch_pid) and time.monotonic() - last < idle_s:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            client.setblocking(True)
            with Connection(client.detach()) as conn:
                try:
                    handle(conn)
                except (EOFError, OSError):  # the ClientApp went away (its message timed out, or it was killed)
                    pass
            last = time.monotonic()
    finally:
        server.close()
        path.unlink(missing_ok=True)
        if not alive(watch_pid):  # no ClientApp of that SuperNode can come any more (after an idle exit one may)
            path.with_suffix(".lock").unlink(missing_ok=True)


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
