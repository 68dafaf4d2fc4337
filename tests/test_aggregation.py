"""Aggregation math against independent float64 numpy references, plus invariants and bad input.

The references below follow the papers' formulations literally (dense products,
explicit padding, dense SVD), not the implementation's shortcuts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from fedrank import aggregation as agg

# --------------------------------------------------------------------------- numpy references


def ref_weights(w):
    w = np.asarray(w, dtype=np.float64)
    return w / w.sum()


def ref_zero_pad(As, Bs, w, R):
    p = ref_weights(w)
    n, m = As[0].shape[1], Bs[0].shape[0]
    A = sum(pk * np.vstack([a, np.zeros((R - a.shape[0], n))]) for pk, a in zip(p, As))
    B = sum(pk * np.hstack([b, np.zeros((m, R - b.shape[1]))]) for pk, b in zip(p, Bs))
    return A, B


def ref_replicate_pad(As, Bs, w, R, prev=None):
    """Byun & Lee as written: fill each client's missing slots with the holders' aggregate, then average."""
    p = ref_weights(w)
    n, m = As[0].shape[1], Bs[0].shape[0]
    H_A, H_B = np.zeros((R, n)), np.zeros((m, R))
    held = np.zeros(R, dtype=bool)
    for j in range(R):
        holders = [k for k, a in enumerate(As) if a.shape[0] > j and p[k] > 0]
        if holders:
            held[j] = True
            mass = sum(p[k] for k in holders)
            H_A[j] = sum(p[k] * As[k][j] for k in holders) / mass
            H_B[:, j] = sum(p[k] * Bs[k][:, j] for k in holders) / mass
    A, B = np.zeros((R, n)), np.zeros((m, R))
    for pk, a, b in zip(p, As, Bs):
        pa, pb = H_A.copy(), H_B.copy()
        pa[: a.shape[0]], pb[:, : b.shape[1]] = a, b
        A += pk * pa
        B += pk * pb
    if prev is not None:
        A[~held], B[:, ~held] = prev[0][~held], prev[1][:, ~held]
    return A, B


def ref_update_pad(As, Bs, w, R, prev):
    """Update-space padding as written: each client's change from the global factors, zero-padded, averaged
    with weights normalised over every client, added to the global factors."""
    p = ref_weights(w)
    A, B = prev[0].copy(), prev[1].copy()
    for pk, a, b in zip(p, As, Bs):
        r = a.shape[0]
        dA, dB = np.zeros_like(A), np.zeros_like(B)
        dA[:r], dB[:, :r] = a - prev[0][:r], b - prev[1][:, :r]
        A += pk * dA
        B += pk * dB
    return A, B


def ref_plora(As, Bs, w, slots, R, prev=None):
    p = ref_weights(w)
    n, m = As[0].shape[1], Bs[0].shape[0]
    A = np.zeros((R, n)) if prev is None else prev[0].copy()
    B = np.zeros((m, R)) if prev is None else prev[1].copy()
    for j in range(R):
        rows = [(k, list(s).index(j)) for k, s in enumerate(slots) if j in s and p[k] > 0]
        if rows:
            mass = sum(p[k] for k, _ in rows)
            A[j] = sum(p[k] * As[k][i] for k, i in rows) / mass
            B[:, j] = sum(p[k] * Bs[k][:, i] for k, i in rows) / mass
    return A, B


def ref_delta(As, Bs, w):
    p = ref_weights(w)
    return sum(pk * b @ a for pk, a, b in zip(p, As, Bs))


def ref_best_rank(M, r):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r], S


# --------------------------------------------------------------------------- random cases


@dataclass
class Case:
    As: list[np.ndarray]
    Bs: list[np.ndarray]
    w: np.ndarray
    R: int

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a in self.As]

    def torch(self, dtype=torch.float64):
        return [torch.tensor(a, dtype=dtype) for a in self.As], [torch.tensor(b, dtype=dtype) for b in self.Bs]


def make_case(seed: int, m: int, n: int, ranks: list[int], R: int | None = None, zero_weight: int | None = None) -> Case:
    rng = np.random.default_rng(seed)
    As = [rng.standard_normal((r, n)) for r in ranks]
    Bs = [rng.standard_normal((m, r)) for r in ranks]
    w = rng.uniform(0.1, 3.0, len(ranks))
    if zero_weight is not None:
        w[zero_weight] = 0.0
    return Case(As, Bs, w, R or max(ranks))


SHAPES = [(1, 1), (7, 5), (16, 32), (48, 24)]
RANK_SETS = [[1], [3, 3, 3], [1, 2, 4, 8], [8, 2, 5], [4, 4, 1, 6, 2]]
CASES = [
    pytest.param(make_case(seed, m, n, ranks, R=max(ranks) + extra), id=f"m{m}n{n}-r{ranks}-R+{extra}")
    for seed, ((m, n), ranks, extra) in enumerate(itertools.product(SHAPES, RANK_SETS, [0, 2]))
]


def close(x: torch.Tensor, ref: np.ndarray, tol: float = 1e-10) -> None:
    np.testing.assert_allclose(x.numpy(), ref, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- against references


@pytest.mark.parametrize("case", CASES)
def test_zero_pad_matches_reference(case: Case) -> None:
    A, B = agg.zero_pad(*case.torch(), case.w, case.R)
    rA, rB = ref_zero_pad(case.As, case.Bs, case.w, case.R)
    close(A, rA), close(B, rB)


@pytest.mark.parametrize("case", CASES)
def test_replicate_pad_matches_paper_formulation(case: Case) -> None:
    A, B = agg.replicate_pad(*case.torch(), case.w, case.R)
    rA, rB = ref_replicate_pad(case.As, case.Bs, case.w, case.R)
    close(A, rA), close(B, rB)


@pytest.mark.parametrize("case", CASES)
def test_replicate_pad_unheld_slots_keep_prev(case: Case) -> None:
    rng = np.random.default_rng(1)
    prev = (rng.standard_normal((case.R, case.As[0].shape[1])), rng.standard_normal((case.Bs[0].shape[0], case.R)))
    A, B = agg.replicate_pad(*case.torch(), case.w, case.R, prev=tuple(torch.tensor(x) for x in prev))
    rA, rB = ref_replicate_pad(case.As, case.Bs, case.w, case.R, prev=prev)
    close(A, rA), close(B, rB)
    top = max(case.ranks)
    close(A[top:], prev[0][top:], 0), close(B[:, top:], prev[1][:, top:], 0)


@pytest.mark.parametrize("case", CASES)
def test_replicate_slot_is_weighted_mean_of_holders(case: Case) -> None:
    A, _ = agg.replicate_pad(*case.torch(), case.w, case.R)
    for j in range(max(case.ranks)):
        holders = [k for k, r in enumerate(case.ranks) if r > j]
        mean = np.average([case.As[k][j] for k in holders], axis=0, weights=case.w[holders])
        close(A[j], mean)


def case_prev(case: Case, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((case.R, case.As[0].shape[1])), rng.standard_normal((case.Bs[0].shape[0], case.R))


@pytest.mark.parametrize("case", CASES)
def test_update_pad_matches_reference(case: Case) -> None:
    prev = case_prev(case)
    A, B = agg.update_pad(*case.torch(), case.w, case.R, prev=tuple(torch.tensor(x) for x in prev))
    rA, rB = ref_update_pad(case.As, case.Bs, case.w, case.R, prev)
    close(A, rA), close(B, rB)
    top = max(case.ranks)  # slots nobody holds keep prev exactly
    close(A[top:], prev[0][top:], 0), close(B[:, top:], prev[1][:, top:], 0)


@pytest.mark.parametrize("case", CASES)
def test_update_pad_without_prev_is_zero_pad(case: Case) -> None:
    for x, y in zip(agg.update_pad(*case.torch(), case.w, case.R), agg.zero_pad(*case.torch(), case.w, case.R)):
        close(x, y.numpy(), 0)


def test_update_pad_moves_a_sparse_slot_by_its_holders_share() -> None:
    """One rank-8 client of weight 1 among three rank-2 clients: slots 2..7 move a quarter of its change,
    where replication jumps to its value and zero padding shrinks them to a quarter of its value."""
    case = make_case(0, 8, 8, [2, 2, 2, 8], R=8)
    case.w[:] = 1.0
    prev = case_prev(case)
    A, _ = agg.update_pad(*case.torch(), case.w, 8, prev=tuple(torch.tensor(x) for x in prev))
    close(A[2:], prev[0][2:] + 0.25 * (case.As[3][2:] - prev[0][2:]))


@pytest.mark.parametrize("case", CASES)
def test_hetlora_weights_by_product_norm(case: Case) -> None:
    A, B = agg.hetlora(*case.torch(), case.w, case.R)
    norms = np.array([np.linalg.norm(b @ a) for a, b in zip(case.As, case.Bs)])
    rA, rB = ref_zero_pad(case.As, case.Bs, case.w * norms, case.R)
    close(A, rA), close(B, rB)


@pytest.mark.parametrize("case", CASES)
def test_flora_stack_is_exact(case: Case) -> None:
    A_st, B_st = agg.flora_stack(*case.torch(), case.w)
    assert A_st.shape == (sum(case.ranks), case.As[0].shape[1])
    close(B_st @ A_st, ref_delta(case.As, case.Bs, case.w))
    p = ref_weights(case.w)
    close(A_st, np.vstack([pk * a for pk, a in zip(p, case.As)]), 1e-14)
    close(B_st, np.hstack(case.Bs), 0)


@pytest.mark.parametrize("case", CASES)
def test_flexlora_is_best_rank_r_approximation(case: Case) -> None:
    targets = case.ranks[::-1]  # deliberately not each client's own rank
    delta = ref_delta(case.As, case.Bs, case.w)
    out = agg.flexlora(*case.torch(), case.w, targets)
    for (A, B), r in zip(out, targets):
        assert A.shape == (r, delta.shape[1]) and B.shape == (delta.shape[0], r)
        best, S = ref_best_rank(delta, r)
        # Eckart–Young: the residual is the tail of the singular values.
        residual = np.linalg.norm(delta - (B @ A).numpy()) ** 2
        np.testing.assert_allclose(residual, np.sum(S[r:] ** 2), rtol=1e-8, atol=1e-8)
        if r >= len(S) or S[r - 1] - S[r] > 1e-6 * S[0]:  # unique when the gap is open
            close(B @ A, best, 1e-8)
        # documented split: A has orthonormal rows (where the rank exists)
        keep = min(r, len(S), sum(case.ranks))
        close(A[:keep] @ A[:keep].T, np.eye(keep), 1e-8)


@pytest.mark.parametrize("case", CASES)
def test_plora_matches_reference(case: Case) -> None:
    rng = np.random.default_rng(7)
    slots = [list(rng.permutation(case.R)[:r]) for r in case.ranks]
    prev = (rng.standard_normal((case.R, case.As[0].shape[1])), rng.standard_normal((case.Bs[0].shape[0], case.R)))
    A, B = agg.plora(*case.torch(), case.w, slots, case.R, prev=tuple(torch.tensor(x) for x in prev))
    rA, rB = ref_plora(case.As, case.Bs, case.w, slots, case.R, prev=prev)
    close(A, rA), close(B, rB)


# --------------------------------------------------------------------------- invariants (table-driven)

# Each entry maps a case to the global result, comparable between runs.
Method = Callable[[list[torch.Tensor], list[torch.Tensor], np.ndarray, Case], list[torch.Tensor]]


def _product(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return B @ A


def _prefix_slots(case: Case) -> list[list[int]]:
    return [list(range(r)) for r in case.ranks]


METHODS: dict[str, Method] = {
    "zero_pad": lambda As, Bs, w, c: list(agg.zero_pad(As, Bs, w, c.R)),
    "replicate_pad": lambda As, Bs, w, c: list(agg.replicate_pad(As, Bs, w, c.R)),
    "update_pad": lambda As, Bs, w, c: list(agg.update_pad(
        As, Bs, w, c.R, prev=tuple(torch.tensor(x, dtype=As[0].dtype) for x in case_prev(c)))),
    "hetlora": lambda As, Bs, w, c: list(agg.hetlora(As, Bs, w, c.R)),
    "plora": lambda As, Bs, w, c: list(agg.plora(As, Bs, w, _prefix_slots(c), c.R)),
    # stacks depend on client order; their product does not
    "flora_stack": lambda As, Bs, w, c: [_product(*agg.flora_stack(As, Bs, w))],
    "flexlora": lambda As, Bs, w, c: [B @ A for A, B in agg.flexlora(As, Bs, w, [c.R])],
}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("seed", range(3))
def test_permutation_invariant(name: str, seed: int) -> None:
    case = make_case(seed, 12, 9, [2, 5, 3, 5])
    As, Bs = case.torch()
    perm = np.random.default_rng(seed).permutation(len(As))
    base = METHODS[name](As, Bs, case.w, case)
    permuted_case = Case([case.As[i] for i in perm], [case.Bs[i] for i in perm], case.w[perm], case.R)
    shuffled = METHODS[name](*permuted_case.torch(), permuted_case.w, permuted_case)
    for x, y in zip(base, shuffled):
        close(x, y.numpy(), 1e-10)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("zero_at", [0, 2])
def test_zero_weight_client_changes_nothing(name: str, zero_at: int) -> None:
    # the zero-weight client holds the highest rank, so it would be visible if it leaked in
    case = make_case(3, 10, 8, [2, 4, 6], R=6, zero_weight=zero_at)
    case.As[zero_at] = np.random.default_rng(9).standard_normal((6, 8))
    case.Bs[zero_at] = np.random.default_rng(10).standard_normal((10, 6))
    keep = [k for k in range(3) if k != zero_at]
    reduced = Case([case.As[k] for k in keep], [case.Bs[k] for k in keep], case.w[keep], case.R)
    full = METHODS[name](*case.torch(), case.w, case)
    part = METHODS[name](*reduced.torch(), reduced.w, reduced)
    for x, y in zip(full, part):
        close(x, y.numpy(), 1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_equal_ranks_padding_methods_agree_with_fedavg(seed: int) -> None:
    case = make_case(seed, 11, 7, [4, 4, 4, 4])
    As, Bs = case.torch()
    expected = agg.fedavg(As, Bs, case.w)
    for name in ("zero_pad", "replicate_pad", "plora", "update_pad"):
        for x, y in zip(METHODS[name](As, Bs, case.w, case), expected):
            close(x, y.numpy(), 1e-12)
    close(expected[0], np.average(case.As, axis=0, weights=case.w))


@pytest.mark.parametrize("name", ["zero_pad", "replicate_pad", "update_pad", "hetlora", "plora", "flora_stack",
                                  "flexlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_keeps_dtype(name: str, dtype: torch.dtype) -> None:
    case = make_case(0, 6, 5, [1, 3])
    for x in METHODS[name](*case.torch(dtype), case.w, case):
        assert x.dtype == dtype


def test_zero_pad_dilutes_what_replication_keeps() -> None:
    """The motivating example: one high-rank client among low-rank ones."""
    case = make_case(0, 8, 8, [2, 2, 2, 8], R=8)
    case.w[:] = 1.0
    A0, _ = agg.zero_pad(*case.torch(), case.w, 8)
    A1, _ = agg.replicate_pad(*case.torch(), case.w, 8)
    close(A0[2:], 0.25 * case.As[3][2:])
    close(A1[2:], case.As[3][2:])


def test_hetlora_falls_back_to_plain_weights_when_all_products_vanish() -> None:
    case = make_case(0, 5, 4, [2, 3])
    case.Bs = [np.zeros_like(b) for b in case.Bs]
    A, _ = agg.hetlora(*case.torch(), case.w, 3)
    close(A, ref_zero_pad(case.As, case.Bs, case.w, 3)[0])


def test_flexlora_zero_fills_ranks_beyond_the_available_dimension() -> None:
    case = make_case(0, 3, 4, [1, 1])  # ΔW has rank ≤ 2
    (A, B), = agg.flexlora(*case.torch(), case.w, [5])
    assert A.shape == (5, 4) and B.shape == (3, 5)
    assert torch.all(A[2:] == 0) and torch.all(B[:, 2:] == 0)
    close(B @ A, ref_delta(case.As, case.Bs, case.w), 1e-10)


# --------------------------------------------------------------------------- bad input


def _t(*shape):
    return torch.ones(*shape, dtype=torch.float64)


BAD_INPUTS = [
    ("rank mismatch", lambda: agg.zero_pad([_t(2, 4)], [_t(3, 3)], [1.0], 4), "rank 2 but B has rank 3"),
    ("client rank above global", lambda: agg.replicate_pad([_t(5, 4)], [_t(3, 5)], [1.0], 4), "above the global rank"),
    ("negative weight", lambda: agg.zero_pad([_t(2, 4)] * 2, [_t(3, 2)] * 2, [1.0, -1.0], 2), "non-negative"),
    ("all-zero weights", lambda: agg.fedavg([_t(2, 4)] * 2, [_t(3, 2)] * 2, [0.0, 0.0]), "all zero"),
    ("nan weight", lambda: agg.fedavg([_t(2, 4)], [_t(3, 2)], [float("nan")]), "finite"),
    ("weight count", lambda: agg.fedavg([_t(2, 4)] * 2, [_t(3, 2)] * 2, [1.0]), "one weight per client"),
    ("unequal ranks in fedavg", lambda: agg.fedavg([_t(2, 4), _t(3, 4)], [_t(3, 2), _t(3, 3)], [1, 1]), "equal ranks"),
    ("mismatched n", lambda: agg.zero_pad([_t(2, 4), _t(2, 5)], [_t(3, 2)] * 2, [1, 1], 2), "same layer"),
    ("mismatched m", lambda: agg.zero_pad([_t(2, 4)] * 2, [_t(3, 2), _t(6, 2)], [1, 1], 2), "same layer"),
    ("slot out of range", lambda: agg.plora([_t(2, 4)], [_t(3, 2)], [1.0], [[0, 4]], 4), "out of range"),
    ("slot repeated", lambda: agg.plora([_t(2, 4)], [_t(3, 2)], [1.0], [[1, 1]], 4), "repeated"),
    ("slot count", lambda: agg.plora([_t(2, 4)], [_t(3, 2)], [1.0], [[1]], 4), "lists 1 slots"),
    ("no clients", lambda: agg.zero_pad([], [], [], 2), "no client factors"),
    ("A/B count", lambda: agg.flora_stack([_t(2, 4)], [], [1.0]), "1 A factors but 0 B"),
    ("not 2-D", lambda: agg.flora_stack([torch.ones(4)], [_t(3, 1)], [1.0]), "2-D"),
    ("dtype mix", lambda: agg.zero_pad([_t(1, 4), _t(1, 4).float()], [_t(3, 1)] * 2, [1, 1], 1), "dtype"),
    ("bad prev", lambda: agg.replicate_pad([_t(1, 4)], [_t(3, 1)], [1.0], 2, prev=(_t(1, 4), _t(3, 1))), "prev"),
    ("bad update prev", lambda: agg.update_pad([_t(1, 4)], [_t(3, 1)], [1.0], 2, prev=(_t(2, 5), _t(3, 2))), "prev"),
    ("update rank above global", lambda: agg.update_pad([_t(3, 4)], [_t(3, 3)], [1.0], 2), "above the global rank"),
    ("flexlora rank 0", lambda: agg.flexlora([_t(1, 4)], [_t(3, 1)], [1.0], [0]), "positive"),
]


@pytest.mark.parametrize(("what", "call", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_value_error(what: str, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
