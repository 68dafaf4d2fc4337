"""Build everything a run needs from its config: data, partitions, model, method, rank policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from fedrank.adapters import AdaptedModel
from fedrank.client import Encoded, FedClient
from fedrank.config import Config
from fedrank.data import Splits
from fedrank.heads import HeadRule, make_head_rule
from fedrank.methods import Method, get_method
from fedrank.models import LoadedModel
from fedrank.ranks import RankPolicy, make_rank_policy
from fedrank.shards import ShardStore, client_data
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


def _setup(cfg: Config) -> tuple[type[Method], LearningTask]:
    """Torch threads as configured; the method's class (an unknown method fails before anything loads); the task."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return get_method(cfg.method), make_task(cfg)


def _federation(cfg: Config, task: LearningTask, loaded: LoadedModel,
                method_cls: type[Method]) -> tuple[AdaptedModel, RankPolicy, Method]:
    """The adapted model, the rank policy and the method of a run, on the loaded base model."""
    model = AdaptedModel(loaded.model, task.target_modules, task.head_modules, cfg.model.scale,
                         cfg.model.scaling, cfg.model.dropout, max(cfg.ranks.values, default=1), task.peft_task_type)
    slot_cost = sum(m + n for m, n in model.shapes.values())
    policy = make_rank_policy(cfg.ranks, cfg.clients.count, cfg.seed, slot_cost)
    method = method_cls(model.shapes, policy.global_rank, cfg.seed)
    method.check_tiers(policy.tiers)
    return model, policy, method


Lap = Callable[[str], None]  # called with a phase's name as it ends: labels, model, data, client


def _no_lap(phase: str) -> None:
    """Phases are not timed."""


def build(cfg: Config, lap: Lap = _no_lap) -> Experiment:
    """Everything a run needs in one process: every client's data, the test split, the model and the method.

    ``lap`` phases: ``labels`` (raw dataset loaded), ``model`` (base model loaded), ``data`` (every client's data
    and the test split tokenised), ``client`` (adapters and method built)."""
    method_cls, task = _setup(cfg)
    splits = task.load_data()
    lap("labels")
    loaded = task.load_model(splits.train.label_names)
    lap("model")
    data = client_data(cfg, task, splits, range(cfg.clients.count))
    test = task.encode(splits.test)
    lap("data")
    model, policy, method = _federation(cfg, task, loaded, method_cls)
    lap("client")
    client = FedClient(method, model, cfg.train, data, len(splits.train.label_names), loaded.tokenizer.pad_token_id,
                       cfg.seed, task)
    sizes = [len(data[c].train) for c in range(cfg.clients.count)]
    return Experiment(cfg, splits, loaded, model, method, policy, client, sizes, test,
                      eval_subset(test, cfg.eval.max_examples, cfg.seed), task,
                      make_head_rule(cfg.server.head, policy.tiers))


def build_node_client(cfg: Config, clients: Sequence[int], lap: Lap = _no_lap) -> FedClient:
    """The client half of a Flower node serving ``clients``: their data only (``fedrank.shards``: cached on disk,
    never the test split), the model and the method.

    ``lap`` phases: ``labels`` (label names from the cache, else the raw dataset loaded), ``model`` (base model
    loaded), ``data`` (the clients' data read from the cache, or tokenised and cached), ``client`` (adapters and
    method built)."""
    method_cls, task = _setup(cfg)
    store = ShardStore(cfg, task)
    label_names = store.label_names(clients)
    lap("labels")
    loaded = task.load_model(label_names)
    lap("model")
    store.require(clients)
    lap("data")
    model, _, method = _federation(cfg, task, loaded, method_cls)
    lap("client")
    return FedClient(method, model, cfg.train, store, len(label_names), loaded.tokenizer.pad_token_id, cfg.seed, task)
