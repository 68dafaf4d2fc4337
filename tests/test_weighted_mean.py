"""``aggregation.weighted_mean``: FedAvg of dense tensors (the task head), against an independent float64 sum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedrank.aggregation import weighted_mean

SHAPES = {"classifier.weight": (5, 7), "classifier.bias": (5,)}


def clients(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()} for _ in range(count)]


def reference(tensors: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k X_k / Σ_k w_k, in float64, one key at a time."""
    total = sum(weights)
    return {key: sum(w * t[key].double() for w, t in zip(weights, tensors)) / total for key in tensors[0]}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=6).filter(lambda w: sum(w) > 1e-3),
       st.integers(0, 1000))
def test_equals_the_normalised_weighted_sum(weights: list[float], seed: int) -> None:
    tensors = clients(len(weights), seed)
    got, expected = weighted_mean(tensors, weights), reference(tensors, weights)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.dtype == torch.float32 and value.shape == SHAPES[key]
        torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6)


def test_known_values() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    got = weighted_mean([a, b], [1, 3])  # p = (1/4, 3/4)
    assert torch.equal(got["w"], torch.tensor([2.5, 5.0])) and torch.equal(got["b"], torch.tensor([3.0]))


def test_weights_are_relative_order_free_and_a_zero_weight_changes_nothing() -> None:
    tensors = clients(3)
    base = weighted_mean(tensors, [1.0, 2.0, 3.0])
    for other in (weighted_mean(tensors, [10.0, 20.0, 30.0]), weighted_mean(tensors[::-1], [3.0, 2.0, 1.0])):
        for key in base:
            torch.testing.assert_close(other[key], base[key])
    with_zero = weighted_mean(tensors + clients(1, seed=9), [1.0, 2.0, 3.0, 0.0])
    for key in base:
        torch.testing.assert_close(with_zero[key], base[key])


def test_one_client_is_returned_unchanged_and_no_keys_give_no_keys() -> None:
    (only,) = clients(1)
    got = weighted_mean([only], [5.0])
    assert all(torch.equal(got[k], only[k]) for k in only)
    assert weighted_mean([{}, {}], [1.0, 1.0]) == {}


@pytest.mark.parametrize(("tensors", "weights", "message"), [
    ([], [], "no client tensors"),
    (clients(2), [1.0], "2 clients"),
    (clients(2), [1.0, -1.0], "non-negative"),
    (clients(2), [0.0, 0.0], "all zero"),
    (clients(2), [1.0, float("nan")], "finite"),
])
def test_bad_weights_are_refused(tensors, weights, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        weighted_mean(tensors, weights)
