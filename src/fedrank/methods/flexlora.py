"""FlexLoRA (Bai et al. 2024): average the full updates, send each client its rank-r_k SVD."""

from __future__ import annotations

from collections.abc import Sequence

from fedrank import aggregation
from fedrank.methods.base import (Method, Reply, Task, Tensors, compact, empty_factors, fresh_factors, pack,
                                  per_layer, truncate, unpack)


class FlexLoRA(Method):
    """Server keeps ``ΔW_g = Σ_k p_k B_k A_k`` as the FLoRA stack; client k receives the best rank-r_k
    approximation (``B = U_r S_r``, ``A = V_rᵀ``), computed from QR factors of the stack.
    Before any round has finished, clients start from the shared LoRA init.
    """

    name = "flexlora"

    def init_state(self) -> Tensors:
        return pack(empty_factors(self.shapes))

    def payload(self, state: Tensors, task: Task) -> Tensors:
        stacked = unpack(state)
        if all(A.shape[0] == 0 for A, _ in stacked.values()):
            return pack(truncate(fresh_factors(self.shapes, self.global_rank, self.seed), task.rank))
        return pack({layer: aggregation.flexlora([A], [B], [1.0], [task.rank])[0]
                     for layer, (A, B) in stacked.items()})

    def aggregate(self, state: Tensors, replies: Sequence[Reply]) -> Tensors:
        return pack(per_layer(replies, self.shapes,
                              lambda layer, As, Bs, w: compact(*aggregation.flora_stack(As, Bs, w))))
