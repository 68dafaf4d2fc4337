"""The rules of the replication study: ordered fold, head rules (FedAvg, per tier, frozen) and the dynamics
diagnostics, against independent references and in tiny end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedrank import dynamics
from fedrank.compare import method_overrides
from fedrank.config import ConfigError, load_config
from fedrank.heads import HEAD_RULES, HeadReply, make_head_rule
from fedrank.experiment import build
from fedrank.job import execute
from fedrank.methods import METHODS, Task

SHAPES = {"l0.q": (12, 10), "l1.v": (6, 10)}


def random_factors(seed: int, rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(rank, n, generator=gen, dtype=torch.float64),
                    torch.randn(m, rank, generator=gen, dtype=torch.float64)) for layer, (m, n) in SHAPES.items()}


def dense(factors, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """All layers' ``B[:, lo:hi] A[lo:hi]`` flattened into one vector (the dense reference)."""
    return np.concatenate([(B[:, lo:hi] @ A[lo:hi]).numpy().ravel() for A, B in factors.values()])


# --------------------------------------------------------------------------- ordered fold


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_ordered_fold_client_starts_from_the_whole_global_model(rank: int) -> None:
    """Fold + warm start reproduce the rank-8 global ΔW at every client rank (truncation would drop slots)."""
    method = METHODS["orderedfold"](SHAPES, 8, 0)
    state = {f"{layer}#{x}": t.float() for layer, (A, B) in random_factors(1, 8).items() for x, t in (("A", A), ("B", B))}
    task = Task(0, rank, 2)
    start = method.local_start(method.payload(state, task), task)
    for layer, (A, B) in method.global_factors(state).items():
        A0, B0 = start.init[layer]
        assert A0.shape == (rank, 10)
        Af, Bf = start.fold[layer]
        torch.testing.assert_close(B0 @ A0 + Bf @ Af, B @ A, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(A0, A[:rank])  # the trained slots are the FIRST r_k, not a random pick


# --------------------------------------------------------------------------- head rules


def heads(value: float) -> dict[str, torch.Tensor]:
    return {"classifier.weight": torch.full((3, 4), value), "classifier.bias": torch.full((3,), value)}


def test_fedavg_head_is_the_weighted_mean_of_every_client() -> None:
    rule = make_head_rule("fedavg", [4, 16])
    new = rule.aggregate(rule.init_state(heads(0.0)), [HeadReply(4, 1.0, heads(1.0)), HeadReply(16, 3.0, heads(5.0))])
    assert torch.allclose(new["classifier.weight"], torch.full((3, 4), 4.0))
    assert torch.equal(rule.for_rank(new, 4)["classifier.bias"], rule.for_rank(new, 16)["classifier.bias"])


def test_tier_head_averages_within_each_tier_and_falls_back_to_all_clients() -> None:
    rule = make_head_rule("tier", [4, 16, 8])
    replies = [HeadReply(4, 1.0, heads(1.0)), HeadReply(4, 1.0, heads(3.0)), HeadReply(16, 2.0, heads(10.0))]
    new = rule.aggregate(rule.init_state(heads(0.0)), replies)
    assert torch.allclose(rule.for_rank(new, 4)["classifier.weight"], torch.full((3, 4), 2.0))
    assert torch.allclose(rule.for_rank(new, 16)["classifier.weight"], torch.full((3, 4), 10.0))
    # nobody of tier 8 replied: its head is the mean over all clients, (1 + 3 + 2·10) / 4
    assert torch.allclose(rule.for_rank(new, 8)["classifier.bias"], torch.full((3,), 6.0))
    assert set(rule.for_client(new, 16)) == set(heads(0.0))


def test_frozen_head_is_never_sent_and_never_changes() -> None:
    rule = make_head_rule("frozen", [4, 16])
    state = rule.init_state(heads(0.5))
    assert rule.for_client(state, 16) == {}
    assert torch.equal(rule.aggregate(state, [HeadReply(4, 1.0, {})])["classifier.weight"], heads(0.5)["classifier.weight"])


def test_unknown_head_rule_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="server.head"):
        make_head_rule("median", [4])
    assert set(HEAD_RULES) == {"fedavg", "tier", "frozen"}


@pytest.mark.parametrize(("spec", "expected"), [
    ("replication", ["method=replication"]),
    ("replication+tier", ["method=replication", "server.head=tier"]),
    ("fedit@5+frozen", ["method=fedit", "ranks.policy=fixed", "ranks.values=[5]", "ranks.fractions=[]",
                        "server.head=frozen"]),
])
def test_compare_specs_name_the_head_rule(spec: str, expected: list[str]) -> None:
    assert method_overrides(spec) == expected


def test_compare_rejects_an_unknown_head_rule() -> None:
    with pytest.raises(ConfigError, match="HEAD"):
        method_overrides("replication+median")


# --------------------------------------------------------------------------- dynamics


def test_inner_product_and_difference_match_dense_products() -> None:
    x, y = random_factors(2, 5), random_factors(3, 3)
    assert dynamics.inner(x, y) == pytest.approx(float(dense(x) @ dense(y)), rel=1e-10)
    assert np.allclose(dense(dynamics.difference(x, y)), dense(x) - dense(y), rtol=1e-10, atol=1e-10)


def test_tier_norms_split_the_product_by_slot_ranges() -> None:
    f = random_factors(4, 8)
    norms = dynamics.tier_norms(f, [2, 8, 5], scale=2.0)
    assert list(norms) == ["tier_norm_r2", "tier_norm_r5", "tier_norm_r8"]
    for key, (lo, hi) in zip(norms, [(0, 2), (2, 5), (5, 8)]):
        assert norms[key] == pytest.approx(2.0 * np.linalg.norm(dense(f, lo, hi)), rel=1e-10)


def test_update_cosine_matches_the_dense_cosine_and_is_none_for_no_change() -> None:
    a, b, c = random_factors(5, 4), random_factors(6, 4), random_factors(7, 4)
    u, v = dense(c) - dense(b), dense(b) - dense(a)
    assert dynamics.update_cosine(a, b, c) == pytest.approx(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)),
                                                            rel=1e-9)
    assert dynamics.update_cosine(a, b, b) is None
    assert dynamics.update_cosine(a, b, {k: (A, 2 * B) for k, (A, B) in b.items()}) == pytest.approx(
        dynamics.cosine(b, dynamics.difference(b, a)), rel=1e-9)


# --------------------------------------------------------------------------- end to end (tiny)

TINY = ["rounds=3", "clients.count=4", "clients.per_round=3", "train.local_steps=2", "train.batch_size=4",
        "train.max_length=32", "ranks.values=[2,4,2,8]", "eval.max_examples=32", "eval.final_full=false",
        "data.max_train_examples=120", "data.partition=iid", "threads=1", "eval.dynamics=true"]


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_frozen_head_run_keeps_the_initial_head_and_sends_no_head(tmp_path: Path) -> None:
    execute(load_config(None, TINY + ["method=replication", "server.head=frozen", "rounds=1"]), tmp_path / "frozen")
    execute(load_config(None, TINY + ["method=replication", "rounds=1"]), tmp_path / "fedavg")
    ckpt = {name: load_file(str(tmp_path / name / "checkpoints" / "round-0001.safetensors"))
            for name in ("frozen", "fedavg")}
    head_bytes = sum(t.numel() * 4 for k, t in ckpt["fedavg"].items() if k.startswith("head/"))
    frozen, fedavg = rows(tmp_path / "frozen")[0], rows(tmp_path / "fedavg")[0]
    assert fedavg["upload_bytes"] - frozen["upload_bytes"] == 3 * head_bytes  # three clients, no head each way
    assert fedavg["download_bytes"] - frozen["download_bytes"] == 3 * head_bytes
    from fedrank.experiment import build
    initial = build(load_config(None, TINY)).model.get_head()
    for name, t in initial.items():
        assert torch.equal(ckpt["frozen"][f"head/{name}"], t)
        assert not torch.equal(ckpt["fedavg"][f"head/{name}"], t)


def test_tier_head_run_stores_one_head_per_tier_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = TINY + ["method=orderedfold", "server.head=tier"]
    execute(load_config(None, cfg), tmp_path / "straight")
    execute(load_config(None, cfg + ["rounds=2"]), tmp_path / "resumed")
    execute(load_config(None, cfg), tmp_path / "resumed")  # resume from round 2's checkpoint
    untimed = [[{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows(tmp_path / n)]
               for n in ("straight", "resumed")]
    assert untimed[0] == untimed[1]
    last = untimed[0][-1]
    assert {"tier_norm_r2", "tier_norm_r4", "tier_norm_r8", "high_update_cos"} <= last.keys()
    assert last["high_update_cos"] is None or -1.0 <= last["high_update_cos"] <= 1.0
    ckpt = load_file(str(tmp_path / "straight" / "checkpoints" / "round-0003.safetensors"))
    assert {k.split("/")[1] for k in ckpt if k.startswith("head/")} == {"r2", "r4", "r8"}


def test_quality_by_size_raises_the_largest_clients_without_a_validation_pass(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``ranks.quality_by = "size"`` ranks the clients by their training examples, so the server never asks them
    for validation scores; the largest half trains at the high rank from round 2 on."""
    from fedrank.runtime.local import LocalRuntime

    def no_validation(*args: object, **kwargs: object) -> None:
        raise AssertionError("quality_by=size asked the clients for validation scores")

    monkeypatch.setattr(LocalRuntime, "validate", no_validation)
    cfg = load_config(None, TINY + ["ranks.policy=quality", "ranks.values=[2,8]", "ranks.top_fraction=0.5",
                                    "ranks.quality_by=size", "rounds=3", "eval.tiers=false"])
    sizes = build(cfg).sizes
    execute(cfg, tmp_path)
    largest = set(sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))[:2])
    for row in rows(tmp_path)[1:]:
        assert {c for c, r in zip(row["clients"], row["ranks"]) if r == 8} == largest & set(row["clients"])


def test_zero_padding_never_revives_slots_nobody_held_in_round_one(tmp_path: Path) -> None:
    """The quality policy starts every client at the low rank, so round 1 zero-fills A and B of the high slots;
    A = B = 0 is a stationary point of LoRA (each factor's gradient is the other factor times the output
    gradient), so under zero padding they stay exactly zero and the method is FedIT at the low rank.  Update-space
    padding keeps the unheld slots at their previous values (A at its seeded init) and they train."""
    quality = TINY + ["ranks.policy=quality", "ranks.values=[2,8]", "ranks.top_fraction=0.5", "eval.every=3",
                      "eval.tiers=false"]
    norms = {}
    for method in ("zeropad", "updatepad"):
        execute(load_config(None, quality + [f"method={method}"]), tmp_path / method)
        norms[method] = [r["tier_norm_r8"] for r in rows(tmp_path / method)]
        assert any(8 in r["ranks"] for r in rows(tmp_path / method)[1:])  # a rank-8 client trained after round 1
    assert norms["zeropad"] == [0.0, 0.0, 0.0]
    assert norms["updatepad"][0] == 0.0 and norms["updatepad"][-1] > 0.0
