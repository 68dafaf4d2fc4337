"""Zero padding (HetLoRA without norm weighting): ``X_g = Σ_k p_k pad0(X_k, R)``."""

from __future__ import annotations

from torch import Tensor

from fedrank import aggregation
from fedrank.methods.truncation import TruncationMethod


class ZeroPad(TruncationMethod):
    """Slot j is not renormalised: slots held by few clients shrink toward zero."""

    name = "zeropad"

    def combine(self, As: list[Tensor], Bs: list[Tensor], weights: list[float],
                prev: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return aggregation.zero_pad(As, Bs, weights, self.global_rank)
