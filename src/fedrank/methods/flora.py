"""FLoRA (Wang et al. 2024): stacking, merged into the base; clients restart LoRA every round."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrank import aggregation
from fedrank.methods.base import (LocalStart, Method, Reply, Task, Tensors, compact, empty_factors, fresh_factors,
                                  pack, per_layer, unpack)


class FLoRA(Method):
    """Server: ``A_st = [p_k A_k]``, ``B_st = [B_k]`` so ``B_st A_st = Σ p_k B_k A_k`` exactly; the stack is
    merged into the global base (kept as factors of at most ``min(m, n)`` slots).

    Clients are stateless, so each payload carries the whole merged update since round 1, which the
    client folds into its frozen base before starting a fresh rank-r_k LoRA (seeded A, zero B).  A
    deployment where every client receives every round's broadcast could send just that round's stack.
    """

    name = "flora"

    def init_state(self) -> Tensors:
        return pack(empty_factors(self.shapes))

    def payload(self, state: Tensors, task: Task) -> Tensors:
        return dict(state)

    def local_start(self, payload: Tensors, task: Task) -> LocalStart:
        stream = f"flora/{task.round}/{task.client}"
        return LocalStart(init=fresh_factors(self.shapes, task.rank, self.seed, stream), fold=unpack(payload))

    def aggregate(self, state: Tensors, replies: Sequence[Reply]) -> Tensors:
        merged = unpack(state)

        def combine(layer, As, Bs, w):
            A_st, B_st = aggregation.flora_stack(As, Bs, w)
            A_prev, B_prev = merged[layer]
            return compact(torch.cat([A_prev, A_st]), torch.cat([B_prev, B_st], dim=1))

        return pack(per_layer(replies, self.shapes, combine))
