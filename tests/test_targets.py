"""Architecture-aware LoRA targets and heads, and portable exported adapters.

With ``model.target_modules = []`` the targets are PEFT's default for the model's architecture, so a
causal LM (SmolLM2) works as a sequence classifier; the exported adapter names the packaged model's hub
id, carries a README saying how it was trained, and still evaluates offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification
from typer.testing import CliRunner

from fedrank.adapters import AdaptedModel, default_lora_targets
from fedrank.cli import app
from fedrank.config import ConfigError, load_config
from fedrank.tasks import Classify

BERT_LINEAR = "classifier, dense, key, query, value"


def tiny_bert() -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=16, num_labels=3))


def tiny_llama() -> LlamaForSequenceClassification:
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=1,
                                                      intermediate_size=16, num_labels=3, pad_token_id=0))


def test_default_targets_and_heads_follow_the_architecture() -> None:
    task = Classify(load_config(None, []))
    assert default_lora_targets(tiny_bert()) == ["query", "value"] and task.heads_of(tiny_bert()) == ["classifier"]
    assert default_lora_targets(tiny_llama()) == ["q_proj", "v_proj"] and task.heads_of(tiny_llama()) == ["score"]


def test_an_architecture_without_a_default_lists_its_linear_modules() -> None:
    model = tiny_bert()
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match=f"no default LoRA targets for model type `mystery`.*\\({BERT_LINEAR}\\)"):
        default_lora_targets(model)


def test_a_missing_target_lists_the_models_linear_modules() -> None:
    with pytest.raises(ConfigError) as err:
        AdaptedModel(tiny_bert(), ["query", "q_proj"], ["classifier"], 2.0, "shared", 0.0, 4)
    assert str(err.value) == ("model.target_modules ['q_proj'] not found in the model: its Linear modules are "
                              f"{BERT_LINEAR}")


@pytest.fixture(scope="module")
def topics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short two-topic examples: a test split small enough to evaluate a 135M model on in seconds."""
    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    sport = ["The striker scored twice", "The match ended in a draw", "Our keeper saved a penalty",
             "The team won the cup final", "He ran the marathon in record time"]
    business = ["Shares fell sharply today", "The bank raised interest rates", "Profits rose by ten percent",
                "The firm cut two hundred jobs", "Oil prices hit a new high"]
    rows = [{"text": f"{t} ({i}).", "label": label} for i in range(4)
            for label, texts in (("sport", sport), ("business", business)) for t in texts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(("model", "hub_id", "head"), [
    ("minilm", "sentence-transformers/all-MiniLM-L6-v2", "classifier"),
    ("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "score"),
])
def test_classify_exports_a_portable_adapter_that_evaluates_offline(model: str, hub_id: str, head: str,
                                                                    topics: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, [
        "run", "--quiet", "--out", str(out), "--set", f"model.name={model}", "--set", f'data.dataset="{topics}"',
        "--set", "rounds=2", "--set", "clients.count=2", "--set", "clients.per_round=2", "--set", "ranks.values=[2,4]",
        "--set", "train.local_steps=2", "--set", "train.batch_size=4", "--set", "train.max_length=16",
        "--set", "data.partition=iid", "--set", "data.test_fraction=0.25", "--set", "eval.batch_size=16",
        "--set", "threads=1", "--set", "seed=3", "--set", "method=replication"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == hub_id
    assert set(config["target_modules"]) == ({"query", "value"} if model == "minilm" else {"q_proj", "v_proj"})
    assert config["modules_to_save"] == [head]
    card = (out / "adapter" / "README.md").read_text()
    for fact in (f"`{hub_id}`", "method: `replication`", "values [2, 4]", "2 rounds", "seed 3",
                 "labels in order: business, sport", f'from_pretrained("{hub_id}", num_labels=2)'):
        assert fact in card, fact
    assert ("dequantised from the Q4_1 GGUF" in card) is (model == "smollm2")

    summary = json.loads((out / "summary.json").read_text())
    evaluated = runner.invoke(app, ["eval", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert f"accuracy {summary['final_accuracy']:.4f}" in evaluated.output
    assert f"({summary['final_eval_examples']} test examples)" in evaluated.output
