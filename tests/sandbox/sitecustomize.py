"""Makes files unreadable to one process tree of a test: every Python process started with this folder on
``PYTHONPATH`` (a SuperNode, the ClientApps it starts; the SuperLink and its ServerApp) imports it at startup.

``$FEDRANK_FORBIDDEN``: paths (separated by ``os.pathsep``) the process may not open: opening one raises
``PermissionError``, as an unreadable file would, and is recorded in ``$FEDRANK_OPEN_LOG`` as ``refused``.
``$FEDRANK_WATCHED``: paths whose opening is recorded as ``opened`` (a node's own file: proof that the hook ran).
Every ``open`` goes through Python's audit hook (``sys.addaudithook``: builtins ``open``, ``io.open``, ``os.open``).
"""

import os
import sys


def _paths(variable: str) -> set[str]:
    return {os.path.realpath(p) for p in os.environ.get(variable, "").split(os.pathsep) if p}


def _install() -> None:
    forbidden, watched = _paths("FEDRANK_FORBIDDEN"), _paths("FEDRANK_WATCHED")
    log = os.environ.get("FEDRANK_OPEN_LOG", "")
    if not log or not (forbidden or watched):
        return
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # before the hook: never audited

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.realpath(os.fsdecode(args[0]))
        if path in forbidden or path in watched:
            os.write(fd, f"{os.getpid()} {'refused' if path in forbidden else 'opened'} {path}\n".encode())
        if path in forbidden:
            raise PermissionError(13, "Permission denied (forbidden to this process by the test)", path)

    sys.addaudithook(hook)


_install()
