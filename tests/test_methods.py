"""Every method through the same invariants, on synthetic layers (no model needed).

A client's round trip is simulated exactly as the runtime does it:
payload → local_start → (training replaced by a known perturbation) → upload → aggregate.
"""

from __future__ import annotations

import pytest
import torch

from fedrank.config import ConfigError
from fedrank.methods import METHODS, Method, Reply, Task
from fedrank.methods.base import Factors, unpack

from closeness import relative_gap

SHAPES = {"l0.q": (12, 10), "l1.v": (6, 10)}
R = 8
S = 2.0  # the shared LoRA scaling s


def delta(factors: Factors) -> dict[str, torch.Tensor]:
    return {layer: S * B.double() @ A.double() for layer, (A, B) in factors.items()}


def train_stub(start, task: Task) -> Factors:
    """Deterministic stand-in for local training: perturb what trains, keep what is frozen."""
    gen = torch.Generator().manual_seed(1000 * task.round + task.client)
    out = {}
    for layer, (A, B) in start.init.items():
        dA = torch.randn(A.shape, generator=gen) * 0.1 if start.train_A else torch.zeros_like(A)
        out[layer] = (A + dA, B + torch.randn(B.shape, generator=gen) * 0.1)
    return out


def client_round(method: Method, state, task: Task, weight: float = 1.0) -> Reply:
    start = method.local_start(method.payload(state, task), task)
    return Reply(task, weight, method.upload(start, train_stub(start, task), task))


def run_rounds(method: Method, ranks: list[int], rounds: int = 2, weights=None):
    state = method.init_state()
    for rnd in range(1, rounds + 1):
        replies = [client_round(method, state, Task(c, r, rnd), (weights or [1.0] * len(ranks))[c])
                   for c, r in enumerate(ranks)]
        state = method.aggregate(state, replies)
    return state


def make(name: str, seed: int = 0) -> Method:
    return METHODS[name](SHAPES, R, seed)


ALL = list(METHODS)
HETERO = [m for m in ALL if m != "fedit"]


@pytest.mark.parametrize("name", ALL)
def test_initial_global_update_is_zero(name: str) -> None:
    method = make(name)
    for d in delta(method.global_factors(method.init_state())).values():
        assert torch.count_nonzero(d) == 0


@pytest.mark.parametrize("name", [m for m in ALL if m != "flexlora"])  # FlexLoRA sends a rank-r approximation
def test_client_start_reproduces_global_model(name: str) -> None:
    """fold + warm start (or truncation at full rank) gives exactly the global ΔW for a rank-R client."""
    method = make(name)
    state = run_rounds(method, [R, R, R])
    task = Task(0, R, 3)
    start = method.local_start(method.payload(state, task), task)
    local = delta(start.init)
    if start.fold is not None:
        local = {k: v + delta(start.fold)[k] for k, v in local.items()}
    for layer, g in delta(method.global_factors(state)).items():
        torch.testing.assert_close(local[layer], g, rtol=1e-5, atol=1e-6)


def test_fedplora_fold_and_warm_start_is_exact_at_every_rank() -> None:
    method = make("fedplora")
    state = run_rounds(method, [2, 5, 8])
    for r in (1, 3, 8):
        task = Task(4, r, 3)
        start = method.local_start(method.payload(state, task), task)
        assert start.init["l0.q"][0].shape == (r, 10) and start.fold["l0.q"][0].shape == (R - r, 10)
        for layer, g in delta(method.global_factors(state)).items():
            torch.testing.assert_close(delta(start.init)[layer] + delta(start.fold)[layer], g)


# Two aggregation code paths agree when every global factor is within this share of its norm: float32 sums in
# another order (another CPU's kernels) differ by about 1e-7 of it; a wrong weight or a dropped client by > 1e-2.
AGGREGATION_RTOL = 1e-5
EQUAL_RANKS, WEIGHTS = [R, R, R], [1.0, 3.0, 2.0]


def factors_gap(a: Factors, b: Factors) -> float:
    """The largest ``‖x − y‖ / ‖x‖`` over the layers' A and B."""
    return max(relative_gap(x, y) for layer in a for x, y in zip(a[layer], b[layer]))


@pytest.mark.parametrize("name", ["zeropad", "replication", "updatepad", "orderedfold", "fedplora"])
def test_equal_ranks_agree_with_fedit(name: str) -> None:
    expected = unpack(run_rounds(make("fedit"), EQUAL_RANKS, weights=WEIGHTS))
    got = unpack(run_rounds(make(name), EQUAL_RANKS, weights=WEIGHTS))
    assert factors_gap(expected, got) <= AGGREGATION_RTOL


@pytest.mark.parametrize("wrong", [[1.0, 1.0, 1.0], [1.0, 3.0, 0.0]], ids=["unweighted", "dropped-client"])
def test_the_fedit_agreement_tolerance_catches_a_wrong_aggregation(wrong: list[float]) -> None:
    expected = unpack(run_rounds(make("fedit"), EQUAL_RANKS, weights=WEIGHTS))
    assert factors_gap(expected, unpack(run_rounds(make("fedit"), EQUAL_RANKS, weights=wrong))) > 100 * AGGREGATION_RTOL


@pytest.mark.parametrize("name", HETERO)
def test_heterogeneous_ranks_give_global_shapes(name: str) -> None:
    method = make(name)
    state = run_rounds(method, [1, 4, 8], rounds=3)
    for layer, (A, B) in method.global_factors(state).items():
        m, n = SHAPES[layer]
        assert A.shape[1] == n and B.shape[0] == m and A.shape[0] == B.shape[1]
        assert torch.isfinite(A).all() and torch.isfinite(B).all()


def global_delta(method: Method, state, replies) -> dict[str, torch.Tensor]:
    return delta(method.global_factors(method.aggregate(state, replies)))


def assert_same_update(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for layer in SHAPES:
        torch.testing.assert_close(a[layer], b[layer], rtol=1e-5, atol=1e-6)


def three_replies(method: Method, weights: list[float]):
    state = method.init_state()
    return state, [client_round(method, state, Task(c, r, 1), w) for c, (r, w) in enumerate(zip([2, 8, 4], weights))]


@pytest.mark.parametrize("name", HETERO)
def test_client_order_does_not_matter(name: str) -> None:
    method = make(name)
    state, replies = three_replies(method, [1.0, 2.0, 3.0])
    assert_same_update(global_delta(method, state, replies), global_delta(method, state, replies[::-1]))


@pytest.mark.parametrize("name", HETERO)
def test_zero_weight_client_changes_nothing(name: str) -> None:
    method = make(name)
    state, replies = three_replies(method, [1.0, 0.0, 3.0])
    assert_same_update(global_delta(method, state, replies), global_delta(method, state, [replies[0], replies[2]]))


def test_flora_merges_the_exact_weighted_sum_of_updates() -> None:
    method = make("flora")
    state = method.init_state()
    weights = [1.0, 3.0]
    replies = [client_round(method, state, Task(c, r, 1), w) for c, (r, w) in enumerate(zip([2, 5], weights))]
    merged = delta(method.global_factors(method.aggregate(state, replies)))
    for layer in SHAPES:
        ups = [unpack(r.tensors)[layer] for r in replies]
        expected = sum(w / sum(weights) * S * B.double() @ A.double() for w, (A, B) in zip(weights, ups))
        torch.testing.assert_close(merged[layer], expected, rtol=1e-5, atol=1e-6)


def test_flora_compacts_the_merged_update_without_changing_it() -> None:
    method = make("flora")
    state = run_rounds(method, [8, 8], rounds=2)  # 32 slots > min(m, n) for both layers
    for layer, (A, _) in method.global_factors(state).items():
        assert A.shape[0] <= min(SHAPES[layer])


def test_flexlora_sends_the_best_rank_r_approximation() -> None:
    method = make("flexlora")
    state = run_rounds(method, [2, 8, 4])
    target = delta(method.global_factors(state))
    for r in (1, 3):
        received = unpack(method.payload(state, Task(0, r, 3)))
        for layer, (A, B) in received.items():
            U, Sv, Vh = torch.linalg.svd(target[layer])
            best = (U[:, :r] * Sv[:r]) @ Vh[:r]
            torch.testing.assert_close(S * B.double() @ A.double(), best, rtol=1e-4, atol=1e-5)


def test_ffa_client_regenerates_the_server_A_and_only_B_travels() -> None:
    method = make("ffa", seed=3)
    state = run_rounds(method, [2, 8], rounds=2)
    server_A = unpack(state)
    task = Task(1, 4, 3)
    payload = method.payload(state, task)
    assert all(k.endswith("#B") for k in payload)
    start = method.local_start(payload, task)
    assert not start.train_A
    for layer, (A, _) in start.init.items():
        torch.testing.assert_close(A, server_A[layer][0][:4], rtol=0, atol=0)
    upload = method.upload(start, start.init, task)
    assert all(k.endswith("#B") for k in upload)


def test_fedplora_selection_is_seeded_uniform_and_per_round() -> None:
    method = make("fedplora")
    picks = [tuple(method.select(Task(0, 3, rnd)).tolist()) for rnd in range(1, 200)]
    assert picks[0] == tuple(make("fedplora").select(Task(0, 3, 1)).tolist())
    assert len(set(picks)) > 20
    counts = torch.bincount(torch.tensor([i for p in picks for i in p]), minlength=R).double()
    assert counts.min() > 0.5 * counts.mean()


# The per-layer wire sizes of DESIGN.md §2, in float32 elements: (uplink, downlink) for rank r.
WIRE = {
    "fedit": lambda r, m, n, ranks: (r * (m + n), r * (m + n)),
    "zeropad": lambda r, m, n, ranks: (r * (m + n), r * (m + n)),
    "hetlora": lambda r, m, n, ranks: (r * (m + n), r * (m + n)),
    "replication": lambda r, m, n, ranks: (r * (m + n), r * (m + n)),
    "updatepad": lambda r, m, n, ranks: (r * (m + n), r * (m + n)),
    "orderedfold": lambda r, m, n, ranks: (r * (m + n), R * (m + n)),
    "flexlora": lambda r, m, n, ranks: (r * (m + n), r * (m + n)),
    "fedplora": lambda r, m, n, ranks: (r * (m + n), R * (m + n)),
    "ffa": lambda r, m, n, ranks: (r * m, r * m),
    # stateless clients download the whole merged update (capped at min(m, n) slots)
    "flora": lambda r, m, n, ranks: (r * (m + n), min(sum(ranks), m, n) * (m + n)),
}


@pytest.mark.parametrize("name", ALL)
def test_wire_sizes_follow_the_method(name: str) -> None:
    method = make(name)
    ranks = [R, R] if name == "fedit" else [2, 3]
    state = run_rounds(method, ranks, rounds=1)
    r = ranks[0]
    task = Task(0, r, 2)
    payload = method.payload(state, task)
    upload = method.upload(method.local_start(payload, task), train_stub(method.local_start(payload, task), task), task)
    up_expected = sum(WIRE[name](r, m, n, ranks)[0] for m, n in SHAPES.values())
    down_expected = sum(WIRE[name](r, m, n, ranks)[1] for m, n in SHAPES.values())
    upload_floats = sum(t.numel() for k, t in upload.items() if "#" in k)
    assert upload_floats == up_expected
    assert sum(t.numel() for t in payload.values()) == down_expected


def test_fedit_rejects_mixed_ranks() -> None:
    with pytest.raises(ConfigError, match="same rank"):
        make("fedit").check_tiers([4, 16])
    make("fedit").check_tiers([4])
