"""Runtimes carry payloads to clients and replies back; the server loop is the same for all of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from fedrank.methods import Reply, Task, Tensors
from fedrank.methods.base import Factors

Job = tuple[Task, Tensors]
Outcome = tuple[Reply, dict[str, float]]


class Runtime(Protocol):
    def fit(self, jobs: Sequence[Job], done: Callable[[Task], None]) -> list[Outcome]:
        """Run every job on its client; call ``done`` as each finishes; return the replies that arrived."""

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, dict[str, float]]:
        """Each client's metrics of the given global model on its local validation split, with the split's size
        (``FedClient.validate``), for the clients that answered."""

    def close(self) -> None:
        """Release what the runtime started (processes, engines); a no-op where there is nothing."""
