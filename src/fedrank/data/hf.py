"""Hugging Face datasets as a labelled text source: a hub name or a ``save_to_disk`` folder.

Its own module so that the ``datasets`` library is imported only when a run reads Hugging Face data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from fedrank.config import ConfigError, DataConfig
from fedrank.data.sources import Splits, _check_example, _check_fields, _encode, _label_names, _split_by_group


def _is_saved(path: Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (of a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _open_hf(name: str) -> datasets.Dataset | datasets.DatasetDict:
    """``load_from_disk`` for a ``save_to_disk`` folder, else ``load_dataset`` (hub name or data folder)."""
    try:
        return datasets.load_from_disk(name) if _is_saved(Path(name)) else datasets.load_dataset(name)
    except Exception as err:  # load_dataset raises many unrelated types for "cannot get it"
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"cannot load dataset `{name}` ({type(err).__name__}: {reason}): without network access, "
            "pass a local .jsonl/.csv file or a save_to_disk folder as data.dataset"
        ) from None


def _hf_columns(split: datasets.Dataset, cfg: DataConfig, where: str) -> tuple[list[str], list[Any]]:
    """Checked texts and raw labels (ClassLabel ids become their names)."""
    _check_fields(split.column_names, cfg, where)
    raw = split[cfg.label_field]
    feature = split.features[cfg.label_field]
    if isinstance(feature, datasets.ClassLabel):
        raw = feature.int2str(list(raw))
    texts = [_check_example(t, y, cfg, f"{where} row {i}") for i, (t, y) in enumerate(zip(split[cfg.text_field], raw))]
    return texts, list(raw)


def _hf_label_names(feature: Any, raw: Sequence[Any], cfg: DataConfig) -> list[str]:
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return _label_names(raw, cfg.dataset, cfg.label_field)


def hf_splits(cfg: DataConfig, seed: int) -> Splits:
    """Split ``train`` and, if present, ``cfg.test_split``; else a seeded stratified split of ``train``."""
    loaded = _open_hf(cfg.dataset)
    parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    if "train" not in parts:
        raise ConfigError(f"dataset `{cfg.dataset}` has no `train` split (splits: {', '.join(parts)})")
    feature = parts["train"].features.get(cfg.label_field)
    texts, raw = _hf_columns(parts["train"], cfg, f"dataset `{cfg.dataset}` split `train`")
    if cfg.test_split not in parts:
        data = _encode(texts, raw, _hf_label_names(feature, raw, cfg))
        return _split_by_group(data, range(len(data)), cfg.test_fraction, seed, cfg.dataset)
    test_texts, test_raw = _hf_columns(parts[cfg.test_split], cfg, f"dataset `{cfg.dataset}` split `{cfg.test_split}`")
    names = _hf_label_names(feature, raw + test_raw, cfg)
    return Splits(_encode(texts, raw, names), _encode(test_texts, test_raw, names))


def saved_examples(path: Path, cfg: DataConfig, key: str) -> tuple[list[str], list[Any]]:
    """Checked texts and raw labels of a ``save_to_disk`` folder: the dataset, or its ``train`` split."""
    if not _is_saved(path):
        raise ConfigError(f"{path} is not a datasets save_to_disk folder: pass a .jsonl/.csv file or such a folder "
                          f"as {key}")
    loaded = _open_hf(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"{path} has no `train` split (splits: {', '.join(loaded)}): save the data as a "
                              "Dataset or put it under `train`")
        loaded = loaded["train"]
    return _hf_columns(loaded, cfg, str(path))
