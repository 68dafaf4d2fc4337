"""Fed-PLoRA (Zhang, Hu & Xu, 2026): R parallel one-rank modules with Select-N-Fold."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedrank import aggregation
from fedrank.methods.base import (Factors, LocalStart, Method, Reply, Task, Tensors, pack, per_layer,
                                  task_generator, unpack)


class FedPLoRA(Method):
    """Client k picks ``r_k`` of the R modules (seeded, uniform each round), trains them, and folds the rest.

    Server: module j is the weighted mean over the clients that picked it; an unpicked module
    keeps its value.  Client start: ``W = W0 + s Σ_{j∉K} B_j A_j`` frozen, modules K warm-started
    from the global values, so the starting model equals the global model exactly.
    """

    name = "fedplora"

    def select(self, task: Task) -> Tensor:
        """The sorted module indices K that this client trains this round."""
        gen = task_generator(self.seed, task, "plora-select")
        return torch.randperm(self.global_rank, generator=gen)[: task.rank].sort().values

    def payload(self, state: Tensors, task: Task) -> Tensors:
        return dict(state)

    def local_start(self, payload: Tensors, task: Task) -> LocalStart:
        picked = self.select(task)
        rest = torch.ones(self.global_rank, dtype=torch.bool)
        rest[picked] = False
        modules = unpack(payload)
        return LocalStart(
            init={layer: (A[picked].clone(), B[:, picked].clone()) for layer, (A, B) in modules.items()},
            fold={layer: (A[rest], B[:, rest]) for layer, (A, B) in modules.items()},
        )

    def upload(self, start: LocalStart, trained: Factors, task: Task) -> Tensors:
        return {**pack(trained), "slots": self.select(task)}

    def upload_spec(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {**super().upload_spec(task), "slots": (task.rank,)}

    def check_upload(self, tensors: Tensors, task: Task) -> str | None:
        if not torch.equal(tensors["slots"].long(), self.select(task)):
            return "slots differ from the modules this client was to train this round"
        return None

    def aggregate(self, state: Tensors, replies: Sequence[Reply]) -> Tensors:
        prev = unpack(state)
        slots = [r.tensors["slots"].tolist() for r in replies]
        return pack(per_layer(replies, self.shapes, lambda layer, As, Bs, w: aggregation.plora(
            As, Bs, w, slots, self.global_rank, prev=prev[layer])))
