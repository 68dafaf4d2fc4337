"""HetLoRA (Cho et al. 2024): zero padding with ``p_k ∝ n_k · ‖B_k A_k‖_F``."""

from __future__ import annotations

from torch import Tensor

from fedrank import aggregation
from fedrank.methods.truncation import TruncationMethod


class HetLoRA(TruncationMethod):
    """Clients whose update is larger count more; missing slots are zeros."""

    name = "hetlora"

    def combine(self, As: list[Tensor], Bs: list[Tensor], weights: list[float],
                prev: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return aggregation.hetlora(As, Bs, weights, self.global_rank)
