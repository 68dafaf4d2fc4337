"""Causal-LM tasks (generate-label, instruct) on the packaged SmolLM2-135M-Instruct, in tiny settings.

SmolLM2 is converted from its GGUF file once into the fedrank cache (about 20 s the first time,
then about 0.5 s per load).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from rich.console import Console
from torch.nn import functional as F

from fedrank import checkpoint
from fedrank.cli import _table
from fedrank.client import split_head
from fedrank.config import load_config
from fedrank.data import TextDataset
from fedrank.experiment import build
from fedrank.headline import final_line
from fedrank.job import execute
from fedrank.report import load_run, write_report
from fedrank.tasks import GenerateLabel, Instruct, PairDataset, answer_loss, collate, make_task

from closeness import LOSS_RTOL, MODEL_RTOL, effect_gap, scaled_factors

TINY = [
    "task=generate-label", "model.name=smollm2", "rounds=1", "clients.count=2", "clients.per_round=2",
    "train.local_steps=1", "train.batch_size=2", "train.max_length=24", "ranks.values=[2,4]",
    "eval.max_examples=4", "eval.final_full=false", "eval.tiers=false", "eval.batch_size=4",
    "data.max_train_examples=16", "data.partition=iid", "data.prompt_template={text}\nTopic:", "threads=1",
]


@pytest.fixture(scope="module")
def label_task() -> GenerateLabel:
    task = make_task(load_config(None, TINY))
    task.load_model(["business", "sport"])
    return task


@pytest.fixture(scope="module")
def lm(label_task: GenerateLabel) -> torch.nn.Module:
    return label_task.load_model(["business", "sport"]).model


def full_logits_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independent reference: every position's full-vocabulary logits, then the answer tokens' mean NLL."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    answer = batch["loss_mask"][:, 1:]
    return -(logp * answer).sum() / answer.sum()


def test_loss_mask_covers_only_the_answer_tokens(label_task: GenerateLabel, tmp_path: Path) -> None:
    data = label_task.encode(TextDataset(["Shares rose sharply.", "A long match " * 30], [0, 1], ["business", "sport"]))
    batch = collate(data, [0, 1], label_task.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] <= 24 and batch["attention_mask"][1].all()
    for row, label in enumerate([0, 1]):
        answer = batch["input_ids"][row][batch["loss_mask"][row]].tolist()
        assert answer == label_task.candidates[label] == label_task.tokens(" " + ["business", "sport"][label])
        assert label_task.tokenizer.decode(batch["input_ids"][row][: data.starts[row]]).endswith("\nTopic:")
    # instruct: the loss covers the response and its end-of-turn token, not the chat-templated prompt
    instruct = Instruct(load_config(None, ["task=instruct", "model.name=smollm2", "train.max_length=64"]))
    instruct.tokenizer = label_task.tokenizer
    pairs = instruct.encode(PairDataset(["Say hi"], [0], ["response"], ["Hi there"]))
    b = collate(pairs, [0], instruct.tokenizer.pad_token_id)
    assert instruct.tokenizer.decode(b["input_ids"][0][b["loss_mask"][0]]) == "Hi there" + instruct.tokenizer.eos_token
    assert instruct.tokenizer.decode(b["input_ids"][0][: pairs.starts[0]]).endswith("<|im_start|>assistant\n")


def test_selected_positions_loss_equals_full_logits_loss(label_task: GenerateLabel, lm: torch.nn.Module) -> None:
    data = label_task.encode(TextDataset(["Profits fell.", "The striker scored twice in the final."], [0, 1],
                                         ["business", "sport"]))
    batch = collate(data, [0, 1], label_task.tokenizer.pad_token_id)  # rows of different lengths: padding
    batch["loss_mask"][1, data.starts[1] - 3 : data.starts[1]] = True  # several loss tokens in one row
    shifted = {**batch, "loss_mask": batch["loss_mask"].roll(1, dims=1)}  # the off-by-one it guards against
    with torch.no_grad():
        loss, reference, wrong = answer_loss(lm, batch), full_logits_nll(lm, batch), full_logits_nll(lm, shifted)
    # the lm head on the selected positions and on all of them are different fp32 paths
    assert float(loss) == pytest.approx(float(reference), rel=LOSS_RTOL)
    assert abs(float(wrong) - float(reference)) > 10 * LOSS_RTOL * float(reference)


@pytest.mark.parametrize("first_token", [True, False])
def test_label_likelihood_scoring_picks_the_right_label(label_task: GenerateLabel, lm: torch.nn.Module,
                                                        first_token: bool) -> None:
    words = ["New Delhi", "London", "Berlin"] if first_token else ["New Delhi", "New York", "Berlin"]
    task = GenerateLabel(label_task.cfg)
    task.tokenizer = label_task.tokenizer
    task.prefix, task.suffix = "", ""
    task.set_candidates([task.tokens(" " + w) for w in words])
    assert task.first_token_scoring is first_token
    prompts = ["The capital of India is", "The capital of the United Kingdom is London. The capital of Germany is"]
    data = Encoded_from(task, prompts, [0, 2])
    batch = collate(data, [0, 1], task.tokenizer.pad_token_id)
    with torch.no_grad():
        scores = task.label_scores(lm, batch)
        assert scores.argmax(-1).tolist() == [0, 2]
        if not first_token:  # the full log-likelihood of every label word, against full logits
            for row, prompt in enumerate(prompts):
                for k, cand in enumerate(task.candidates):
                    ids = torch.tensor([task.tokens(prompt) + cand])
                    logp = F.log_softmax(lm(input_ids=ids).logits[0, :-1], -1)
                    ref = logp[-len(cand):].gather(-1, ids[0, -len(cand):, None]).sum()
                    torch.testing.assert_close(scores[row, k], ref, rtol=1e-4, atol=1e-4)
    assert task.evaluate(lm, data, 2, task.tokenizer.pad_token_id)["accuracy"] == 1.0


def Encoded_from(task: GenerateLabel, prompts: list[str], labels: list[int]):
    from fedrank.tasks import Encoded

    ids = [task.tokens(p) + task.candidates[y] for p, y in zip(prompts, labels)]
    return Encoded(ids, labels, [len(task.tokens(p)) for p in prompts], task)


@pytest.mark.parametrize("method", ["fedplora", "flora", "ffa"])
def test_every_method_completes_a_tiny_round_on_the_causal_lm(method: str, tmp_path: Path) -> None:
    summary = execute(load_config(None, TINY + [f"method={method}"]), tmp_path)
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0 and row["upload_bytes"] > 0 and row["missing"] == []
    assert summary["method"] == method and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_exported_adapter_reloads_on_the_base_lm_with_identical_logits(tmp_path: Path) -> None:
    """replication, rank-heterogeneous: the export is a PEFT CAUSAL_LM adapter without modules_to_save."""
    cfg = load_config(None, TINY + ["method=replication"])
    summary = execute(cfg, tmp_path)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config["modules_to_save"]
    assert config["target_modules"] and set(config["target_modules"]) == {"q_proj", "v_proj"}

    exp = build(cfg)
    state, head = split_head(checkpoint.latest(tmp_path / "checkpoints").tensors)
    assert head == {}
    width = min(len(exp.test.ids[0]), len(exp.test.ids[1]))
    ids = torch.tensor([exp.test.ids[0][:width], exp.test.ids[1][:width]])
    factors = exp.method.global_factors(state)

    def merged(f) -> torch.Tensor:
        with torch.no_grad(), exp.model.merged(f) as net:
            return net(input_ids=ids).logits

    expected, base = merged(factors), merged({})
    reloaded = PeftModel.from_pretrained(exp.task.load_model(exp.splits.test.label_names).model,
                                         str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        # PEFT's unmerged forward is another fp32 path: compared relative to the adapter's effect on the logits,
        # which a 5% scaling error visibly changes
        assert effect_gap(expected, reloaded(input_ids=ids).logits, base) <= MODEL_RTOL
        assert effect_gap(expected, merged(scaled_factors(factors, 1.05)), base) > 2 * MODEL_RTOL
        again = exp.task.evaluate(reloaded, exp.test_round, 4, exp.loaded.tokenizer.pad_token_id)
    assert len(exp.test_round) == summary["final_eval_examples"]
    assert abs(again["accuracy"] - summary["final_accuracy"]) <= 1 / len(exp.test_round)  # one near-tie
    assert again["loss"] == pytest.approx(summary["final_loss"], rel=LOSS_RTOL)


def test_instruct_reports_perplexity_everywhere(tmp_path: Path) -> None:
    """metrics.jsonl, the per-tier evaluation, summary.json, the CLI table and final line and the report carry
    perplexity and loss; no accuracy key or column anywhere."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"q": f"Add {i} and 1.", "a": f"{i + 1}"}) + "\n" for i in range(12)))
    cfg = load_config(None, TINY + ["task=instruct", f"data.dataset={pairs}", "data.prompt_field=q",
                                    "data.response_field=a", "train.max_length=48", "method=replication",
                                    "data.test_fraction=0.25", "ranks.policy=quality", "ranks.top_fraction=0.5",
                                    "eval.tiers=true"])
    run = tmp_path / "run"
    summary = execute(cfg, run)
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [k for k in {**row, **summary} if "accuracy" in k or "macro_f1" in k]
    assert row["loss"] > 0 and row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    assert row["perplexity_r4"] == row["perplexity"] and row["perplexity_r2"] > 1.0  # the model truncated to rank 2
    assert summary["headline"] == "perplexity"
    assert summary["final_loss"] == pytest.approx(row["loss"]) and summary["final_perplexity"] == row["perplexity"]
    assert summary["best_round_perplexity"] == row["perplexity"]
    assert summary["final_tiers"] == {"perplexity_r2": row["perplexity_r2"], "perplexity_r4": row["perplexity_r4"]}

    console = Console(record=True, width=200)
    console.print(_table([row], summary))
    table = console.export_text()
    assert "perplexity" in table and f"{row['perplexity']:.4f}" in table and "accuracy" not in table
    assert final_line(summary) == f"final perplexity {row['perplexity']:.4f} on 3 test examples"

    path = write_report([load_run(run)], tmp_path / "report", target=1e9)  # any perplexity reaches it
    text = path.read_text()
    assert "| final perplexity | best perplexity |" in text and "accuracy" not in text
    assert f"| {row['perplexity']:.4f} ± 0.0000 |" in text and "| 1.0 (1/1) |" in text
    assert (tmp_path / "report" / "perplexity_by_tier.png").stat().st_size > 1000
