"""Bad input ends in one line and exit code 2, not a traceback; instruct reports its own metrics only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from fedrank.cli import app
from fedrank.config import load_config
from fedrank.tasks import Encoded, Instruct

LATIN1 = "Caf\xe9 prices rose".encode("latin-1")  # 0xe9 alone is not UTF-8


def one_line_error(tmp_path: Path, *settings: str) -> str:
    args = ["run", "--out", str(tmp_path / "o")] + [x for s in settings for x in ("--set", s)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    return result.output.strip()


@pytest.mark.parametrize(("name", "good", "bad", "line", "column"), [
    ("data.jsonl", b'{"text": "Shares rose", "label": "business"}\n', b'{"text": "%s", "label": "business"}\n', 2, 14),
    ("data.csv", b"text,label\nShares rose,business\n", b"%s,business\n", 3, 4),
])
def test_a_data_file_that_is_not_utf8_names_the_file_and_line(name: str, good: bytes, bad: bytes, line: int,
                                                                 column: int, tmp_path: Path) -> None:
    path = tmp_path / name
    path.write_bytes(good + bad.replace(b"%s", LATIN1) + good.splitlines(keepends=True)[-1])
    assert one_line_error(tmp_path, f'data.dataset="{path}"') == \
        f"error: {path} line {line} is not UTF-8 (byte 0xe9 at column {column}): save the file as UTF-8"


def test_instruct_pairs_that_are_not_utf8_name_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "Hi", "response": "Hello"}\n\n{"prompt": "' + LATIN1 + b'", "response": "x"}\n')
    assert f"{path} line 3 is not UTF-8" in one_line_error(tmp_path, "task=instruct", f'data.dataset="{path}"')


def test_max_length_beyond_the_models_positions_is_refused(tmp_path: Path) -> None:
    message = one_line_error(tmp_path, "train.max_length=100000", "data.max_train_examples=100")
    assert message == "error: train.max_length=100000 exceeds the 512 positions of model `minilm`: set " \
                      "train.max_length ≤ 512"


def test_instruct_reports_loss_and_perplexity_only() -> None:
    """Its metrics (what metrics.jsonl records) carry no accuracy and no internal score field; a client's
    validation score is minus the loss."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32)).eval()
    task = Instruct(load_config(None, ["task=instruct", "device=cpu"]))
    data = Encoded([[1, 5, 6, 7, 2], [1, 8, 9, 2]], [0, 0], [3, 2], task)
    metrics = task.evaluate(model, data, batch_size=2, pad_id=0)
    assert set(metrics) == {"loss", "perplexity", "tokens"} and metrics["tokens"] == 2 + 2
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert task.score(metrics) == -metrics["loss"]
    assert json.loads(json.dumps(metrics)) == metrics  # plain JSON numbers: no NaN, no None
