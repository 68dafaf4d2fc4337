"""Data sources (BBC News, JSONL/CSV, Hugging Face folders), partitioners and local splits."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from fedrank.config import ConfigError, DataConfig
from fedrank.data import Splits, TextDataset, load_splits
from fedrank.data.partition import high_quality_clients, local_split, partition
from fedrank.data.sources import bbc_articles

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]

# --------------------------------------------------------------------------- BBC News


@pytest.fixture(scope="module")
def bbc() -> Splits:
    return load_splits(DataConfig(), seed=0)


@pytest.fixture(scope="module")
def articles() -> list:
    return bbc_articles()


def test_bbc_has_five_topics_of_paragraph_examples(bbc: Splits, articles: list) -> None:
    assert bbc.train.label_names == TOPICS == bbc.test.label_names
    assert set(bbc.train.labels) == set(range(5)) == set(bbc.test.labels)
    total = sum(len(a.paragraphs) for a in articles)
    assert len(bbc.train) + len(bbc.test) == total
    assert len(bbc.train) > 7000 and 0.15 < len(bbc.test) / total < 0.25
    assert all(len(t) >= 40 and t == t.strip() for t in bbc.train.texts + bbc.test.texts)


def test_bbc_splits_by_article_and_stratifies_topics(bbc: Splits, articles: list) -> None:
    owner = {p: i for i, a in enumerate(articles) for p in a.paragraphs}
    assert len(owner) == len(bbc.train) + len(bbc.test)  # repeated paragraphs were dropped
    train_articles = {owner[t] for t in bbc.train.texts}
    test_articles = {owner[t] for t in bbc.test.texts}
    assert not train_articles & test_articles
    for split in (bbc.train, bbc.test):
        assert all(TOPICS[y] == articles[owner[t]].topic for t, y in zip(split.texts, split.labels))
    for topic in TOPICS:
        ids = {i for i, a in enumerate(articles) if a.topic == topic}
        assert len(ids & test_articles) == round(0.2 * len(ids))


def test_bbc_reads_latin1_files(bbc: Splits) -> None:
    texts = bbc.train.texts + bbc.test.texts
    assert any("£15.8m" in t and "Mutu" in t for t in texts)
    assert not any("\ufffd" in t for t in texts)


def test_bbc_is_deterministic_per_seed(bbc: Splits) -> None:
    assert load_splits(DataConfig(), seed=0) == bbc
    assert set(load_splits(DataConfig(), seed=1).test.texts) != set(bbc.test.texts)


def test_max_train_examples_subsamples_train_only(bbc: Splits) -> None:
    small = load_splits(DataConfig(max_train_examples=500), seed=0)
    assert len(small.train) == 500
    assert set(small.train.texts) <= set(bbc.train.texts)
    assert small.test == bbc.test
    assert load_splits(DataConfig(max_train_examples=500), seed=0) == small


def test_subset_keeps_order_and_label_names() -> None:
    data = TextDataset(["a", "b", "c"], [0, 1, 0], ["x", "y"])
    assert data.subset([2, 1]) == TextDataset(["c", "b"], [0, 1], ["x", "y"])
    assert len(data.subset([])) == 0


# --------------------------------------------------------------------------- JSONL / CSV files

RECORDS = [{"body": f"example text {i}", "topic": ["sport", "arts", "news"][i % 3], "id": i} for i in range(30)]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def check_split(splits: Splits, truth: dict[str, str], names: list[str], test_size: int) -> None:
    """Every example keeps its label, train and test are disjoint and cover the records."""
    assert splits.train.label_names == names == splits.test.label_names
    assert len(splits.test) == test_size
    assert not set(splits.train.texts) & set(splits.test.texts)
    assert set(splits.train.texts) | set(splits.test.texts) == set(truth)
    for split in (splits.train, splits.test):
        assert all(names[y] == truth[t] for t, y in zip(split.texts, split.labels))


@pytest.mark.parametrize("writer", [write_jsonl, write_csv], ids=["jsonl", "csv"])
def test_file_maps_fields_and_string_labels(tmp_path: Path, writer: Any) -> None:
    path = writer(tmp_path / f"data.{'jsonl' if writer is write_jsonl else 'csv'}", RECORDS)
    cfg = DataConfig(dataset=str(path), text_field="body", label_field="topic")
    splits = load_splits(cfg, seed=0)
    check_split(splits, {r["body"]: r["topic"] for r in RECORDS}, ["arts", "news", "sport"], test_size=6)
    assert load_splits(cfg, seed=0) == splits
    assert load_splits(cfg, seed=1) != splits


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    records = [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(12)]
    for path in (write_jsonl(tmp_path / "d.jsonl", records), write_csv(tmp_path / "d.csv", records)):
        splits = load_splits(DataConfig(dataset=str(path)), seed=0)
        check_split(splits, {r["text"]: str(r["label"]) for r in records}, ["1", "2", "10"], test_size=3)


def test_max_train_examples_applies_to_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    splits = load_splits(DataConfig(dataset=str(path), text_field="body", label_field="topic", max_train_examples=5), 0)
    assert len(splits.train) == 5 and len(splits.test) == 6


GOOD = '{"text": "fine", "label": "a"}\n{"text": "also fine", "label": "b"}\n'
BAD_FILES = {
    "malformed": ("d.jsonl", GOOD + '{"text": "oops", "label": \n', r"d\.jsonl line 3 is not valid JSON"),
    "not an object": ("d.jsonl", GOOD + "[1, 2]\n", r"line 3 is not a JSON object"),
    "missing text": (
        "d.jsonl",
        GOOD + '{"body": "x", "label": "a"}\n',
        r"line 3 has no field `text` \(fields: body, label\): set data\.text_field",
    ),
    "missing label": (
        "d.jsonl",
        '{"text": "x", "y": 1}\n',
        r"line 1 has no field `label` \(fields: text, y\): set data\.label_field",
    ),
    "empty text": ("d.jsonl", GOOD + '{"text": "  ", "label": "a"}\n', r"line 3 has an empty or non-string `text`"),
    "empty label": ("d.jsonl", GOOD + '{"text": "x", "label": ""}\n', r"line 3 has an empty `label`"),
    "single label": (
        "d.jsonl",
        '{"text": "x", "label": "a"}\n{"text": "y", "label": "a"}\n',
        r"1 distinct label\(s\) in `label`",
    ),
    "empty file": ("d.jsonl", "\n", r"0 distinct label\(s\)"),
    "csv missing column": ("d.csv", "body,label\nx,a\n", r"d\.csv line 2 has no field `text` \(fields: body, label\)"),
    "csv empty text": ("d.csv", "text,label\nx,a\n,b\n", r"d\.csv line 3 has an empty or non-string `text`"),
    "too few to split": ("d.jsonl", GOOD, r"too few examples per label to hold out a test split"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_give_one_line_config_errors(tmp_path: Path, name: str) -> None:
    filename, content, message = BAD_FILES[name]
    (tmp_path / filename).write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_splits(DataConfig(dataset=str(tmp_path / filename)), seed=0)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data file .*nope\.csv not found"):
        load_splits(DataConfig(dataset=str(tmp_path / "nope.csv")), seed=0)


# --------------------------------------------------------------------------- Hugging Face datasets


def test_saved_dataset_dict_uses_test_split_and_class_label_names(tmp_path: Path) -> None:
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["pos", "neg"])})
    train_rows = {"text": [f"tr{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
    train = datasets.Dataset.from_dict(train_rows, features)
    test = datasets.Dataset.from_dict({"text": ["te0", "te1", "te2"], "label": [1, 1, 0]}, features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    splits = load_splits(DataConfig(dataset=str(tmp_path / "saved")), seed=0)
    assert splits.train == TextDataset(train_rows["text"], train_rows["label"], ["pos", "neg"])
    assert splits.test == TextDataset(["te0", "te1", "te2"], [1, 1, 0], ["pos", "neg"])


def test_saved_dataset_without_test_split_is_split_with_seed(tmp_path: Path) -> None:
    datasets.Dataset.from_list(RECORDS).save_to_disk(tmp_path / "saved")
    cfg = DataConfig(dataset=str(tmp_path / "saved"), text_field="body", label_field="topic")
    splits = load_splits(cfg, seed=0)
    check_split(splits, {r["body"]: r["topic"] for r in RECORDS}, ["arts", "news", "sport"], test_size=6)


def test_data_folder_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", RECORDS[:24])
    write_jsonl(folder / "validation.jsonl", RECORDS[24:])
    cfg = DataConfig(dataset=str(folder), text_field="body", label_field="topic", test_split="validation")
    splits = load_splits(cfg, seed=0)
    assert splits.test.texts == [r["body"] for r in RECORDS[24:]]
    check_split(splits, {r["body"]: r["topic"] for r in RECORDS}, ["arts", "news", "sport"], test_size=6)


def test_saved_dataset_with_missing_column_names_columns(tmp_path: Path) -> None:
    datasets.Dataset.from_list(RECORDS).save_to_disk(tmp_path / "saved")
    with pytest.raises(ConfigError, match=r"split `train` has no field `text` \(fields: body, topic, id\)"):
        load_splits(DataConfig(dataset=str(tmp_path / "saved")), seed=0)


def test_unloadable_dataset_suggests_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> None:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = r"cannot load dataset `ag_news` \(ConnectionError: Couldn't reach 'ag_news' on the Hub\): .*\.jsonl/\.csv"
    with pytest.raises(ConfigError, match=message) as info:
        load_splits(DataConfig(dataset="ag_news"), seed=0)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- partitions

LABELS = np.random.default_rng(0).integers(0, 5, size=1000).tolist()
PARTITIONS = ["iid", "dirichlet", "quality"]


def label_entropy(shard: list[int], labels: list[int]) -> float:
    counts = np.array(list(Counter(labels[i] for i in shard).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("name", PARTITIONS)
@pytest.mark.parametrize(("n", "clients"), [(1000, 20), (1000, 1), (30, 5)])
def test_partition_is_disjoint_nonempty_covering_and_seeded(name: str, n: int, clients: int) -> None:
    cfg = DataConfig(partition=name)
    labels = LABELS[:n]
    shards = partition(labels, clients, cfg, seed=0)
    flat = [i for shard in shards for i in shard]
    assert len(shards) == clients and all(shards)
    assert sorted(flat) == list(range(n))
    assert all(shard == sorted(shard) for shard in shards)
    assert partition(labels, clients, cfg, seed=0) == shards
    if clients > 1:
        assert partition(labels, clients, cfg, seed=1) != shards


@pytest.mark.parametrize("name", ["iid", "quality"])
@pytest.mark.parametrize("n", [5, 7])
def test_minimal_data_still_fills_every_client(name: str, n: int) -> None:
    shards = partition(LABELS[:n], 5, DataConfig(partition=name, high_quality_fraction=0.2), seed=0)
    assert all(shards) and sorted(i for s in shards for i in s) == list(range(n))


def test_iid_shards_are_equal_sized() -> None:
    sizes = [len(s) for s in partition(LABELS, 7, DataConfig(partition="iid"), seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_small_alpha_skews_labels_more_than_iid() -> None:
    def mean_entropy(cfg: DataConfig) -> float:
        return float(np.mean([label_entropy(s, LABELS) for s in partition(LABELS, 20, cfg, seed=0)]))

    iid = mean_entropy(DataConfig(partition="iid"))
    skewed = mean_entropy(DataConfig(partition="dirichlet", alpha=0.1))
    assert iid > 0.95 * math.log(5)
    assert skewed < 0.6 * iid


@pytest.mark.parametrize("clients", [20, 10, 3])
def test_quality_clients_are_balanced_and_larger(clients: int) -> None:
    cfg = DataConfig(partition="quality", high_quality_fraction=0.2)
    shards = partition(LABELS, clients, cfg, seed=0)
    high = high_quality_clients(clients, cfg, seed=0)
    low = [c for c in range(clients) if c not in high]
    assert len(high) == math.ceil(0.2 * clients) and low
    assert all(len({LABELS[i] for i in shards[c]}) == 5 for c in high)
    assert all(len({LABELS[i] for i in shards[c]}) <= 2 for c in low)
    assert min(len(shards[c]) for c in high) > 2 * max(len(shards[c]) for c in low)


def test_high_quality_clients_count_and_seed() -> None:
    assert high_quality_clients(20, DataConfig(high_quality_fraction=0.1), seed=0) != high_quality_clients(
        20, DataConfig(high_quality_fraction=0.1), seed=1
    )
    assert len(high_quality_clients(30, DataConfig(high_quality_fraction=0.1), seed=0)) == 3
    assert len(high_quality_clients(10, DataConfig(high_quality_fraction=0.01), seed=0)) == 1
    assert high_quality_clients(10, DataConfig(high_quality_fraction=0.0), seed=0) == []


def test_quality_without_high_quality_clients_is_label_skewed() -> None:
    shards = partition(LABELS, 10, DataConfig(partition="quality", high_quality_fraction=0.0), seed=0)
    assert sorted(i for s in shards for i in s) == list(range(len(LABELS)))
    assert all(len({LABELS[i] for i in s}) <= 2 for s in shards)


@pytest.mark.parametrize("name", PARTITIONS)
def test_too_few_examples_for_clients(name: str) -> None:
    with pytest.raises(ConfigError, match=r"3 examples cannot fill 5 clients: lower clients\.count"):
        partition(LABELS[:3], 5, DataConfig(partition=name), seed=0)


def test_unknown_partition_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown data.partition `shards`: use one of iid, dirichlet, quality"):
        partition(LABELS, 5, DataConfig(partition="shards"), seed=0)


def test_impossible_dirichlet_asks_for_larger_alpha() -> None:
    message = r"alpha=0\.01 left a client empty.*raise data\.alpha or lower clients\.count"
    with pytest.raises(ConfigError, match=message):
        partition(LABELS[:10], 10, DataConfig(partition="dirichlet", alpha=0.01), seed=0)


def test_partition_of_real_bbc_labels(bbc: Splits) -> None:
    shards = partition(bbc.train.labels, 20, DataConfig(partition="dirichlet", alpha=0.5), seed=0)
    assert all(shards) and sum(map(len, shards)) == len(bbc.train)


# --------------------------------------------------------------------------- local splits


@pytest.mark.parametrize(
    ("size", "fraction", "val_size"),
    [(100, 0.1, 10), (25, 0.1, 2), (5, 0.1, 1), (2, 0.9, 1), (1, 0.5, 0), (50, 0.0, 0)],
)
def test_local_split_sizes(size: int, fraction: float, val_size: int) -> None:
    indices = list(range(1000, 1000 + 3 * size, 3))
    train, val = local_split(indices, fraction, seed=0, client_id=4)
    assert len(val) == val_size and len(train) == size - val_size
    assert sorted(train + val) == indices


def test_local_split_is_seeded_per_client() -> None:
    indices = list(range(200))
    split = local_split(indices, 0.2, seed=0, client_id=1)
    assert local_split(indices, 0.2, seed=0, client_id=1) == split
    assert local_split(indices, 0.2, seed=0, client_id=2) != split
    assert local_split(indices, 0.2, seed=1, client_id=1) != split
