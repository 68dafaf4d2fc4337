"""PEFT adapters on the packaged MiniLM: the shared-scaling contract, folding and export."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from fedrank.adapters import AdaptedModel, peft_scaling
from fedrank.config import ConfigError
from fedrank.models import load_classifier

from closeness import MODEL_RTOL, effect_gap, scaled_factors

TARGETS = ["query", "value"]
S = 2.0


def adapted(scaling: str = "shared", global_rank: int = 8) -> AdaptedModel:
    return AdaptedModel(load_classifier("minilm", 3, seed=0).model, TARGETS, ["classifier"], S, scaling, 0.0,
                        global_rank)


def random_factors(model: AdaptedModel, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(rank, n, generator=gen) * 0.05, torch.randn(m, rank, generator=gen) * 0.05)
            for layer, (m, n) in model.shapes.items()}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tok = load_classifier("minilm", 3, seed=0).tokenizer
    return dict(tok(["the markets fell sharply", "a late goal won the cup final"], return_tensors="pt", padding=True))


def logits(net, batch) -> torch.Tensor:
    with torch.no_grad():
        return net(**batch).logits


def merged_logits(model: AdaptedModel, factors, batch) -> torch.Tensor:
    """Logits with ``W0 + s·B·A`` merged densely (``{}``: the base model, with the current head)."""
    with model.merged(factors) as net:
        return logits(net, batch)


def test_target_layers_found() -> None:
    model = adapted()
    assert len(model.layers) == 12  # 6 blocks × (query, value)
    assert all(shape == (384, 384) for shape in model.shapes.values())
    assert list(model.head_params) == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("scaling", ["shared", "alpha_over_r", "rslora"])
@pytest.mark.parametrize("rank", [2, 8])
def test_adapter_equals_dense_merge_under_every_scaling(scaling: str, rank: int, batch) -> None:
    """Factors in the shared convention mean ΔW = s·B·A whatever PEFT's own scaling is."""
    model = adapted(scaling)
    factors = random_factors(model, rank, seed=rank)
    model.use_rank(rank)
    model.set_factors(factors)
    with_adapter = logits(model.peft, batch)
    merged, base, wrong = (merged_logits(model, f, batch) for f in (factors, {}, scaled_factors(factors, 1.05)))
    # PEFT's unmerged forward and the dense merge are different fp32 paths: compared relative to the adapter's
    # effect on the logits, which a 5% scaling error (e.g. a wrong alpha convention) visibly changes
    assert effect_gap(merged, with_adapter, base) <= MODEL_RTOL
    assert effect_gap(merged, wrong, base) > 2 * MODEL_RTOL
    got = model.get_factors()
    for layer, (A, B) in factors.items():
        torch.testing.assert_close(got[layer][0], A)
        torch.testing.assert_close(got[layer][1], B)


def test_peft_scaling_policies() -> None:
    assert peft_scaling("shared", 2.0, 4, 16) == 2.0
    assert peft_scaling("alpha_over_r", 2.0, 4, 16) == 8.0
    assert peft_scaling("rslora", 2.0, 4, 16) == pytest.approx(4.0)
    with pytest.raises(ConfigError, match="model.scaling"):
        peft_scaling("nope", 2.0, 4, 16)


def test_fold_then_unfold_restores_base_exactly() -> None:
    model = adapted()
    before = {k: w.clone() for k, w in model.W0.items()}
    model.set_base(random_factors(model, 3, seed=1))
    changed = any(not torch.equal(mod.base_layer.weight, before[k]) for k, mod in model.layers.items())
    model.set_base(None)
    assert changed
    for k, mod in model.layers.items():
        assert torch.equal(mod.base_layer.weight, before[k])


def test_trainable_is_exactly_the_active_factors_and_head() -> None:
    model = adapted()
    model.use_rank(4)
    lora, head = model.trainable(train_A=False)
    trainable = {n for n, p in model.peft.named_parameters() if p.requires_grad}
    assert len(lora) == 12 and len(head) == 2
    assert all("lora_B.r4" in n or "classifier" in n for n in trainable)
    lora, head = model.trainable(train_head=False)  # a frozen head (server.head = frozen)
    trainable = {n for n, p in model.peft.named_parameters() if p.requires_grad}
    assert len(lora) == 24 and head == []
    assert trainable and all("lora_A.r4" in n or "lora_B.r4" in n for n in trainable)


def test_export_reloads_as_the_global_model(tmp_path, batch) -> None:
    model = adapted()
    factors = random_factors(model, 5, seed=2)
    factors["bert.encoder.layer.0.attention.self.query"] = tuple(  # a layer with fewer slots is zero-padded
        t[:2] if i == 0 else t[:, :2] for i, t in enumerate(factors["bert.encoder.layer.0.attention.self.query"]))
    head = {k: torch.randn_like(v) for k, v in model.get_head().items()}
    model.set_head(head)
    expected, base = merged_logits(model, factors, batch), merged_logits(model, {}, batch)
    model.export(tmp_path, factors, head, lambda: load_classifier("minilm", 3, seed=5).model)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(load_classifier("minilm", 3, seed=9).model, str(tmp_path)).eval()
    assert effect_gap(expected, logits(reloaded, batch), base) <= MODEL_RTOL  # PEFT's forward: another fp32 path
    assert effect_gap(expected, merged_logits(model, scaled_factors(factors, 1.05), batch), base) > 2 * MODEL_RTOL
