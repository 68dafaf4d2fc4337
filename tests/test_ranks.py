"""Rank allocation policies: assignments, seeding, budgets, checkpoints and bad input."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.config import ConfigError, RanksConfig
from fedrank.ranks import POLICIES, RankPolicy, make_rank_policy


def policy(n: int = 10, seed: int = 0, slot_cost: int = 1, **cfg: Any) -> RankPolicy:
    return make_rank_policy(RanksConfig(**{"values": [8], **cfg}), n, seed, slot_cost)


def everyone(p: RankPolicy, n: int, round: int = 1) -> list[int]:
    return p.ranks(round, list(range(n)), [1] * n)


def test_registry_names() -> None:
    assert set(POLICIES) == {"fixed", "random", "quality", "budget"}


@pytest.mark.parametrize(
    ("cfg", "global_rank", "tiers"),
    [
        ({"values": [8]}, 8, [8]),
        ({"values": [16, 4], "fractions": [0.5, 0.5]}, 16, [4, 16]),
        ({"policy": "random", "values": [2, 8, 2]}, 8, [2, 8]),
        ({"policy": "quality", "values": [16, 4]}, 16, [4, 16]),
        ({"policy": "budget", "values": [4, 16, 8], "budget": 1e6}, 16, [4, 8, 16]),
    ],
)
def test_global_rank_and_tiers(cfg: dict[str, Any], global_rank: int, tiers: list[int]) -> None:
    p = policy(**cfg)
    assert (p.global_rank, p.tiers) == (global_rank, tiers)


# --------------------------------------------------------------------------- fixed


@pytest.mark.parametrize(
    ("values", "n", "expected"),
    [
        ([8], 5, [8] * 5),
        ([3, 1, 2], 3, [3, 1, 2]),
        ([7], 1, [7]),
    ],
)
def test_fixed_single_and_per_client(values: list[int], n: int, expected: list[int]) -> None:
    p = policy(n, values=values)
    assert everyone(p, n) == expected
    assert everyone(p, n, round=7) == expected
    assert p.ranks(3, [2 % n, 0], [10, 20]) == [expected[2 % n], expected[0]]


def test_fixed_tiers_exact_counts_and_seeding() -> None:
    cfg = {"values": [5, 20], "fractions": [0.9, 0.1]}
    a = everyone(policy(100, seed=1, **cfg), 100)
    assert Counter(a) == {5: 90, 20: 10}
    assert everyone(policy(100, seed=1, **cfg), 100) == a
    assert everyone(policy(100, seed=2, **cfg), 100) != a
    assert everyone(policy(100, seed=1, **cfg), 100, round=9) == a


@pytest.mark.parametrize(
    ("n", "fractions", "counts"),
    [
        (7, [0.5, 0.5], [4, 3]),
        (10, [1 / 3, 1 / 3, 1 / 3], [4, 3, 3]),
        (100, [0.29, 0.71], [29, 71]),
        (3, [0.1, 0.9], [0, 3]),
        (1, [0.5, 0.5], [1, 0]),
    ],
)
def test_fixed_tier_rounding(n: int, fractions: list[float], counts: list[int]) -> None:
    values = list(range(1, len(fractions) + 1))
    got = Counter(everyone(policy(n, values=values, fractions=fractions), n))
    assert [got[v] for v in values] == counts
    assert sum(counts) == n


# --------------------------------------------------------------------------- random


def test_random_is_seeded_and_static() -> None:
    cfg = {"policy": "random", "values": [2, 4, 8, 16]}
    a = everyone(policy(200, seed=3, **cfg), 200)
    assert everyone(policy(200, seed=3, **cfg), 200) == a
    assert everyone(policy(200, seed=3, **cfg), 200, round=5) == a
    assert everyone(policy(200, seed=4, **cfg), 200) != a
    assert set(a) == {2, 4, 8, 16}


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"values": [4, 8, 16], "fractions": [0.7, 0.2, 0.1]}, {4: 0.7, 8: 0.2, 16: 0.1}),
        ({"values": [4, 8, 16], "distribution": "uniform"}, {4: 1 / 3, 8: 1 / 3, 16: 1 / 3}),
        (
            {"values": [2, 8, 32], "distribution": "heavy_tail"},
            {r: r**-1.5 / sum(v**-1.5 for v in (2, 8, 32)) for r in (2, 8, 32)},
        ),
    ],
)
def test_random_frequencies(cfg: dict[str, Any], expected: dict[int, float]) -> None:
    n = 2000
    counts = Counter(everyone(policy(n, policy="random", **cfg), n))
    for rank, p in expected.items():
        assert counts[rank] / n == pytest.approx(p, abs=0.035), rank


def test_heavy_tail_makes_small_ranks_most_common() -> None:
    n = 2000
    counts = Counter(everyone(policy(n, policy="random", values=[16, 4, 8], distribution="heavy_tail"), n))
    assert counts[4] > counts[8] > counts[16]


# --------------------------------------------------------------------------- quality


def test_quality_starts_low_and_raises_top_clients() -> None:
    n = 10
    p = policy(n, policy="quality", values=[16, 4], top_fraction=0.25)
    assert p.needs_scores_after_round == 1 and p.needs_validation
    assert everyone(p, n) == [4] * n
    scores = {c: s for c, s in enumerate([0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0, 0.4, 0.5, 0.6])}
    p.observe_scores(scores)  # ⌈0.25 · 10⌉ = 3: clients 1, 3, 5
    assert everyone(p, n, round=2) == [16 if c in {1, 3, 5} else 4 for c in range(n)]
    assert everyone(p, n, round=8) == everyone(p, n, round=2)


@pytest.mark.parametrize(
    ("n", "top_fraction", "top"),
    [(100, 0.07, 7), (25, 0.28, 7), (30, 0.1, 3), (10, 0.25, 3), (10, 0.0, 0), (10, 1.0, 10), (7, 0.01, 1)],
)
def test_quality_top_count_is_ceiling(n: int, top_fraction: float, top: int) -> None:
    p = policy(n, policy="quality", values=[2, 8], top_fraction=top_fraction)
    p.observe_scores({c: random.Random(c).random() for c in range(n)})
    assert everyone(p, n).count(8) == top


def test_quality_ties_and_missing_scores() -> None:
    n = 8
    p = policy(n, policy="quality", values=[2, 8], top_fraction=0.5)  # 4 raised
    p.observe_scores({6: -0.5, 2: -0.5, 5: 0.9})  # 5, then the tie 2 < 6, then unscored 0
    assert [c for c, r in enumerate(everyone(p, n)) if r == 8] == [0, 2, 5, 6]
    p.observe_scores({c: 1.0 for c in range(n)} | {7: math.nan})
    assert [c for c, r in enumerate(everyone(p, n)) if r == 8] == [0, 1, 2, 3]


def test_other_policies_need_no_scores() -> None:
    for cfg in ({}, {"policy": "random"}, {"policy": "budget", "budget": 100.0}):
        assert policy(**cfg).needs_scores_after_round is None


# --------------------------------------------------------------------------- budget


def test_budget_worked_example() -> None:
    # Minimum 3·4·10 = 120; spare 130 split 100:50:10 → 81.25, 40.6, 8.1 → ranks 8, 8, 4 (200);
    # greedy: 8→16 costs 80 (too much), the last client's 4→8 costs 40 → 240.
    p = policy(3, slot_cost=10, policy="budget", values=[4, 8, 16], budget=250)
    assert p.ranks(1, [0, 1, 2], [100, 50, 10]) == [8, 8, 8]
    assert p.ranks(1, [2, 0, 1], [10, 100, 50]) == [8, 8, 8]
    assert p.ranks(1, [0, 1, 2], [100, 50, 10]) == p.ranks(2, [0, 1, 2], [100, 50, 10])


def test_budget_favours_data_and_spends_spare() -> None:
    p = policy(4, policy="budget", values=[1, 4, 16], budget=40)
    assert p.ranks(1, [0, 1, 2, 3], [1000, 10, 10, 0]) == [16, 16, 4, 4]
    assert p.ranks(1, [0, 1], [0, 0]) == [16, 16]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 10_000), min_size=1, max_size=20),
    values=st.lists(st.integers(1, 64), min_size=1, max_size=5),
    slot_cost=st.integers(1, 1000),
    slack=st.floats(0.0, 50.0),
)
def test_budget_properties(sizes: list[int], values: list[int], slot_cost: int, slack: float) -> None:
    n = len(sizes)
    budget = n * min(values) * slot_cost * (1.0 + slack)
    p = policy(n, slot_cost=slot_cost, policy="budget", values=values, budget=budget)
    ranks = p.ranks(1, list(range(n)), sizes)
    spent = sum(ranks) * slot_cost
    assert spent <= budget
    assert set(ranks) <= set(values)
    for a in range(n):
        for b in range(n):
            if sizes[a] > sizes[b]:
                assert ranks[a] >= ranks[b], (sizes, ranks)
    tiers = sorted(set(values))
    for r in ranks:  # no client can still step up within budget
        if r < tiers[-1]:
            assert spent + (tiers[tiers.index(r) + 1] - r) * slot_cost > budget


def test_budget_too_small() -> None:
    p = policy(5, slot_cost=10, policy="budget", values=[4, 8], budget=50)
    assert p.ranks(1, [0], [3]) == [4]
    with pytest.raises(ConfigError, match=r"ranks.budget=50 is too small: 2 clients .* need 80 .* at least 80"):
        p.ranks(1, [0, 1], [3, 4])


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("n", "cfg", "message"),
    [
        (5, {"values": []}, r"ranks.values is empty"),
        (5, {"values": [0, 4]}, r"ranks must be ≥ 1"),
        (5, {"values": [-2]}, r"ranks must be ≥ 1"),
        (5, {"values": [4, 16], "fractions": [1.0]}, r"one fraction per rank"),
        (5, {"values": [4, 16], "fractions": [0.0, 1.0]}, r"must each be in \(0, 1\]"),
        (5, {"values": [4, 16], "fractions": [1.5, -0.5]}, r"must each be in \(0, 1\]"),
        (5, {"values": [4, 16], "fractions": [0.5, 0.6]}, r"must sum to 1, got 1.1"),
        (5, {"policy": "fixd"}, r"unknown ranks.policy `fixd` \(did you mean `fixed`\?\): choose one of fixed, random"),
        (5, {"policy": "zzz"}, r"unknown ranks.policy `zzz`: choose one of fixed, random, quality, budget"),
        (5, {"distribution": "heavy"}, r"unknown ranks.distribution `heavy` \(did you mean `heavy_tail`\?\)"),
        (5, {"policy": "quality", "values": [4]}, r"quality policy needs two distinct ranks"),
        (5, {"policy": "quality", "values": [4, 8, 16]}, r"quality policy needs two distinct ranks"),
        (5, {"policy": "quality", "values": [8, 8]}, r"quality policy needs two distinct ranks"),
        (5, {"policy": "quality", "values": [4, 8], "top_fraction": 1.5}, r"top_fraction must be in \[0, 1\]"),
        (5, {"policy": "budget", "budget": 0.0}, r"needs ranks.budget > 0"),
        (0, {}, r"clients.count must be ≥ 1"),
    ],
)
def test_bad_config(n: int, cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        policy(n, **cfg)
    assert "\n" not in str(err.value)


def test_bad_calls() -> None:
    p = policy(4)
    with pytest.raises(ValueError, match="one size per client"):
        p.ranks(1, [0, 1], [5])
    with pytest.raises(ValueError, match=r"client ids \[4, -1\]"):
        p.ranks(1, [0, 4, -1], [1, 1, 1])
    with pytest.raises(ValueError, match="1-based"):
        p.ranks(0, [0], [1])
    with pytest.raises(ValueError, match=r"client ids \[9\]"):
        policy(4, policy="quality", values=[2, 8]).observe_scores({9: 1.0})
    with pytest.raises(ValueError, match="slot_cost"):
        policy(4, slot_cost=0, policy="budget", budget=10.0)
    with pytest.raises(ValueError, match="non-negative"):
        policy(4, policy="budget", budget=100.0).ranks(1, [0, 1], [3, -1])


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "cfg",
    [
        {"values": [5, 20], "fractions": [0.7, 0.3]},
        {"values": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]},
        {"policy": "random", "values": [2, 4, 8], "distribution": "heavy_tail"},
        {"policy": "quality", "values": [4, 16], "top_fraction": 0.25},
        {"policy": "budget", "values": [2, 4, 8], "budget": 40.0},
    ],
)
def test_state_dict_round_trip(cfg: dict[str, Any]) -> None:
    n = 12
    sizes = [(7 * c) % 11 for c in range(n)]
    source = policy(n, seed=5, **cfg)
    source.observe_scores({c: (3 * c) % 7 for c in range(n)})
    state = json.loads(json.dumps(source.state_dict()))
    restored = policy(n, seed=6, **cfg)
    restored.load_state_dict(state)
    assert restored.ranks(2, list(range(n)), sizes) == source.ranks(2, list(range(n)), sizes)
    assert restored.state_dict() == source.state_dict()


def test_quality_state_is_needed_to_resume() -> None:
    n = 12
    source = policy(n, policy="quality", values=[4, 16], top_fraction=0.25)
    source.observe_scores({c: c for c in range(n)})
    fresh = policy(n, policy="quality", values=[4, 16], top_fraction=0.25)
    assert everyone(fresh, n) != everyone(source, n)
    fresh.load_state_dict(source.state_dict())
    assert everyone(fresh, n) == [4] * 9 + [16] * 3


@pytest.mark.parametrize("state", [{}, {"ranks": [8] * 3}, {"ranks": [8, 8, 8, 99]}, {"ranks": "8888"}])
def test_load_state_dict_rejects_mismatched_checkpoint(state: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="resume with the config the run was started with"):
        policy(4).load_state_dict(state)


def test_fixed_tiers_without_fractions_are_equal_shares() -> None:
    policy = make_rank_policy(RanksConfig(values=[4, 8, 16]), 5, seed=0)
    ranks = policy.ranks(1, list(range(5)), [1] * 5)
    assert sorted(ranks) == [4, 4, 8, 8, 16]
    assert policy.tiers == [4, 8, 16]


def test_quality_policy_by_size_raises_the_data_rich_clients() -> None:
    """``quality_by = "size"``: after round 1 the clients with the most training examples get the high rank,
    whatever their validation scores (the ablation of who Byun & Lee's policy raises)."""
    p = policy(6, policy="quality", values=[2, 8], top_fraction=0.3, quality_by="size")  # ⌈1.8⌉ = 2
    assert not p.needs_validation  # the server skips the clients' validation pass after round 1
    p.observe_scores({c: float(c) for c in range(6)}, sizes=[50, 10, 90, 90, 5, 20])
    assert p.ranks(2, list(range(6)), [1] * 6) == [2, 2, 8, 8, 2, 2]
    with pytest.raises(ValueError, match="sizes of all 6"):
        p.observe_scores({}, sizes=None)
