"""The in-process runtime: every simulated client shares one model and runs in turn.

Injectable faults (``[faults]`` in the config, seeded per round and client) let tests and
robustness studies drop clients, crash them mid-training, or corrupt their uploads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedrank.client import FedClient
from fedrank.config import FaultsConfig
from fedrank.methods import Reply, Task, Tensors
from fedrank.methods.base import Factors
from fedrank.runtime import Job, Outcome


class LocalRuntime:
    def __init__(self, client: FedClient, faults: FaultsConfig | None = None, seed: int = 0,
                 log: Callable[[str], None] = print) -> None:
        self.client, self.faults, self.seed, self.log = client, faults or FaultsConfig(), seed, log

    def _fault(self, task: Task) -> str | None:
        f = self.faults
        u = np.random.default_rng([self.seed, task.round, task.client, 99]).random()
        for name, share in (("drop", f.drop_fraction), ("fail", f.fail_fraction), ("corrupt", f.corrupt_fraction)):
            if u < share:
                return name
            u -= share
        return None

    def _run(self, task: Task, payload: Tensors) -> Outcome | None:
        fault = self._fault(task)
        if fault == "drop":
            self.log(f"round {task.round}: client {task.client} dropped out (injected)")
            return None
        if fault == "fail":  # in-process, a real exception is a bug and propagates; this one is requested
            self.log(f"round {task.round}: client {task.client} crashed (injected)")
            return None
        reply, stats = self.client.fit(task, payload)
        if fault == "corrupt":
            key = next(k for k, t in reply.tensors.items() if t.is_floating_point())
            reply = Reply(reply.task, reply.weight, {**reply.tensors, key: reply.tensors[key] * float("nan")})
        return reply, stats

    def fit(self, jobs: Sequence[Job], done: Callable[[Task], None]) -> list[Outcome]:
        outcomes = []
        for task, payload in jobs:
            outcome = self._run(task, payload)
            if outcome is not None:
                outcomes.append(outcome)
            done(task)
        return outcomes

    def validate(self, factors: Factors, head: Tensors, clients: Sequence[int]) -> dict[int, dict[str, float]]:
        return {c: self.client.validate(c, factors, head) for c in clients}

    def close(self) -> None:
        """Nothing to release: clients live in this process."""
