"""``fedrank`` that stops at a chosen point of a run and waits there to be killed (for kill -9 tests).

    python tests/pausing_cli.py POINT ROUND READY -- run --out DIR ...

POINT is where the process pauses in round ROUND:
  ``training``   — the second sampled client is about to train (the first one has trained);
  ``checkpoint`` — the round's metrics row is on disk, its checkpoint not yet.
On reaching it the process creates the file READY and sleeps until it is killed, so a test can kill it
at that exact point however fast or slow the machine is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

POINTS = ("training", "checkpoint")


def _pause(ready: Path) -> None:
    ready.touch()
    while True:
        time.sleep(60)


def install(point: str, rnd: int, ready: Path) -> None:
    """Patch fedrank so that the process pauses at ``point`` of round ``rnd``."""
    from fedrank import checkpoint
    from fedrank.client import FedClient

    if point == "training":
        fit, seen = FedClient.fit, []

        def paused_fit(self: FedClient, task: Any, payload: Any) -> Any:
            if task.round == rnd:
                seen.append(task.client)
                if len(seen) == 2:
                    _pause(ready)
            return fit(self, task, payload)

        FedClient.fit = paused_fit  # type: ignore[method-assign]
    elif point == "checkpoint":
        save = checkpoint.save

        def paused_save(folder: Path, round: int, *args: Any, **kw: Any) -> None:
            if round == rnd:
                _pause(ready)
            save(folder, round, *args, **kw)

        checkpoint.save = paused_save  # type: ignore[assignment]
    else:
        raise SystemExit(f"POINT must be one of {POINTS}, got {point}")


if __name__ == "__main__":
    point, rnd, ready, sep, *args = sys.argv[1:]
    assert sep == "--", __doc__
    install(point, int(rnd), Path(ready))
    from fedrank.cli import app

    app(args, prog_name="fedrank")
