"""Reload an exported adapter the way a user would, and evaluate it."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from fedrank.client import encode, evaluate
from fedrank.config import Config
from fedrank.data import load_splits
from fedrank.models import load_classifier


def evaluate_exported(cfg: Config, adapter: Path) -> dict[str, float]:
    """``PeftModel.from_pretrained(base, adapter)`` on the run's test split (the same split for the same seed)."""
    splits = load_splits(cfg.data, cfg.seed)
    loaded = load_classifier(cfg.model.name, len(splits.test.label_names), cfg.seed)
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    test = encode(loaded.tokenizer, splits.test.texts, splits.test.labels, cfg.train.max_length)
    metrics = evaluate(model, test, len(splits.test.label_names), cfg.eval.batch_size, loaded.tokenizer.pad_token_id)
    return {**metrics, "examples": len(test)}
