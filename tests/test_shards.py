"""A Flower node's client: only its clients' data, tokenised once and read back from the on-disk shard cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrank.config import load_config
from fedrank.experiment import build, build_node_client
from fedrank.shards import shard_key
from fedrank.tasks import Classify

from test_run import TINY


def same_data(a, b) -> bool:
    return all((x.ids, x.labels, x.starts) == (y.ids, y.labels, y.starts) for x, y in ((a.train, b.train),
                                                                                    (a.val, b.val)))


def test_a_node_tokenises_only_its_clients_then_reads_them_from_the_cache(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDRANK_CACHE", str(tmp_path))
    cfg = load_config(None, TINY)
    whole = build(cfg).client.data
    encoded: list[int] = []
    encode = Classify.encode
    monkeypatch.setattr(Classify, "encode", lambda self, data: encoded.append(len(data)) or encode(self, data))
    node = build_node_client(cfg, [1, 3])
    assert sorted(node.data) == [1, 3] and all(same_data(node.data[c], whole[c]) for c in (1, 3))
    # one encode call with the two clients' examples: no other client, no test split
    assert encoded == [sum(len(whole[c].train) + len(whole[c].val) for c in (1, 3))]
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) == 2

    monkeypatch.setattr(Classify, "load_data", lambda self: pytest.fail("a cache hit loads no raw data"))
    again = build_node_client(cfg, [3, 1])
    assert encoded == encoded[:1] and all(same_data(again.data[c], whole[c]) for c in (1, 3))
    assert again.num_labels == node.num_labels == 5  # the label names come from the cache too
    # anything the tokens depend on is in the key
    for change in ("train.max_length=24", "seed=1", "clients.count=5", "data.partition=dirichlet"):
        assert shard_key(load_config(None, TINY + [change]), 1) != shard_key(cfg, 1), change
    assert shard_key(load_config(None, TINY + ["train.lr=0.1", "rounds=9"]), 1) == shard_key(cfg, 1)
