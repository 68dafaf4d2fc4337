"""Update-space padding: zero padding of each client's change, not of its weights."""

from __future__ import annotations

from torch import Tensor

from fedrank import aggregation
from fedrank.methods.truncation import TruncationMethod


class UpdatePad(TruncationMethod):
    """``X_g = prev + Σ_k p_k pad0(X_k − prev[:r_k])``: a slot held by few clients moves by their share of the
    round (replication moves it all the way to their mean; weight-space zero padding pulls it toward zero)."""

    name = "updatepad"

    def combine(self, As: list[Tensor], Bs: list[Tensor], weights: list[float],
                prev: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return aggregation.update_pad(As, Bs, weights, self.global_rank, prev=prev)
