"""The in-process runtime: every simulated client shares one model and runs in turn."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fedrank.client import FedClient
from fedrank.methods import Task, Tensors
from fedrank.methods.base import Factors
from fedrank.runtime import Job, Outcome


class LocalRuntime:
    def __init__(self, client: FedClient) -> None:
        self.client = client

    def fit(self, jobs: Sequence[Job], done: Callable[[Task], None]) -> list[Outcome]:
        outcomes = []
        for task, payload in jobs:
            outcomes.append(self.client.fit(task, payload))
            done(task)
        return outcomes

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, float]:
        return {c: self.client.validate(c, factors, head) for c in clients}
