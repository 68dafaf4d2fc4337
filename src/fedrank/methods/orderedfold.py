"""Ordered fold: replication's server with Fed-PLoRA's fold, on the first r_k slots instead of a random pick."""

from __future__ import annotations

from fedrank.methods.base import LocalStart, Task, Tensors, unpack
from fedrank.methods.replication import Replication


class OrderedFold(Replication):
    """Client k receives all R slots, trains slots ``1..r_k`` warm-started from the global values and folds
    ``r_k+1..R`` into its frozen base: ``W = W0 + s Σ_{j>r_k} B_j A_j``, so it trains inside the full global
    model.  The server keeps replication's per-slot mean over the holders.
    """

    name = "orderedfold"

    def payload(self, state: Tensors, task: Task) -> Tensors:
        return dict(state)

    def local_start(self, payload: Tensors, task: Task) -> LocalStart:
        r = task.rank
        slots = unpack(payload)
        return LocalStart(init={layer: (A[:r].clone(), B[:, :r].clone()) for layer, (A, B) in slots.items()},
                          fold={layer: (A[r:], B[:, r:]) for layer, (A, B) in slots.items()})
