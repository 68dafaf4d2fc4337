"""Build everything a run needs from its config: data, partitions, model, method, rank policy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from fedrank.adapters import AdaptedModel
from fedrank.client import ClientData, Encoded, FedClient
from fedrank.config import Config
from fedrank.data import Splits, local_split, partition
from fedrank.heads import HeadRule, make_head_rule
from fedrank.methods import Method, get_method
from fedrank.models import LoadedModel
from fedrank.ranks import RankPolicy, make_rank_policy
from fedrank.tasks import LearningTask, make_task


@dataclass
class Experiment:
    cfg: Config
    splits: Splits
    loaded: LoadedModel
    model: AdaptedModel
    method: Method
    policy: RankPolicy
    client: FedClient
    sizes: list[int]  # training examples per client
    test: Encoded  # the whole test split
    test_round: Encoded  # the seeded subset evaluated after every round
    task: LearningTask
    heads: HeadRule  # how the server treats the task head

    @property
    def num_labels(self) -> int:
        return len(self.splits.train.label_names)

    def fresh_base(self) -> PreTrainedModel:
        """A new copy of the base model (as loaded for this run, before any LoRA)."""
        return self.task.load_model(self.splits.train.label_names).model


def eval_subset(test: Encoded, max_examples: int, seed: int) -> Encoded:
    if max_examples <= 0 or max_examples >= len(test):
        return test
    pick = np.random.default_rng([seed, 7]).choice(len(test), max_examples, replace=False)
    return test.subset(sorted(pick.tolist()))


def build(cfg: Config) -> Experiment:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    method_cls = get_method(cfg.method)
    task = make_task(cfg)
    splits = task.load_data()
    shards = partition(splits.train.labels, cfg.clients.count, cfg.data, cfg.seed)
    num_labels = len(splits.train.label_names)
    loaded = task.load_model(splits.train.label_names)
    tok = loaded.tokenizer
    train, test = task.encode(splits.train), task.encode(splits.test)
    data = {}
    for c, shard in enumerate(shards):
        tr, va = local_split(shard, cfg.clients.val_fraction, cfg.seed, c)
        data[c] = ClientData(train.subset(tr), train.subset(va))
    model = AdaptedModel(loaded.model, task.target_modules, task.head_modules, cfg.model.scale,
                         cfg.model.scaling, cfg.model.dropout, max(cfg.ranks.values, default=1), task.peft_task_type)
    slot_cost = sum(m + n for m, n in model.shapes.values())
    policy = make_rank_policy(cfg.ranks, cfg.clients.count, cfg.seed, slot_cost)
    method = method_cls(model.shapes, policy.global_rank, cfg.seed)
    method.check_tiers(policy.tiers)
    client = FedClient(method, model, cfg.train, data, num_labels, tok.pad_token_id, cfg.seed, task)
    sizes = [len(data[c].train) for c in range(cfg.clients.count)]
    return Experiment(cfg, splits, loaded, model, method, policy, client, sizes, test,
                      eval_subset(test, cfg.eval.max_examples, cfg.seed), task,
                      make_head_rule(cfg.server.head, policy.tiers))
