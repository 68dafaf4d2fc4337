"""Byun & Lee's round-1 diagnostic: what a high-rank client loses when its update comes back aggregated.

In round 1 the highest-rank sampled client trains its own model; the server aggregates; the client
receives its rank's share of the global model back.  Zero padding dilutes the slots only high-rank
clients hold, so the model it receives is much worse than its own; replication keeps them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from fedrank.client import split_head
from fedrank.config import Config
from fedrank.experiment import build
from fedrank.methods import Task
from fedrank.methods.base import unpack
from fedrank.runtime.registry import make_runtime
from fedrank.ranks import make_rank_policy
from fedrank.server import RunFiles, Server, sample_clients


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
