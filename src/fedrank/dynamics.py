"""Per-round diagnostics of how a rank-ordered global adapter moves (``eval.dynamics``).

Products are never formed densely: for ``X = B_x A_x`` and ``Y = B_y A_y``,
``⟨X, Y⟩_F = Σ (B_xᵀ B_y) ⊙ (A_x A_yᵀ)``, and ``B_c A_c − B_p A_p = [B_c, −B_p] [A_c; A_p]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedrank.methods.base import Factors


def inner(x: Factors, y: Factors) -> float:
    """``Σ_layers ⟨B_x A_x, B_y A_y⟩_F`` in float64."""
    total = 0.0
    for layer, (A_x, B_x) in x.items():
        A_y, B_y = y[layer]
        total += float(((B_x.double().T @ B_y.double()) * (A_x.double() @ A_y.double().T)).sum())
    return total


def slots(factors: Factors, start: int, stop: int | None = None) -> Factors:
    """Slots ``start..stop-1`` of every layer: ``A[start:stop]``, ``B[:, start:stop]``."""
    return {layer: (A[start:stop], B[:, start:stop]) for layer, (A, B) in factors.items()}


def difference(current: Factors, previous: Factors) -> Factors:
    """Factors of ``B_c A_c − B_p A_p``."""
    return {layer: (torch.cat([A, previous[layer][0]]), torch.cat([B, -previous[layer][1]], dim=1))
            for layer, (A, B) in current.items()}


def cosine(x: Factors, y: Factors) -> float | None:
    """Cosine between two products (None when either is zero)."""
    norm = math.sqrt(max(inner(x, x), 0.0) * max(inner(y, y), 0.0))
    return inner(x, y) / norm if norm > 0 else None


def tier_norms(factors: Factors, tiers: Sequence[int], scale: float) -> dict[str, float]:
    """``tier_norm_r<t>``: ``‖s Σ_{j ∈ [t_prev, t)} B_j A_j‖_F`` over all layers, for each tier ``t``."""
    bounds = [0, *sorted(tiers)]
    return {f"tier_norm_r{hi}": scale * math.sqrt(max(inner(part, part), 0.0))
            for lo, hi in zip(bounds, bounds[1:]) for part in [slots(factors, lo, hi)]}


def update_cosine(before: Factors, previous: Factors, current: Factors) -> float | None:
    """Cosine between this round's change ``current − previous`` and the last round's ``previous − before``."""
    return cosine(difference(current, previous), difference(previous, before))
