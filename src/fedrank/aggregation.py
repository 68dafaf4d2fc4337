"""Server-side aggregation math for ONE adapted layer (DESIGN.md §2).

Client ``k`` holds ``A_k`` of shape ``(r_k, n)`` and ``B_k`` of shape ``(m, r_k)``;
its update is ``ΔW_k = s · B_k A_k``.  A *rank slot* ``j`` is row ``j`` of ``A``
together with column ``j`` of ``B``.  ``weights`` are non-negative per-client
weights ``w_k``; every function normalises them to ``p_k = w_k / Σ w``.

Pure tensor code: no PEFT or Flower imports.  Outputs keep the inputs' dtype
and device.  Bad input raises ``ValueError`` saying what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]
Weights = Sequence[float] | Tensor

__all__ = [
    "fedavg",
    "zero_pad",
    "replicate_pad",
    "update_pad",
    "hetlora",
    "flora_stack",
    "flexlora",
    "plora",
    "product_norms",
    "weighted_mean",
]


# --------------------------------------------------------------------------- validation


def _check_factors(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[int, int, list[int]]:
    """Return ``(m, n, ranks)`` after checking shapes, dtypes and devices agree."""
    if len(As) == 0:
        raise ValueError("no client factors given: pass at least one (A, B) pair")
    if len(As) != len(Bs):
        raise ValueError(f"got {len(As)} A factors but {len(Bs)} B factors: pass one of each per client")
    m, n = Bs[0].shape[0], As[0].shape[-1]
    dtype, device = As[0].dtype, As[0].device
    ranks = []
    for k, (A, B) in enumerate(zip(As, Bs)):
        if A.ndim != 2 or B.ndim != 2:
            raise ValueError(f"client {k}: A and B must be 2-D, got A{tuple(A.shape)} and B{tuple(B.shape)}")
        if A.shape[0] != B.shape[1]:
            raise ValueError(
                f"client {k}: A has rank {A.shape[0]} but B has rank {B.shape[1]}: "
                "A must be (r, n) and B (m, r) with the same r"
            )
        if A.shape[1] != n or B.shape[0] != m:
            raise ValueError(
                f"client {k}: layer shape is m={B.shape[0]}, n={A.shape[1]} but client 0 has m={m}, n={n}: "
                "all clients must send factors of the same layer"
            )
        if A.dtype != dtype or B.dtype != dtype or A.device != device or B.device != device:
            raise ValueError(f"client {k}: factors must share dtype and device with client 0 ({dtype}, {device})")
        ranks.append(int(A.shape[0]))
    return m, n, ranks


def _normalised(weights: Weights, count: int, like: Tensor) -> Tensor:
    """``p_k = w_k / Σ w`` as a 1-D tensor of ``like``'s dtype and device."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != count:
        raise ValueError(f"got {w.numel()} weights for {count} clients: pass one weight per client")
    if not torch.isfinite(w).all():
        raise ValueError("weights must be finite")
    if (w < 0).any():
        raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights are all zero: at least one client needs a positive weight")
    return (w / total).to(dtype=like.dtype, device=like.device)


def _check_rank(ranks: Sequence[int], rank: int) -> None:
    if rank <= 0:
        raise ValueError(f"global rank must be positive, got {rank}")
    for k, r in enumerate(ranks):
        if r > rank:
            raise ValueError(f"client {k} has rank {r}, above the global rank {rank}: raise `rank` or truncate the client")


def _check_prev(prev: Factors | None, m: int, n: int, rank: int) -> None:
    if prev is None:
        return
    A_prev, B_prev = prev
    if tuple(A_prev.shape) != (rank, n) or tuple(B_prev.shape) != (m, rank):
        raise ValueError(
            f"prev factors have shapes A{tuple(A_prev.shape)}, B{tuple(B_prev.shape)}; "
            f"expected A({rank}, {n}) and B({m}, {rank})"
        )


def _check_slots(slots: Sequence[Sequence[int]], ranks: Sequence[int], rank: int) -> list[Tensor]:
    if len(slots) != len(ranks):
        raise ValueError(f"got slot lists for {len(slots)} clients but factors for {len(ranks)}")
    out = []
    for k, (idx, r) in enumerate(zip(slots, ranks)):
        idx_list = [int(i) for i in idx]
        if len(idx_list) != r:
            raise ValueError(f"client {k} lists {len(idx_list)} slots but its factors have rank {r}")
        if any(i < 0 or i >= rank for i in idx_list):
            raise ValueError(f"client {k}: slot indices {idx_list} out of range [0, {rank})")
        if len(set(idx_list)) != len(idx_list):
            raise ValueError(f"client {k}: slot indices {idx_list} are repeated")
        out.append(torch.tensor(idx_list, dtype=torch.long))
    return out


# --------------------------------------------------------------------------- shared kernels


def _slot_mean(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    p: Tensor,
    slots: Sequence[Tensor],
    m: int,
    n: int,
    rank: int,
    prev: Factors | None,
) -> Factors:
    """Per-slot weighted mean over the clients holding each slot.

    ``X_g[j] = Σ_{k ∋ j} p_k X_k[j] / Σ_{k ∋ j} p_k``; a slot with no holder
    (or only zero-weight holders) takes ``prev`` (zeros when ``prev`` is None).
    """
    A_like = As[0]
    num_A = A_like.new_zeros(rank, n)
    num_B = A_like.new_zeros(m, rank)
    mass = A_like.new_zeros(rank)
    for A, B, pk, idx in zip(As, Bs, p, slots):
        idx = idx.to(A.device)
        num_A.index_add_(0, idx, pk * A)
        num_B.index_add_(1, idx, pk * B)
        mass.index_add_(0, idx, pk.expand(idx.numel()))
    held = mass > 0
    safe = torch.where(held, mass, torch.ones_like(mass))
    A_g, B_g = num_A / safe[:, None], num_B / safe[None, :]
    A_prev, B_prev = prev if prev is not None else (torch.zeros_like(A_g), torch.zeros_like(B_g))
    A_g = torch.where(held[:, None], A_g, A_prev.to(A_g))
    B_g = torch.where(held[None, :], B_g, B_prev.to(B_g))
    return A_g, B_g


def product_norms(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> Tensor:
    """``‖B_k A_k‖_F`` per client, via ``trace((BᵀB)(AAᵀ))`` without forming ``B_k A_k``."""
    return torch.stack([((B.T @ B) * (A @ A.T)).sum().clamp_min(0).sqrt() for A, B in zip(As, Bs)])


# --------------------------------------------------------------------------- methods


def fedavg(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Weights) -> Factors:
    """FedIT: ``A = Σ p_k A_k``, ``B = Σ p_k B_k``; every client must have the same rank."""
    _, _, ranks = _check_factors(As, Bs)
    if len(set(ranks)) != 1:
        raise ValueError(f"fedavg needs equal ranks, got {ranks}: use zero_pad or replicate_pad for mixed ranks")
    p = _normalised(weights, len(As), As[0])
    A = torch.einsum("k,krn->rn", p, torch.stack(list(As)))
    B = torch.einsum("k,kmr->mr", p, torch.stack(list(Bs)))
    return A, B


def zero_pad(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Weights, rank: int) -> Factors:
    """HetLoRA-style zero padding: ``X_g = Σ_k p_k pad0(X_k, rank)``.

    Slot ``j`` is not renormalised, so a slot held by clients of total weight
    ``P_j < 1`` is shrunk by ``P_j`` (the dilution Byun & Lee point out).
    """
    m, n, ranks = _check_factors(As, Bs)
    _check_rank(ranks, rank)
    p = _normalised(weights, len(As), As[0])
    A_g = As[0].new_zeros(rank, n)
    B_g = As[0].new_zeros(m, rank)
    for A, B, pk, r in zip(As, Bs, p, ranks):
        A_g[:r] += pk * A
        B_g[:, :r] += pk * B
    return A_g, B_g


def replicate_pad(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Weights,
    rank: int,
    prev: Factors | None = None,
) -> Factors:
    """Byun & Lee replication padding.

    Client k's missing slots ``j ≥ r_k`` are filled with the holders' aggregate
    ``H_j = Σ_{r_k>j} p_k X_k[j] / Σ_{r_k>j} p_k``, then ``X_g = Σ_k p_k padded_k``,
    which equals ``H_j``: the weighted mean over the clients holding slot j.
    A slot nobody holds keeps ``prev`` (zeros if None).
    """
    m, n, ranks = _check_factors(As, Bs)
    _check_rank(ranks, rank)
    _check_prev(prev, m, n, rank)
    p = _normalised(weights, len(As), As[0])
    slots = [torch.arange(r) for r in ranks]
    return _slot_mean(As, Bs, p, slots, m, n, rank, prev)


def update_pad(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Weights,
    rank: int,
    prev: Factors | None = None,
) -> Factors:
    """Update-space zero padding: ``X_g = prev + Σ_k p_k pad0(X_k − prev[:r_k], rank)``.

    ``p`` is normalised over ALL clients of the round, so a slot held by clients of total
    weight ``P_j`` moves by ``P_j`` times their mean update: between replication (a full step
    to the holders' mean) and weight-space zero padding (a pull toward zero).  A slot nobody
    holds keeps ``prev``.  Equal ranks give FedAvg; ``prev=None`` (zeros) gives ``zero_pad``.
    """
    m, n, ranks = _check_factors(As, Bs)
    _check_rank(ranks, rank)
    _check_prev(prev, m, n, rank)
    if prev is None:
        return zero_pad(As, Bs, weights, rank)
    A_prev, B_prev = (x.to(As[0]) for x in prev)
    dA, dB = zero_pad([A - A_prev[:r] for A, r in zip(As, ranks)],
                      [B - B_prev[:, :r] for B, r in zip(Bs, ranks)], weights, rank)
    return A_prev + dA, B_prev + dB


def hetlora(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Weights, rank: int) -> Factors:
    """HetLoRA (Cho et al. 2024): zero padding with ``p_k ∝ w_k · ‖B_k A_k‖_F``.

    If every product is zero (e.g. all B still at their zero init) the norms
    carry no information and the plain weights ``w_k`` are used.
    """
    _check_factors(As, Bs)
    w = _normalised(weights, len(As), As[0])
    scored = w * product_norms(As, Bs)
    return zero_pad(As, Bs, scored if scored.sum() > 0 else w, rank)


def flora_stack(As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Weights) -> Factors:
    """FLoRA stacking: ``A_st = [p_1 A_1; …; p_K A_K]``, ``B_st = [B_1 … B_K]``.

    Exact: ``B_st A_st = Σ_k p_k B_k A_k``.  Shapes ``(Σ r_k, n)`` and ``(m, Σ r_k)``.
    """
    _check_factors(As, Bs)
    p = _normalised(weights, len(As), As[0])
    A_st = torch.cat([pk * A for pk, A in zip(p, As)], dim=0)
    B_st = torch.cat(list(Bs), dim=1)
    return A_st, B_st


def _svd_of_product(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``B A = U diag(S) Vᵀ``; through QR of the factors when their rank is below min(m, n)."""
    if A.shape[0] >= min(B.shape[0], A.shape[1]):
        U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
        return U, S, Vh.T
    Q_B, R_B = torch.linalg.qr(B, mode="reduced")
    Q_A, R_A = torch.linalg.qr(A.T, mode="reduced")
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.T, full_matrices=False)
    return Q_B @ U_c, S, Q_A @ Vh_c.T


def flexlora(
    As: Sequence[Tensor], Bs: Sequence[Tensor], weights: Weights, ranks: Sequence[int]
) -> list[Factors]:
    """FlexLoRA: rank-``ranks[k]`` truncated SVD of ``ΔW = Σ_k p_k B_k A_k`` for each client.

    Computed without the dense ``m×n`` matrix: with ``B_st = Q_B R_B`` and
    ``A_stᵀ = Q_A R_A`` (reduced QR of the FLoRA stack), ``ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ``
    and the SVD of the small core ``R_B R_Aᵀ = U' S V'ᵀ`` gives ``U = Q_B U'``,
    ``V = Q_A V'``.  When ``Σ r_k ≥ min(m, n)`` the dense product is no larger than
    the stack, and its SVD is taken directly.  Split: ``B_k = U_r S_r``, ``A_k = V_rᵀ`` (orthonormal rows).
    Ranks beyond ``rank(ΔW)``'s available dimension are zero-filled.
    """
    m, n, _ = _check_factors(As, Bs)
    targets = [int(r) for r in ranks]
    if any(r <= 0 for r in targets):
        raise ValueError(f"flexlora target ranks must be positive, got {targets}")
    A_st, B_st = flora_stack(As, Bs, weights)
    U, S, V = _svd_of_product(B_st, A_st)
    out = []
    for r in targets:
        keep = min(r, S.numel())
        A_k = As[0].new_zeros(r, n)
        B_k = As[0].new_zeros(m, r)
        A_k[:keep] = V[:, :keep].T
        B_k[:, :keep] = U[:, :keep] * S[:keep]
        out.append((A_k, B_k))
    return out


def plora(
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    weights: Weights,
    slots: Sequence[Sequence[int]],
    rank: int,
    prev: Factors | None = None,
) -> Factors:
    """Fed-PLoRA: ``rank`` parallel one-rank modules; client k trained the modules ``slots[k]``.

    Module ``j`` is the weighted mean over the clients that picked it
    (``p_k`` renormalised among them); an unpicked module keeps ``prev``
    (zeros if None).  Row ``i`` of ``A_k`` is module ``slots[k][i]``.
    """
    m, n, ranks = _check_factors(As, Bs)
    _check_rank(ranks, rank)
    _check_prev(prev, m, n, rank)
    idx = _check_slots(slots, ranks, rank)
    p = _normalised(weights, len(As), As[0])
    return _slot_mean(As, Bs, p, idx, m, n, rank, prev)


def weighted_mean(tensors: Sequence[dict[str, Tensor]], weights: Weights) -> dict[str, Tensor]:
    """FedAvg of dense parameters (e.g. the task head): ``Σ_k p_k X_k`` per key."""
    if not tensors:
        raise ValueError("no client tensors given: pass at least one")
    if not tensors[0]:  # nothing to average (e.g. a causal LM has no task head)
        return {}
    p = _normalised(weights, len(tensors), next(iter(tensors[0].values())))
    return {key: sum(pk * t[key] for pk, t in zip(p, tensors)) for key in tensors[0]}
