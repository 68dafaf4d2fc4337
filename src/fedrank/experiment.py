"""Build everything a run needs from its config: data, partitions, model, method, rank policy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from fedrank.adapters import AdaptedModel
from fedrank.client import ClientData, Encoded, FedClient
from fedrank.config import NODES, Config, ConfigError
from fedrank.data import Splits, TextDataset
from fedrank.headline import NODE_VALIDATION
from fedrank.heads import HeadRule, make_head_rule
from fedrank.methods import Method, get_method
from fedrank.models import LoadedModel
from fedrank.ranks import RankPolicy, make_rank_policy
from fedrank.shards import NodeShards, ShardStore, client_data, partitioned
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
    test: Encoded | None  # the whole test split; None: the nodes' validation splits evaluate (node-local data)
    test_round: Encoded | None  # the seeded subset evaluated after every round
    task: LearningTask
    heads: HeadRule  # how the server treats the task head
    evaluation: str  # what evaluates the global model, in words (summary.json's `evaluation`)

    @property
    def num_labels(self) -> int:
        return len(self.splits.train.label_names)

    def fresh_base(self) -> PreTrainedModel:
        """A new copy of the base model (as loaded for this run, before any LoRA)."""
        return self.task.load_model(self.splits.train.label_names).model


def eval_subset(test: Encoded | None, max_examples: int, seed: int) -> Encoded | None:
    if test is None or max_examples <= 0 or max_examples >= len(test):
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
                         cfg.model.scaling, cfg.model.dropout, max(cfg.ranks.values, default=1), task.peft_task_type,
                         frozen_dtype=task.compute.dtype)
    slot_cost = sum(m + n for m, n in model.shapes.values())
    policy = make_rank_policy(cfg.ranks, cfg.clients.count, cfg.seed, slot_cost)
    method = method_cls(model.shapes, policy.global_rank, cfg.seed)
    method.check_tiers(policy.tiers)
    return model, policy, method


Lap = Callable[[str], None]  # called with a phase's name as it ends: labels, model, data, client


def _no_lap(phase: str) -> None:
    """Phases are not timed."""


def _clients(cfg: Config, task: LearningTask, train: TextDataset,
             sizes: Sequence[int] | None) -> tuple[dict[int, ClientData], list[int]]:
    """Every client's data and its number of training examples; for node-local data no data (the SuperNodes hold
    it) and the ``sizes`` the nodes reported."""
    if cfg.data.dataset == NODES:
        return {}, list(sizes or ())
    data = client_data(cfg, task, train, partitioned(cfg, train, range(cfg.clients.count)))
    return data, [len(data[c].train) for c in range(cfg.clients.count)]


def _evaluation(cfg: Config) -> str:
    """What evaluates a run's global model, in words."""
    if cfg.data.dataset != NODES:
        return f"server test split of {cfg.data.dataset}"
    return f"server test file {cfg.data.test_path}" if cfg.data.test_path else NODE_VALIDATION


def build(cfg: Config, lap: Lap = _no_lap, sizes: Sequence[int] | None = None) -> Experiment:
    """Everything a run needs in one process: every client's data, the test split, the model and the method.

    Node-local data (``data.dataset = nodes``): the server holds no training example; ``sizes`` are the clients'
    training examples as their SuperNodes reported them, and the test split is ``data.test_path``'s file, or
    ``None`` without one (the nodes' validation splits evaluate the global model).
    ``lap`` phases: ``labels`` (raw dataset loaded), ``model`` (base model loaded), ``data`` (every client's data
    and the test split tokenised), ``client`` (adapters and method built)."""
    if cfg.data.dataset == NODES and sizes is None:
        raise ConfigError(f"data.dataset = {NODES}: only Flower SuperNodes read the training data, each its own "
                          "file: run it with `flwr run deploy/flower` (docs/flower.md)")
    method_cls, task = _setup(cfg)
    splits = task.load_data()
    lap("labels")
    loaded = task.load_model(splits.train.label_names)
    lap("model")
    data, sizes = _clients(cfg, task, splits.train, sizes)
    test = task.encode(splits.test) if len(splits.test) else None
    lap("data")
    model, policy, method = _federation(cfg, task, loaded, method_cls)
    lap("client")
    client = FedClient(method, model, cfg.train, data, len(splits.train.label_names), loaded.tokenizer.pad_token_id,
                       cfg.seed, task)
    return Experiment(cfg, splits, loaded, model, method, policy, client, sizes, test,
                      eval_subset(test, cfg.eval.max_examples, cfg.seed), task,
                      make_head_rule(cfg.server.head, policy.tiers), _evaluation(cfg))


def build_node_client(cfg: Config, clients: Sequence[int], lap: Lap = _no_lap, data: str = "") -> FedClient:
    """The client half of a Flower node serving ``clients``: their data only (``fedrank.shards``: cached on disk,
    never the test split), the model and the method.  ``data``: the node's own file (node-local data), the
    data of each of ``clients``; else the clients' partitions of ``data.dataset``.

    ``lap`` phases: ``labels`` (label names from the cache, else the raw dataset loaded), ``model`` (base model
    loaded), ``data`` (the clients' data read from the cache, or tokenised and cached), ``client`` (adapters and
    method built)."""
    method_cls, task = _setup(cfg)
    store = NodeShards(cfg, task, data) if data else ShardStore(cfg, task)
    label_names = store.label_names(clients)
    lap("labels")
    loaded = task.load_model(label_names)
    lap("model")
    store.require(clients)
    lap("data")
    model, _, method = _federation(cfg, task, loaded, method_cls)
    lap("client")
    return FedClient(method, model, cfg.train, store, len(label_names), loaded.tokenizer.pad_token_id, cfg.seed, task)
