"""Client partitions of the training split (IID, Dirichlet, quality-skewed) and local validation splits.

Partitions are Flower Datasets partitioners run over a table of (index, label) rows
shuffled with the seed; each client's shard is returned as sorted indices into train.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedrank.config import ConfigError, DataConfig
from fedrank.data.sources import holdout_size

HIGH_QUALITY_SIZE_RATIO = 3


def partition(labels: Sequence[int], num_clients: int, cfg: DataConfig, seed: int) -> list[list[int]]:
    """Disjoint, non-empty shards of ``range(len(labels))``, one per client, by ``cfg.partition``."""
    if len(labels) < num_clients:
        raise ConfigError(
            f"{len(labels)} examples cannot fill {num_clients} clients: lower clients.count or raise max_train_examples"
        )
    if cfg.partition not in _PARTITIONS:
        raise ConfigError(f"unknown data.partition `{cfg.partition}`: use one of {', '.join(_PARTITIONS)}")
    table = Dataset.from_dict({"index": list(range(len(labels))), "label": list(labels)}).shuffle(seed=seed)
    return _PARTITIONS[cfg.partition](table, num_clients, cfg, seed)


def local_split(indices: Sequence[int], val_fraction: float, seed: int, client_id: int) -> tuple[list[int], list[int]]:
    """(train, val) of one client's shard: a seeded ``val_fraction`` (≥ 1 example when possible) is val."""
    order = np.random.default_rng([seed, 4, client_id]).permutation(len(indices))
    n_val = holdout_size(len(indices), val_fraction)
    return [indices[i] for i in sorted(order[n_val:])], [indices[i] for i in sorted(order[:n_val])]


def high_quality_clients(num_clients: int, cfg: DataConfig, seed: int) -> list[int]:
    """The ids of the quality partition's high-quality clients: ``ceil(f·N)`` of a seeded permutation."""
    count = math.ceil(round(cfg.high_quality_fraction * num_clients, 9))
    return sorted(np.random.default_rng([seed, 2]).permutation(num_clients)[:count].tolist())


def _shards(partitioner: Partitioner, table: Dataset) -> list[list[int]]:
    partitioner.dataset = table
    return [sorted(partitioner.load_partition(i)["index"]) for i in range(partitioner.num_partitions)]


def _iid(table: Dataset, num_clients: int, cfg: DataConfig, seed: int) -> list[list[int]]:
    """Contiguous equal shards of the shuffled table (sizes differ by at most 1)."""
    return _shards(IidPartitioner(num_clients), table)


def _dirichlet(table: Dataset, num_clients: int, cfg: DataConfig, seed: int) -> list[list[int]]:
    """Per label, client proportions ~ Dir(alpha); resampled by Flower until no client is empty."""
    partitioner = DirichletPartitioner(
        num_clients,
        partition_by="label",
        alpha=float(cfg.alpha),
        min_partition_size=min(2, len(table) // num_clients),
        self_balancing=False,
        seed=seed,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Flower warns on every resample
            return _shards(partitioner, table)
    except ValueError:
        raise ConfigError(
            f"Dirichlet partition with alpha={cfg.alpha} left a client empty after Flower's retries: "
            "raise data.alpha or lower clients.count"
        ) from None


def _quality(table: Dataset, num_clients: int, cfg: DataConfig, seed: int) -> list[list[int]]:
    return _shards(QualityPartitioner(num_clients, high_quality_clients(num_clients, cfg, seed), seed), table)


_PARTITIONS: dict[str, Callable[[Dataset, int, DataConfig, int], list[list[int]]]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "quality": _quality,
}


class QualityPartitioner(Partitioner):
    """Byun & Lee's quality-skewed split: a few balanced, large shards and many label-skewed small ones.

    With H high-quality client ids, L = N - H low-quality ones, K labels and ratio
    ``HIGH_QUALITY_SIZE_RATIO`` = 3:

    1. each label's examples are shuffled (seeded); the first ``round(n_label·3H/(3H+L))``
       form the high-quality pool, the rest that label's low-quality pool;
    2. the high-quality pool is dealt round-robin, label after label, to the high-quality
       clients, so each holds every label in proportion and about 3x the examples of a
       low-quality client;
    3. low-quality client j (in id order) holds labels π[j mod K] and π[(j+1) mod K] of a
       seeded permutation π of the labels; each label's low-quality pool is split evenly
       among its holders; a label nobody holds (only when L < K-1) is dealt to the
       high-quality clients, or to the low-quality ones when there are none;
    4. a client left empty (tiny data) takes one example from the largest client.
    """

    def __init__(
        self, num_partitions: int, high_quality: Sequence[int], seed: int, partition_by: str = "label"
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._high_quality = sorted(high_quality)
        self._seed = seed
        self._partition_by = partition_by
        self._assignment: list[list[int]] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    def load_partition(self, partition_id: int) -> Dataset:
        if self._assignment is None:
            labels = np.asarray(self.dataset[self._partition_by])
            self._assignment = _quality_shards(labels, self._high_quality, self._num_partitions, self._seed)
        return self.dataset.select(self._assignment[partition_id])


def _quality_shards(labels: np.ndarray, high: list[int], num_clients: int, seed: int) -> list[list[int]]:
    """Row indices per client following :class:`QualityPartitioner`'s rule."""
    rng = np.random.default_rng([seed, 3])
    low = sorted(set(range(num_clients)) - set(high))
    classes = rng.permutation(np.unique(labels)).tolist()
    holders: dict[int, list[int]] = {c: [] for c in classes}
    for j, client in enumerate(low):
        for c in dict.fromkeys([classes[j % len(classes)], classes[(j + 1) % len(classes)]]):
            holders[c].append(client)
    share = HIGH_QUALITY_SIZE_RATIO * len(high) / (HIGH_QUALITY_SIZE_RATIO * len(high) + len(low))
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    high_pool: list[int] = []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c)).tolist()
        cut = round(share * len(members))
        high_pool += members[:cut]
        if holders[c]:
            for client, chunk in zip(holders[c], np.array_split(members[cut:], len(holders[c]))):
                shards[client] += chunk.tolist()
        else:
            _deal(members[cut:], high or low, shards)
    _deal(high_pool, high, shards)
    _fill_empty(shards)
    return shards


def _deal(pool: list[int], clients: list[int], shards: list[list[int]]) -> None:
    for i, index in enumerate(pool):
        shards[clients[i % len(clients)]].append(index)


def _fill_empty(shards: list[list[int]]) -> None:
    for shard in shards:
        if not shard:
            shard.append(max(shards, key=len).pop())
