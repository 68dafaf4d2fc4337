"""FedIT: FedAvg of A and of B; every client has the same rank."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from fedrank import aggregation
from fedrank.methods.base import single_tier
from fedrank.methods.truncation import TruncationMethod


class FedIT(TruncationMethod):
    """``A = Σ p_k A_k``, ``B = Σ p_k B_k`` (equal ranks only)."""

    name = "fedit"

    def check_tiers(self, tiers: Sequence[int]) -> None:
        single_tier(self.name, tiers)

    def combine(self, As: list[Tensor], Bs: list[Tensor], weights: list[float],
                prev: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return aggregation.fedavg(As, Bs, weights)
