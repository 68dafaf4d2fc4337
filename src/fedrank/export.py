"""Reload an exported adapter the way a user would, and evaluate it."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from fedrank.config import Config
from fedrank.tasks import make_task


def evaluate_exported(cfg: Config, adapter: Path) -> dict[str, float]:
    """``PeftModel.from_pretrained(base, adapter)`` on the run's test split (the same split for the same seed)."""
    task = make_task(cfg)
    splits = task.load_data()
    loaded = task.load_model(splits.test.label_names)
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    test = task.encode(splits.test)
    metrics = task.evaluate(model, test, cfg.eval.batch_size, loaded.tokenizer.pad_token_id,
                            num_labels=len(splits.test.label_names))
    return {**metrics, "examples": len(test)}
