"""Mixed precision (`precision`) and the wire dtype (`comm.dtype`), all on CPU.

bf16 and fp32 runs of a tiny config both learn; a bf16 run is deterministic; fp16 trains through a
loss scaler; LoRA factors, head and everything checkpointed or exported stay fp32; `comm.dtype`
changes what is sent (and counted) but the server aggregates in fp32.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrank import wire
from fedrank.adapters import AdaptedModel
from fedrank.client import split_head
from fedrank.compute import Compute
from fedrank.config import load_config
from fedrank.data import load_splits
from fedrank.experiment import build, eval_subset
from fedrank.job import execute
from fedrank.methods import Task
from fedrank.runtime import flower

sys.path.insert(0, str(Path(__file__).parent))
from test_run import adapter, metrics, untimed  # noqa: E402

LEARN = [  # small, but enough steps that the global model beats the majority class
    "rounds=3", "clients.count=2", "clients.per_round=2", "train.local_steps=6", "train.batch_size=8",
    "train.max_length=32", "train.lr=5e-3", "ranks.values=[4,8]", "eval.max_examples=64", "eval.final_full=false",
    "data.max_train_examples=200", "data.partition=iid", "threads=1", "device=cpu",
]


def run(out: Path, *overrides: str) -> Path:
    execute(load_config(None, LEARN + list(overrides)), out)
    return out


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("bf16"), "precision=bf16")


def majority_rate() -> float:
    cfg = load_config(None, LEARN)
    labels = eval_subset(load_splits(cfg.data, cfg.seed).test, cfg.eval.max_examples, cfg.seed).labels
    return max(Counter(labels).values()) / len(labels)


def assert_all_fp32(out: Path) -> None:
    """The last checkpoint and the exported adapter hold only CPU fp32 tensors."""
    ckpt = sorted((out / "checkpoints").glob("round-*.safetensors"))[-1]
    for tensors in (load_file(str(ckpt)), adapter(out)):
        assert tensors and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())


@pytest.mark.parametrize("which", ["fp32_run", "bf16_run"])
def test_fp32_and_bf16_runs_both_learn(which: str, request: pytest.FixtureRequest) -> None:
    rows = metrics(request.getfixturevalue(which))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["accuracy"] > majority_rate() + 0.2


def test_bf16_differs_from_fp32_but_keeps_everything_stored_in_fp32(fp32_run: Path, bf16_run: Path) -> None:
    losses = [[r["loss"] for r in metrics(out)] for out in (fp32_run, bf16_run)]
    assert losses[0] != losses[1]  # autocast is really on ...
    assert losses[1] == pytest.approx(losses[0], abs=0.05)  # ... and close to fp32
    assert_all_fp32(bf16_run)


def test_same_seed_bf16_runs_are_identical(bf16_run: Path, tmp_path: Path) -> None:
    again = run(tmp_path, "precision=bf16")
    assert untimed(metrics(again)) == untimed(metrics(bf16_run))
    first, second = adapter(bf16_run), adapter(again)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_autocast_computes_in_low_precision_but_parameters_and_gradients_stay_fp32() -> None:
    layer = torch.nn.Linear(8, 4)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        compute = Compute(torch.device("cpu"), precision)
        with compute.autocast():
            out = layer(torch.randn(2, 8))
        assert out.dtype == dtype
        out.float().sum().backward()
        assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32
        assert compute.scaler().is_enabled() is (precision == "fp16")
        layer.zero_grad()


def test_fp16_trains_through_a_loss_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, LEARN + ["precision=fp16", "train.local_steps=2", "train.batch_size=2",
                                     "train.max_length=16", "data.max_train_examples=40"])
    exp = build(cfg)
    scalers: list[torch.amp.GradScaler] = []
    real = Compute.scaler

    def spy(self: Compute) -> torch.amp.GradScaler:
        scalers.append(real(self))
        return scalers[-1]

    monkeypatch.setattr(Compute, "scaler", spy)
    task = Task(0, 4, 1)
    payload = exp.method.payload(exp.method.init_state(), task)
    reply, stats = exp.client.fit(task, payload)
    assert len(scalers) == 1 and scalers[0].is_enabled() and scalers[0].get_scale() > 1
    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    upload, _ = split_head(reply.tensors)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in upload.values())
    assert any(not torch.equal(upload[k], payload[k]) for k in upload if k.endswith("#B"))  # it trained
    assert all(p.dtype == torch.float32 for p in exp.model.peft.parameters() if p.requires_grad)


def fit_one_client(precision: str) -> tuple[float, dict[str, torch.Tensor], AdaptedModel]:
    exp = build(load_config(None, LEARN + [f"precision={precision}", "train.local_steps=3"]))
    task = Task(0, 8, 1)  # rank 8: an adapter created after the base was cast
    reply, stats = exp.client.fit(task, exp.method.payload(exp.method.init_state(), task))
    return stats["train_loss"], reply.tensors, exp.model


def test_the_frozen_base_is_stored_in_the_autocast_dtype_and_trains_as_if_cast_every_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    stored_loss, stored, model = fit_one_client("bf16")
    frozen = [m.weight for n, m in model.peft.named_modules()
              if isinstance(m, torch.nn.Linear) and "lora_" not in n and "classifier" not in n]
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen)
    trainable = [p for n, p in model.peft.named_parameters() if "lora_" in n or "classifier" in n]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # every rank's factors and the head
    assert all(w.dtype == torch.float32 for w in model.W0.values())
    monkeypatch.setattr(AdaptedModel, "_store_frozen_linears", lambda self, dtype: None)  # fp32 base, cast per matmul
    cast_loss, cast, _ = fit_one_client("bf16")
    assert stored_loss == pytest.approx(cast_loss, rel=1e-6)
    for k in cast:
        torch.testing.assert_close(stored[k], cast[k], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- comm.dtype


def test_comm_bf16_halves_the_bytes_sent_and_the_server_keeps_fp32(fp32_run: Path, tmp_path: Path) -> None:
    out = run(tmp_path, "comm.dtype=bf16")
    full, half = metrics(fp32_run), metrics(out)
    for a, b in zip(full, half):
        assert (b["upload_bytes"], b["download_bytes"]) == (a["upload_bytes"] // 2, a["download_bytes"] // 2)
    assert half[-1]["accuracy"] > majority_rate() + 0.2
    assert_all_fp32(out)
    assert load_config(out / "config.toml").comm.dtype == "bf16"


def test_wire_casts_floats_only_and_round_trips() -> None:
    tensors = {"x#A": torch.randn(3, 4), "x#B": torch.randn(5, 3), "modules": torch.tensor([2, 0, 1])}
    for dtype, torch_dtype in wire.DTYPES.items():
        sent = wire.encode(tensors, dtype)
        assert sent["x#A"].dtype == sent["x#B"].dtype == torch_dtype and wire.dtype_of(sent) == dtype
        assert torch.equal(sent["modules"], tensors["modules"])
        back = wire.decode(sent)
        assert back["x#A"].dtype == torch.float32
        torch.testing.assert_close(back["x#A"], tensors["x#A"], rtol=1e-2, atol=1e-2)
        # the Flower codec goes through NumPy, which has no bfloat16: still bit-exact
        record = flower.from_record(flower.to_record(sent))
        assert record.keys() == sent.keys() and all(
            record[k].dtype == sent[k].dtype and torch.equal(record[k], sent[k]) for k in sent)
    assert wire.dtype_of({"modules": torch.tensor([1])}) == "fp32"


# --------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_recomputes_activations_and_gives_the_same_training() -> None:
    results = []
    for checkpointing in ("false", "true"):
        exp = build(load_config(None, LEARN + ["train.local_steps=3", f"train.gradient_checkpointing={checkpointing}"]))
        calls = []
        inside = exp.model.peft.get_base_model().bert.encoder.layer[0].intermediate  # a module within a layer
        inside.register_forward_hook(lambda *_: calls.append(1))
        task = Task(0, 4, 1)
        reply, stats = exp.client.fit(task, exp.method.payload(exp.method.init_state(), task))
        results.append((len(calls), stats["train_loss"], reply.tensors))
    (plain_calls, plain_loss, plain), (ckpt_calls, ckpt_loss, ckpt) = results
    assert (plain_calls, ckpt_calls) == (3, 6)  # the backward pass ran the checkpointed layer again
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6)


def test_a_linear_tied_to_the_embeddings_stays_fp32_so_the_residual_stream_does_too() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    model = AdaptedModel(base, ["q_proj", "v_proj"], [], 1.0, "shared", 0.0, 4, "CAUSAL_LM",
                         frozen_dtype=torch.bfloat16)
    inner = model.peft.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert inner.lm_head.weight.dtype == torch.float32
    layer = inner.model.layers[0]
    assert layer.self_attn.q_proj.base_layer.weight.dtype == layer.mlp.up_proj.weight.dtype == torch.bfloat16
    with Compute(torch.device("cpu"), "bf16").autocast():
        hidden = inner.model.embed_tokens(torch.tensor([[1, 2, 3]]))
    assert hidden.dtype == torch.float32
