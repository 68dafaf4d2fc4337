"""Clients' tokenised data, built for the clients asked for only and cached on disk, one safetensors file per client.

A Flower deployment starts a fresh ClientApp process for every message; with the cache under
``$FEDRANK_CACHE/shards`` the second message of a run reads its clients' token ids in milliseconds instead of
loading, partitioning and tokenising the dataset again, and a node never tokenises the test split or another
node's clients.  A file's name is the SHA-256 of everything its content depends on: the task, the model (its
tokenizer), ``train.max_length``, the whole ``[data]`` table, ``seed``, ``clients.count``,
``clients.val_fraction``, the client id, the data file's size and modification time (a SuperNode's own file for
node-local data: ``NodeShards``), and ``FORMAT`` (raise it when encoding changes).  Files are written atomically;
only safetensors (numpy arrays) and JSON are read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from fedrank.checkpoint import atomic_write
from fedrank.client import ClientData
from fedrank.config import Config
from fedrank.data import Splits, TextDataset
from fedrank.data.sources import NODE_DATA, labelled
from fedrank.models import cache_root
from fedrank.tasks import Encoded, LearningTask

FORMAT = 1
SPLITS = ("train", "val")


def partitioned(cfg: Config, train: TextDataset, clients: Iterable[int]) -> dict[int, list[int]]:
    """The shards (indices into ``train``) of ``clients`` when ``train`` is partitioned over all ``clients.count``
    clients by ``data.partition``."""
    from fedrank.data.partition import partition  # datasets, Flower Datasets: only to partition

    shards = partition(train.labels, cfg.clients.count, cfg.data, cfg.seed)
    return {c: shards[c] for c in clients}


def client_data(cfg: Config, task: LearningTask, train: TextDataset,
                shards: Mapping[int, Sequence[int]]) -> dict[int, ClientData]:
    """The training and local validation examples of each client of ``shards`` (its indices into ``train``),
    encoded by ``task`` (its model loaded): a seeded ``clients.val_fraction`` of each shard is the client's
    validation split (``local_split``), and only these clients' examples are tokenised."""
    from fedrank.data.partition import local_split

    parts = {c: local_split(list(shard), cfg.clients.val_fraction, cfg.seed, c) for c, shard in shards.items()}
    needed = sorted({i for train, val in parts.values() for i in train + val})
    encoded, at = task.encode(train.subset(needed)), {i: k for k, i in enumerate(needed)}
    return {c: ClientData(encoded.subset([at[i] for i in train]), encoded.subset([at[i] for i in val]))
            for c, (train, val) in parts.items()}


def _source_stamp(dataset: str) -> list[Any]:
    """Size and modification time of a local data file (of every file below a local folder); [] for a name."""
    path = Path(dataset)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [[p.relative_to(path).as_posix() if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def shard_key(cfg: Config, client: int, source: str | None = None) -> str:
    """The cache key of one client's tokenised data under ``cfg``, read from ``source`` (default
    ``data.dataset``; a node's own file for node-local data)."""
    fields = {"format": FORMAT, "task": cfg.task, "model": cfg.model.name, "max_length": cfg.train.max_length,
              "data": dataclasses.asdict(cfg.data), "seed": cfg.seed, "clients": cfg.clients.count,
              "val_fraction": cfg.clients.val_fraction, "client": client,
              "source": _source_stamp(source or cfg.data.dataset)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class ShardStore(Mapping[int, ClientData]):
    """The data of the clients ``require``-d so far in this process: read from the cache in ``root`` (default
    ``$FEDRANK_CACHE/shards``), or built and cached.  The raw dataset is loaded at most once, when needed."""

    def __init__(self, cfg: Config, task: LearningTask, root: Path | None = None) -> None:
        self.cfg, self.task = cfg, task
        self.root = root or cache_root() / "shards"
        self.source = cfg.data.dataset  # what the data is read from (its size and mtime are in the cache key)
        self.loaded: dict[int, ClientData] = {}
        self._splits: Splits | None = None

    def path(self, client: int) -> Path:
        return self.root / f"{shard_key(self.cfg, client, self.source)}.safetensors"

    def splits(self) -> Splits:
        """The raw dataset (loaded once)."""
        if self._splits is None:
            self._splits = self.task.load_data()
        return self._splits

    def names(self) -> list[str]:
        """The label names of the raw data."""
        return list(self.splits().train.label_names)

    def build(self, clients: Iterable[int]) -> dict[int, ClientData]:
        """``clients``' data from the raw dataset: its training split partitioned over all clients."""
        train = self.splits().train
        return client_data(self.cfg, self.task, train, partitioned(self.cfg, train, clients))

    def label_names(self, clients: Iterable[int]) -> list[str]:
        """The label names, from a cached file of one of ``clients``, else from the raw data."""
        cached = next((p for p in map(self.path, clients) if p.is_file()), None)
        if cached is None:
            return self.names()
        with safe_open(str(cached), framework="numpy") as f:
            return json.loads(f.metadata()["labels"])

    def require(self, clients: Iterable[int]) -> None:
        """Make ``clients``' data available: cached files are read, the rest built (the task's model must be
        loaded: encoding needs its tokenizer) and written to the cache."""
        missing = [c for c in clients if c not in self.loaded]
        for c in [c for c in missing if self.path(c).is_file()]:
            with safe_open(str(self.path(c)), framework="numpy") as f:
                arrays = {k: f.get_tensor(k) for k in f.keys()}
            self.loaded[c] = ClientData(*(_decode(arrays, split, self.task) for split in SPLITS))
        rest = [c for c in missing if c not in self.loaded]
        if not rest:
            return
        built = self.build(rest)
        self.root.mkdir(parents=True, exist_ok=True)
        labels = json.dumps(self.names())
        for c, data in built.items():
            arrays = {k: v for split in SPLITS for k, v in _encode(getattr(data, split), split).items()}
            atomic_write(self.path(c), save(arrays, metadata={"labels": labels}))
        self.loaded.update(built)

    def __getitem__(self, client: int) -> ClientData:
        return self.loaded[client]

    def __iter__(self) -> Iterator[int]:
        return iter(self.loaded)

    def __len__(self) -> int:
        return len(self.loaded)


class NodeShards(ShardStore):
    """A SuperNode's own data file (``data.dataset = nodes``): the whole file is the shard of the one client the node
    serves, whatever id the server gave it, split into train and validation by the same seeded rule; its labels are
    numbered by ``data.labels``."""

    def __init__(self, cfg: Config, task: LearningTask, path: str, root: Path | None = None) -> None:
        super().__init__(cfg, task, root)
        self.source = path

    def names(self) -> list[str]:
        return list(self.cfg.data.labels)

    def build(self, clients: Iterable[int]) -> dict[int, ClientData]:
        train = labelled(Path(self.source), self.cfg.data, NODE_DATA)
        return client_data(self.cfg, self.task, train, {c: range(len(train)) for c in clients})


def _encode(encoded: Encoded, split: str) -> dict[str, np.ndarray]:
    out = {f"{split}.ids": np.fromiter((t for ids in encoded.ids for t in ids), dtype=np.int64),
           f"{split}.lengths": np.array([len(ids) for ids in encoded.ids], dtype=np.int64),
           f"{split}.labels": np.array(encoded.labels, dtype=np.int64)}
    if encoded.starts is not None:
        out[f"{split}.starts"] = np.array(encoded.starts, dtype=np.int64)
    return out


def _decode(arrays: dict[str, np.ndarray], split: str, task: LearningTask) -> Encoded:
    ends = np.cumsum(arrays[f"{split}.lengths"])
    ids = [chunk.tolist() for chunk in np.split(arrays[f"{split}.ids"], ends[:-1])] if len(ends) else []
    starts = arrays.get(f"{split}.starts")
    return Encoded(ids, arrays[f"{split}.labels"].tolist(), None if starts is None else starts.tolist(), task)
