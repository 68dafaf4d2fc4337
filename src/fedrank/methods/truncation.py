"""Shared server/client halves of the methods whose clients train the first r_k global slots."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from torch import Tensor

from fedrank.methods.base import Method, Reply, Task, Tensors, pack, per_layer, truncate, unpack


class TruncationMethod(Method):
    """Client k receives ``A_g[:r_k]``, ``B_g[:, :r_k]``, trains them and sends them back.

    Subclasses state only how one layer's replies combine into the global factors.
    """

    rank_ordered = True

    def payload(self, state: Tensors, task: Task) -> Tensors:
        return pack(truncate(unpack(state), task.rank))

    def aggregate(self, state: Tensors, replies: Sequence[Reply]) -> Tensors:
        prev = unpack(state)
        return pack(per_layer(replies, self.shapes,
                              lambda layer, As, Bs, w: self.combine(As, Bs, w, prev[layer])))

    @abstractmethod
    def combine(self, As: list[Tensor], Bs: list[Tensor], weights: list[float],
                prev: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One layer's global ``(A, B)`` of rank R from the clients' factors."""
