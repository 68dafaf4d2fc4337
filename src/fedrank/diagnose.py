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
from fedrank.server import RunFiles, Server


def round_one(cfg: Config) -> dict[str, Any]:
    """Accuracy of the high-rank client's own round-1 model and of the model it receives back."""
    exp = build(cfg)
    with TemporaryDirectory() as tmp:
        server = Server(exp, make_runtime(cfg.runtime, exp), RunFiles(Path(tmp)))
        state, head = exp.method.init_state(), exp.model.get_head()
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
        for name, factors, h in (("own", unpack(own_factors), own_head), ("received", received, new_head)):
            out[f"{name}_local_accuracy"] = server.evaluate_factors(factors, h, local)["accuracy"]
            out[f"{name}_test_accuracy"] = server.evaluate_factors(factors, h, exp.test_round)["accuracy"]
        out["local_examples"] = len(local)
        return out


def padding_diagnostic(cfg: Config, methods: tuple[str, ...] = ("zeropad", "replication")) -> list[dict[str, Any]]:
    return [round_one(replace(cfg, method=m)) for m in methods]


def markdown(results: list[dict[str, Any]]) -> str:
    first = results[0]
    lines = [f"## Byun & Lee diagnostic (round 1, client {first['client']} at rank {first['rank']}; "
             f"sampled ranks {first['ranks']})\n",
             "Accuracy of the high-rank client's own model before aggregation and of the global model it receives "
             f"back, on its local validation split ({first['local_examples']} examples) and on the test subset.\n",
             "| method | own, local | received, local | own, test | received, test |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['own_local_accuracy']:.4f} | {r['received_local_accuracy']:.4f} | "
                     f"{r['own_test_accuracy']:.4f} | {r['received_test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"
