"""Replication padding (Byun & Lee, NAACL 2025)."""

from __future__ import annotations

from torch import Tensor

from fedrank import aggregation
from fedrank.methods.truncation import TruncationMethod


class Replication(TruncationMethod):
    """Slot j is the weighted mean over the clients holding it; a slot nobody sampled holds keeps its value."""

    name = "replication"

    def combine(self, As: list[Tensor], Bs: list[Tensor], weights: list[float],
                prev: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return aggregation.replicate_pad(As, Bs, weights, self.global_rank, prev=prev)
