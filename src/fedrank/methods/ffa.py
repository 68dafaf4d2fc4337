"""FFA-LoRA: A frozen at a shared seeded initialisation; only B is trained and averaged."""

from __future__ import annotations

from collections.abc import Sequence

from fedrank import aggregation
from fedrank.methods.base import (Factors, LocalStart, Method, Reply, Task, Tensors, fresh_factors, pack, per_layer,
                                  truncate, unpack)


class FFALoRA(Method):
    """Every client regenerates the same ``A`` from the seed, so only ``B[:, :r_k]`` travels.

    With a common A, zero padding of B is exact: ``Σ_k p_k pad0(B_k) A = Σ_k p_k B_k A_k``.
    """

    name = "ffa"
    rank_ordered = True

    def frozen_A(self, rank: int) -> Factors:
        return truncate(fresh_factors(self.shapes, self.global_rank, self.seed), rank)

    def payload(self, state: Tensors, task: Task) -> Tensors:
        return {f"{layer}#B": B[:, : task.rank].clone() for layer, (_, B) in unpack(state).items()}

    def local_start(self, payload: Tensors, task: Task) -> LocalStart:
        received = unpack(payload)
        init = {layer: (A, received[layer][1]) for layer, (A, _) in self.frozen_A(task.rank).items()}
        return LocalStart(init=init, train_A=False)

    def upload(self, start: LocalStart, trained: Factors, task: Task) -> Tensors:
        return {f"{layer}#B": B for layer, (_, B) in trained.items()}

    def upload_spec(self, task: Task) -> dict[str, tuple[int, ...]]:
        return {f"{layer}#B": (m, task.rank) for layer, (m, _) in self.shapes.items()}

    def aggregate(self, state: Tensors, replies: Sequence[Reply]) -> Tensors:
        fixed = unpack(state)

        def combine(layer, As, Bs, w):
            A = fixed[layer][0]
            _, B = aggregation.zero_pad([A[: B.shape[1]] for B in Bs], Bs, w, self.global_rank)
            return A, B

        return pack(per_layer(replies, self.shapes, combine))
