"""The exported adapter: the card written beside it, and reloading it the way a user would to evaluate it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel

from fedrank.config import Config
from fedrank.models import BASE_NOTES, hub_id

#: attribute of a base model loaded for a run: the README.md written beside an adapter exported from it
CARD = "fedrank_card"


def training_card(cfg: Config, label_names: Sequence[str], targets: Sequence[str], precision: str) -> str:
    """A short README saying what the adapter is and how it was trained."""
    base, r, t = hub_id(cfg.model.name), cfg.ranks, cfg.train
    classify = cfg.task == "classify"
    auto = "AutoModelForSequenceClassification" if classify else "AutoModelForCausalLM"
    local = (f"{t.local_epochs:g} local epochs" if t.local_epochs > 0 else f"{t.local_steps} local steps") + \
        f" of batch {t.batch_size} (AdamW, lr {t.lr:g}), at most {t.max_length} tokens per example"
    lines = [
        "---", f"base_model: {base}", "library_name: peft", "---",  # the metadata PEFT's model card updates
        "# fedrank LoRA adapter", "",
        f"A LoRA adapter for `{base}`, trained with fedrank: federated fine-tuning across clients whose adapters "
        "have different ranks.", "",
        f"- base model: `{base}`" + (f"; {BASE_NOTES[cfg.model.name]}" if cfg.model.name in BASE_NOTES else ""),
        f"- task: `{cfg.task}`" + (f"; labels in order: {', '.join(label_names)}" if classify else ""),
        f"- method: `{cfg.method}`; LoRA on {', '.join(targets)}; "
        f"scale s = {cfg.model.scale:g} (ΔW = s·B·A)",
        f"- client ranks: policy `{r.policy}`, values {r.values}"
        + (f", fractions {r.fractions}" if r.fractions else ""),
        f"- federation: {cfg.rounds} rounds, {cfg.clients.per_round} of {cfg.clients.count} clients per round, {local}",
        f"- data: `{cfg.data.dataset}`, `{cfg.data.partition}` partition",
        f"- seed {cfg.seed}; precision {precision}; tensors sent in {cfg.comm.dtype}", "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        f'base = {auto}.from_pretrained("{base}"' + (f", num_labels={len(label_names)})" if classify else ")"),
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```", "", "",
    ]
    return "\n".join(lines)


def evaluate_exported(cfg: Config, adapter: Path) -> dict[str, float]:
    """``PeftModel.from_pretrained(base, adapter)`` on the run's test split (the same split for the same seed).

    The base is the run's model as fedrank loads it (a packaged model from its local folder), on the run's device.
    """
    from fedrank.tasks import make_task

    task = make_task(cfg)
    splits = task.load_data()
    loaded = task.load_model(splits.test.label_names)
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    test = task.encode(splits.test)
    metrics = task.evaluate(model, test, cfg.eval.batch_size, loaded.tokenizer.pad_token_id,
                            num_labels=len(splits.test.label_names))
    return {**metrics, "examples": len(test)}
