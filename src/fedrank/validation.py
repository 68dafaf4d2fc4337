"""Server-side checks of client replies: keys, shapes for the rank the client was given, finiteness, norm.

A reply that fails is rejected with a reason; the round goes on with the others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedrank.methods import Method, Task, Tensors


def check_reply(method: Method, task: Task, tensors: Tensors, head: Tensors, reference_head: Tensors,
                max_norm: float = 0.0, clip: bool = True) -> tuple[Tensors, Tensors] | str:
    """The (possibly clipped) method tensors and head, or the reason the reply is rejected.

    ``max_norm > 0`` bounds the L2 norm of the uploaded method tensors (all floats together);
    above it the upload is scaled down to the bound (``clip``) or rejected.
    """
    expected = method.upload_spec(task)
    if set(tensors) != set(expected):
        extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        return f"wrong keys (unexpected {extra[:3]}, missing {missing[:3]})"
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            return f"{key} has shape {tuple(tensors[key].shape)}, expected {shape} for rank {task.rank}"
    if set(head) != set(reference_head):
        return "wrong head keys"
    for key, t in head.items():
        if t.shape != reference_head[key].shape:
            return f"head {key} has shape {tuple(t.shape)}, expected {tuple(reference_head[key].shape)}"
    for key, t in {**tensors, **head}.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{key} has non-finite values"
    reason = method.check_upload(tensors, task)
    if reason:
        return reason
    if max_norm > 0:
        floats = [t for t in tensors.values() if t.is_floating_point()]
        norm = math.sqrt(sum(float(t.double().square().sum()) for t in floats))
        if norm > max_norm:
            if not clip:
                return f"update norm {norm:.4g} exceeds server.max_update_norm={max_norm:g}"
            tensors = {k: _scaled(t, max_norm / norm) for k, t in tensors.items()}
    return tensors, head


def _scaled(t: Tensor, factor: float) -> Tensor:
    return t * factor if t.is_floating_point() else t
