"""Diagnostics of finished or starting runs: Byun & Lee's round-1 diagnostic and the head refit.

Round 1 (Byun & Lee): the highest-rank sampled client trains its own model; the server aggregates; the client
receives its rank's share of the global model back.  Zero padding dilutes the slots only high-rank
clients hold, so the model it receives is much worse than its own; replication keeps them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch

from fedrank import checkpoint
from fedrank.client import evaluate, split_head
from fedrank.config import Config, ConfigError, load_config
from fedrank.experiment import build
from fedrank.methods import Task
from fedrank.methods.base import truncate, unpack
from fedrank.runtime.registry import make_runtime
from fedrank.ranks import make_rank_policy
from fedrank.server import RunFiles, Server, sample_clients, split_checkpoint


def round_one(cfg: Config) -> dict[str, Any]:
    """Accuracy of the high-rank client's own round-1 model and of the model it receives back."""
    exp = build(cfg)
    with TemporaryDirectory() as tmp:
        server = Server(exp, make_runtime(cfg.runtime, exp), RunFiles(Path(tmp)))
        state, head = exp.method.init_state(), exp.heads.init_state(exp.model.get_head())
        jobs, outcomes = server.dispatch(1, state, head)
        reply = max((r for r, _ in outcomes), key=lambda r: (r.task.rank, -r.task.client))
        own_factors, own_head = split_head(reply.tensors)
        new_state, new_head, _ = server.combine(state, head, outcomes)
        task = Task(reply.task.client, reply.task.rank, 2)
        start = exp.method.local_start(exp.method.payload(new_state, task), task)
        received = start.init
        if start.fold:
            raise ValueError(f"the diagnostic compares truncation methods; {cfg.method} folds part of the model")
        local = exp.client.data[reply.task.client].val
        out: dict[str, Any] = {"method": cfg.method, "client": task.client, "rank": task.rank,
                               "ranks": [t.rank for t, _ in jobs]}
        received_head = exp.heads.for_rank(new_head, task.rank)
        for name, factors, h in (("own", unpack(own_factors), own_head), ("received", received, received_head)):
            out[f"{name}_local_accuracy"] = server.evaluate_factors(factors, h, local)["accuracy"]
            out[f"{name}_test_accuracy"] = server.evaluate_factors(factors, h, exp.test_round)["accuracy"]
        out["local_examples"] = len(local)
        return out


def with_round_one_tiers(cfg: Config) -> Config:
    """The quality policy starts everyone at the low rank; use its post-round-1 tiers (low for
    ``1 - top_fraction`` of the clients, high for the rest) so that round 1 has high-rank clients."""
    if cfg.ranks.policy != "quality":
        return cfg
    top = cfg.ranks.top_fraction
    ranks = replace(cfg.ranks, policy="fixed", values=sorted(cfg.ranks.values), fractions=[1 - top, top])
    return replace(cfg, ranks=ranks)


def seed_with_mixed_ranks(cfg: Config, tries: int = 100) -> int:
    """The first seed from ``cfg.seed`` on whose round-1 sample holds clients of different ranks."""
    for seed in range(cfg.seed, cfg.seed + tries):
        policy = make_rank_policy(cfg.ranks, cfg.clients.count, seed)
        clients = sample_clients(seed, 1, cfg.clients.count, cfg.clients.per_round)
        if len(set(policy.ranks(1, clients, [1] * len(clients)))) > 1:
            return seed
    return cfg.seed


def padding_diagnostic(cfg: Config, methods: tuple[str, ...] = ("zeropad", "replication")) -> list[dict[str, Any]]:
    """Round 1 under each padding method, on the first seed whose round-1 sample mixes ranks."""
    cfg = with_round_one_tiers(cfg)
    cfg = replace(cfg, seed=seed_with_mixed_ranks(cfg))
    return [{**round_one(replace(cfg, method=m)), "seed": cfg.seed} for m in methods]


def markdown(results: list[dict[str, Any]]) -> str:
    first = results[0]
    if len(set(first["ranks"])) == 1:
        return (f"## Byun & Lee diagnostic\n\nEvery client sampled in round 1 has rank {first['rank']}: there is no "
                "high-rank client to diagnose with this seed and rank policy.\n")
    lines = [f"## Byun & Lee diagnostic (seed {first.get('seed')}, round 1, client {first['client']} at rank "
             f"{first['rank']}; sampled ranks {first['ranks']})\n",
             "Accuracy of the high-rank client's own model before aggregation and of the global model it receives "
             f"back, on its local validation split ({first['local_examples']} examples) and on the test subset."
             + (f" Settings changed for the diagnostic only: `{' '.join(first['overrides'])}`."
                if first.get("overrides") else "") + "\n",
             "| method | own, local | received, local | own, test | received, test |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['own_local_accuracy']:.4f} | {r['received_local_accuracy']:.4f} | "
                     f"{r['own_test_accuracy']:.4f} | {r['received_test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- head refit (linear probe)


def _head_features(exp, factors, head: dict, data) -> tuple[np.ndarray, float]:
    """The inputs of the (single Linear) head on ``data`` under the global model ``factors`` + ``head``, and
    that model's accuracy."""
    names = exp.model.head_modules
    if len(names) != 1:
        raise ConfigError(f"the head refit needs a single Linear head, this model's head is {names}")
    captured: list[torch.Tensor] = []
    exp.model.set_head(head)
    with exp.model.merged(factors) as net:
        module = dict(net.named_modules())[f"base_model.model.{names[0]}"]
        hook = module.register_forward_hook(lambda mod, args, out: captured.append(args[0].detach().float().cpu()))
        try:
            metrics = evaluate(net, data, exp.num_labels, exp.cfg.eval.batch_size, exp.loaded.tokenizer.pad_token_id)
        finally:
            hook.remove()
    return torch.cat(captured).numpy(), metrics["accuracy"]


def head_refit(run_dir: Path, examples: int = 1000) -> dict[str, Any]:
    """Refit only the head of a finished run's final global model by a linear probe (standardised features,
    multinomial logistic regression with its L2 strength chosen by 3-fold cross-validation on the sample) on the
    global model's features of a seeded sample of ``examples`` TRAINING examples; return
    test accuracy before and after, for the global model truncated to each rank tier (rank-ordered methods)
    or at full rank.  The test split is never used for fitting."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cfg = load_config(run_dir / "config.toml")
    exp = build(cfg)
    ckpt = checkpoint.latest(run_dir / "checkpoints")
    if ckpt is None:
        raise ConfigError(f"{run_dir} has no checkpoint to refit: finish the run first (fedrank run --resume {run_dir})")
    state, head, _ = split_checkpoint(ckpt.tensors)
    train = exp.splits.train
    pick = np.random.default_rng([cfg.seed, 11]).choice(len(train), min(examples, len(train)), replace=False)
    sample = exp.task.encode(train.subset(sorted(pick.tolist())))  # tokenise the sample only
    factors = exp.method.global_factors(state)
    tiers = exp.policy.tiers if exp.method.rank_ordered and cfg.eval.tiers else [exp.policy.global_rank]
    out: dict[str, Any] = {"run": run_dir.name, "method": cfg.method, "head": cfg.server.head, "seed": cfg.seed,
                           "train_examples": len(sample), "test_examples": len(exp.test)}
    for r in tiers:
        f, h = truncate(factors, r), exp.heads.for_rank(head, r)
        x_train, _ = _head_features(exp, f, h, sample)
        x_test, before = _head_features(exp, f, h, exp.test)
        probe = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=6, cv=3, max_iter=3000, l1_ratios=(0.0,),
                                                                    scoring="accuracy", use_legacy_attributes=False))
        probe.fit(x_train, sample.labels)
        out[f"before_r{r}"] = before
        out[f"after_r{r}"] = float(probe.score(x_test, exp.test.labels))
    return out


def head_refit_markdown(results: list[dict[str, Any]], labels: list[str]) -> str:
    """Mean test accuracy over seeds per run label and tier, before and after refitting the head."""
    tiers = sorted({int(k.removeprefix("before_r")) for r in results for k in r if k.startswith("before_r")})
    lines = ["## Head refit (linear probe on the final global model's features)\n",
             f"Only the head is refit, by logistic regression on {results[0]['train_examples']} training examples "
             f"(seeded); accuracy on all {results[0]['test_examples']} test examples, mean over seeds.\n",
             "| method | seeds | " + " | ".join(f"rank {t}: before → after" for t in tiers) + " |",
             "|---|---|" + "---|" * len(tiers)]
    for label in dict.fromkeys(labels):
        group = [r for r, lab in zip(results, labels) if lab == label]
        cells = []
        for t in tiers:
            pairs = [(r[f"before_r{t}"], r[f"after_r{t}"]) for r in group if f"before_r{t}" in r]
            cells.append(f"{np.mean([p[0] for p in pairs]):.4f} → {np.mean([p[1] for p in pairs]):.4f}"
                         if pairs else "n/a")
        lines.append(f"| {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
