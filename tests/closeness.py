"""How close two results of *different* code paths must be, derived from the effect a test guards against.

fp32 kernels round differently from one CPU to another (AVX-512, AMX, other thread counts), and training
amplifies a last-bit difference: the same federation run with 1 and with 2 torch threads ends with LoRA
updates ``B·A`` that differ by about 1e-4 of their norm.  The bugs these comparisons guard against are far
larger: a method that drops one of three clients moves ``B·A`` by about 75 % of its norm, a 5 % mis-scaled
update by 5 %.  So two different code paths agree when every layer's ``B·A`` (and every other exported
tensor) is within ``MODEL_RTOL`` of its norm, and accuracies within ``TIE_EXAMPLES`` examples (an argmax near a
tie may flip).  Identical, deterministic code paths (a resumed run, a ``--jobs`` worker) are compared exactly
instead, elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from torch import Tensor

MODEL_RTOL = 1e-2  # 100x the cross-kernel noise (1e-4), 5x below a 5 % mis-scaled update
TIE_EXAMPLES = 2  # predictions that may flip at an argmax near-tie
LOSS_RTOL = 1e-3  # mean cross-entropy: the model gap above moves it far less
ACCURACY_KEYS = ("accuracy",)  # and accuracy_r<rank>


def lora_updates(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every LoRA layer's ``B·A`` (float64) by its lora_A key; every other tensor (the head) as it is."""
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if "lora_A" in key:
            out[key] = tensors[key.replace("lora_A", "lora_B")].double() @ t.double()
        elif "lora_B" not in key:
            out[key] = t.double()
    return out


def relative_gap(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / ‖a‖`` (``‖a − b‖`` when ``a`` is zero)."""
    diff = float((a.double() - b.double()).norm())
    norm = float(a.double().norm())
    return diff / norm if norm > 0 else diff


def model_gap(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """The largest relative gap over the layers' ``B·A`` and the other tensors of two exported adapters."""
    ua, ub = lora_updates(a), lora_updates(b)
    assert ua.keys() == ub.keys()
    return max(relative_gap(ua[k], ub[k]) for k in ua)


def assert_same_model(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Two adapters from different code paths hold the same model (to ``MODEL_RTOL``)."""
    gap = model_gap(a, b)
    assert gap <= MODEL_RTOL, f"B·A differs by {gap:.3g} of its norm (tolerance {MODEL_RTOL})"


def scaled_updates(tensors: dict[str, Tensor], factor: float) -> dict[str, Tensor]:
    """A deliberately wrong variant: every LoRA update ``B·A`` scaled by ``factor`` (B scaled, A kept)."""
    return {k: t * factor if "lora_B" in k else t for k, t in tensors.items()}


def is_accuracy(key: str) -> bool:
    return key in ACCURACY_KEYS or key.startswith("accuracy_r")


def assert_same_metrics(a: list[dict[str, Any]], b: list[dict[str, Any]], examples: int,
                        keys: Iterable[str] | None = None) -> None:
    """Per-round metrics (``keys``, default all) of two code paths: bookkeeping exactly, accuracies to
    ``TIE_EXAMPLES`` of ``examples``, losses to ``LOSS_RTOL``.  Macro-F1 is only range-checked: it follows from
    the same predictions as accuracy, and one flipped prediction in a small class moves it by far more than a
    fixed tolerance could bound; the model itself is compared with ``assert_same_model``."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x if keys is None else keys:
            if is_accuracy(key):
                assert abs(x[key] - y[key]) <= TIE_EXAMPLES / examples + 1e-12, (x["round"], key, x[key], y[key])
            elif key == "macro_f1":
                assert 0.0 <= y[key] <= 1.0
            elif isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=LOSS_RTOL), (x["round"], key)
            else:
                assert x[key] == y[key], (x["round"], key)


def effect_gap(reference: Tensor, got: Tensor, base: Tensor) -> float:
    """How far the outputs ``got`` are from ``reference``, relative to the adapter's effect on them
    (``reference − base``, ``base`` being the outputs without the adapter)."""
    return relative_gap(reference - base, got - base)


def scaled_factors(factors: dict[str, tuple[Tensor, Tensor]], factor: float) -> dict[str, tuple[Tensor, Tensor]]:
    """A deliberately wrong variant of layer factors: every ``B·A`` scaled by ``factor``."""
    return {layer: (A, B * factor) for layer, (A, B) in factors.items()}
