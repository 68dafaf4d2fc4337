"""The round loop: sample, assign ranks, send, aggregate, evaluate, account bytes, checkpoint.

Method-agnostic: everything method-specific happens behind ``Method``; everything
transport-specific behind ``Runtime``.  Every random draw derives from
``(seed, round, client)``, so a checkpoint's round number fixes all RNG state and a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from fedrank import checkpoint, dynamics, wire
from fedrank.client import EVAL_EXAMPLES, evaluate, split_head, with_head
from fedrank.experiment import Experiment
from fedrank.heads import HeadReply
from fedrank.methods import Reply, Task, Tensors
from fedrank.methods.base import Factors, pack, truncate, unpack
from fedrank.runtime import Job, Outcome, Runtime
from fedrank.validation import check_reply

BEFORE = "before/"  # checkpoint prefix: the global slots above the lowest tier one round back (eval.dynamics)


def split_checkpoint(tensors: Tensors) -> tuple[Tensors, Tensors, Tensors | None]:
    """A checkpoint's (method state, head state, high slots one round back or None)."""
    before = {k.removeprefix(BEFORE): v for k, v in tensors.items() if k.startswith(BEFORE)}
    state, head = split_head({k: v for k, v in tensors.items() if not k.startswith(BEFORE)})
    return state, head, before or None


def nbytes(tensors: Tensors) -> int:
    """Bytes on the wire: the tensors actually exchanged."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pooled(metrics: Iterable[dict[str, float]]) -> dict[str, float]:
    """Clients' validation metrics (``FedClient.validate``) averaged with their sizes as weights, and the total
    size; only that size (0) when no client with validation examples answered."""
    answered = [m for m in metrics if m[EVAL_EXAMPLES] > 0]
    total = sum(m[EVAL_EXAMPLES] for m in answered)
    keys = [k for k in (answered[0] if answered else {}) if k != EVAL_EXAMPLES]
    return {**{k: sum(m[k] * m[EVAL_EXAMPLES] for m in answered) / total for k in keys}, EVAL_EXAMPLES: total}


def sample_clients(seed: int, round: int, count: int, per_round: int) -> list[int]:
    return sorted(np.random.default_rng([seed, round, 1]).choice(count, per_round, replace=False).tolist())


class RunFiles:
    """The layout of a run folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.toml"
        self.metrics = root / "metrics.jsonl"
        self.checkpoints = root / "checkpoints"
        self.summary = root / "summary.json"
        self.adapter = root / "adapter"
        self.nodes = root / "nodes.json"  # node-local data: what the server knows of each client's data file

    def read_metrics(self, up_to: int | None = None) -> list[dict[str, Any]]:
        """Complete metric lines (a line cut by a crash is dropped), at most round ``up_to``."""
        rows = []
        if self.metrics.exists():
            for line in self.metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if up_to is None or row["round"] <= up_to:
                    rows.append(row)
        return rows

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        checkpoint.atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Server:
    """Runs rounds of one experiment through a runtime, writing metrics and checkpoints to ``files``."""

    def __init__(self, exp: Experiment, runtime: Runtime, files: RunFiles,
                 on_client: Callable[[Task], None] = lambda task: None,
                 on_round: Callable[[dict[str, Any]], None] = lambda row: None,
                 on_start: Callable[[int], None] = lambda start: None,
                 log: Callable[[str], None] = print) -> None:
        self.exp, self.runtime, self.files = exp, runtime, files
        self.on_client, self.on_round, self.on_start, self.log = on_client, on_round, on_start, log
        self.before: Tensors | None = None  # eval.dynamics: the high slots one round back

    # ----------------------------------------------------------------- state

    def _restore(self) -> tuple[int, Tensors, Tensors, dict[str, int]]:
        """(round, method state, head state, byte totals) of the last checkpoint, or of round 0."""
        exp = self.exp
        ckpt = checkpoint.latest(self.files.checkpoints, warn=self.log)
        self.before = None
        if ckpt is None:
            self.files.rewrite_metrics([])
            return 0, exp.method.init_state(), exp.heads.init_state(exp.model.get_head()), {"upload": 0, "download": 0}
        exp.policy.load_state_dict(ckpt.meta["policy"])
        self.files.rewrite_metrics(self.files.read_metrics(up_to=ckpt.round))
        state, head, self.before = split_checkpoint(ckpt.tensors)
        return ckpt.round, state, head, ckpt.meta["totals"]

    def _save(self, round: int, state: Tensors, head: Tensors, totals: dict[str, int]) -> None:
        meta = {"policy": self.exp.policy.state_dict(), "totals": totals, "seed": self.exp.cfg.seed}
        before = {BEFORE + k: v for k, v in (self.before or {}).items()}
        checkpoint.save(self.files.checkpoints, round, {**with_head(state, head), **before}, meta)

    # ----------------------------------------------------------------- evaluation

    def evaluate(self, state: Tensors, head: Tensors, data=None) -> dict[str, float]:
        """Global model metrics; for rank-ordered methods also the task's headline metric of the model truncated
        to each tier (``accuracy_r4``, ``perplexity_r4``), each with the head that the head rule gives that rank."""
        exp = self.exp
        data = data if data is not None else exp.test_round
        factors = exp.method.global_factors(state)
        rank, key = exp.policy.global_rank, exp.task.headline.key
        out = self.evaluate_factors(factors, exp.heads.for_rank(head, rank), data)
        if exp.cfg.eval.tiers and exp.method.rank_ordered and len(exp.policy.tiers) > 1:
            for r in exp.policy.tiers:
                out[exp.task.headline.tier(r)] = (out[key] if r == rank else self.evaluate_factors(
                    truncate(factors, r), exp.heads.for_rank(head, r), data)[key])
        return out

    def score(self, metrics: dict[str, float]) -> float:
        """A client's validation score (the task's; 0 for a client without validation examples)."""
        return self.exp.task.score(metrics) if metrics[EVAL_EXAMPLES] else 0.0

    def dynamics(self, previous: Tensors, current: Tensors) -> dict[str, float | None]:
        """``eval.dynamics``: each tier's share of the global update and the high slots' update cosine."""
        exp = self.exp
        tiers = exp.policy.tiers
        if not (exp.cfg.eval.dynamics and exp.method.rank_ordered and len(tiers) > 1):
            return {}
        prev, cur = exp.method.global_factors(previous), exp.method.global_factors(current)
        low = min(tiers)
        out: dict[str, float | None] = {**dynamics.tier_norms(cur, tiers, exp.cfg.model.scale),
                                        "high_update_cos": None}
        if self.before is not None:
            out["high_update_cos"] = dynamics.update_cosine(unpack(self.before), dynamics.slots(prev, low),
                                                            dynamics.slots(cur, low))
        self.before = pack(dynamics.slots(prev, low))
        return out

    def evaluate_factors(self, factors: Factors, head: Tensors, data) -> dict[str, float]:
        """The task's metrics of a global model on ``data``; without data (node-local data and no server test
        file) the clients' validation metrics through the runtime, weighted by their sizes (``pooled``)."""
        exp = self.exp
        if data is None:
            return pooled(self.runtime.validate(factors, head, range(exp.cfg.clients.count)).values())
        exp.model.set_head(head)
        with exp.model.merged(factors) as net:
            return evaluate(net, data, exp.num_labels, exp.cfg.eval.batch_size, exp.loaded.tokenizer.pad_token_id)

    # ----------------------------------------------------------------- the loop

    def dispatch(self, rnd: int, state: Tensors, head: Tensors) -> tuple[list[Job], list[Outcome]]:
        """Sample clients, assign ranks, send each its payload; return the jobs and the replies that came back."""
        exp, cfg = self.exp, self.exp.cfg
        clients = sample_clients(cfg.seed, rnd, cfg.clients.count, cfg.clients.per_round)
        ranks = exp.policy.ranks(rnd, clients, [exp.sizes[c] for c in clients])
        jobs = [(task, wire.encode(with_head(exp.method.payload(state, task), exp.heads.for_client(head, task.rank)),
                                   cfg.comm.dtype))
                for task in (Task(c, r, rnd) for c, r in zip(clients, ranks))]
        return jobs, self.runtime.fit(jobs, self.on_client)

    def combine(self, state: Tensors, head: Tensors,
                outcomes: list[Outcome]) -> tuple[Tensors, Tensors, list[dict[str, Any]]]:
        """Validate the replies, aggregate the valid ones with the method and FedAvg their heads.

        Returns the new state and head (unchanged when no reply is valid) and the rejections.
        """
        server_cfg = self.exp.cfg.server
        replies, heads, rejected = [], [], []
        for reply, _ in outcomes:
            tensors, reply_head = split_head(wire.decode(reply.tensors))
            checked = check_reply(self.exp.method, reply.task, tensors, reply_head,
                                  self.exp.heads.for_client(head, reply.task.rank),
                                  server_cfg.max_update_norm, server_cfg.norm_action == "clip")
            if isinstance(checked, str):
                self.log(f"round {reply.task.round}: rejected the update of client {reply.task.client}: {checked}")
                rejected.append({"client": reply.task.client, "reason": checked})
                continue
            replies.append(Reply(reply.task, reply.weight, checked[0]))
            heads.append(HeadReply(reply.task.rank, reply.weight, checked[1]))
        if not replies:
            return state, head, rejected
        return self.exp.method.aggregate(state, replies), self.exp.heads.aggregate(head, heads), rejected

    def round(self, rnd: int, state: Tensors, head: Tensors) -> tuple[Tensors, Tensors, dict[str, Any]]:
        """One federated round; returns the new state, head and the round's metrics."""
        exp, cfg = self.exp, self.exp.cfg
        t0 = time.perf_counter()
        jobs, outcomes = self.dispatch(rnd, state, head)
        t1 = time.perf_counter()
        previous = state
        state, head, rejected = self.combine(state, head, outcomes)
        if len(rejected) == len(outcomes):
            self.log(f"round {rnd}: no valid reply arrived; the global model is unchanged")
        arrived = {reply.task.client for reply, _ in outcomes}
        row: dict[str, Any] = {
            "round": rnd,
            "clients": [task.client for task, _ in jobs],
            "ranks": [task.rank for task, _ in jobs],
            "missing": [task.client for task, _ in jobs if task.client not in arrived],
            "rejected": rejected,
            "train_loss": float(np.mean([s["train_loss"] for _, s in outcomes])) if outcomes else None,
            "upload_bytes": sum(nbytes(r.tensors) for r, _ in outcomes),
            "download_bytes": sum(nbytes(p) for _, p in jobs),
        }
        row.update(self.dynamics(previous, state))
        t2 = time.perf_counter()
        if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
            row.update(self.evaluate(state, head))
        if exp.policy.needs_scores_after_round == rnd:
            metrics = self.runtime.validate(exp.method.global_factors(state),
                                            exp.heads.for_rank(head, exp.policy.global_rank),
                                            range(cfg.clients.count)) if exp.policy.validates_after(rnd) else {}
            exp.policy.observe_scores({c: self.score(m) for c, m in metrics.items()}, exp.sizes)
        t3 = time.perf_counter()
        row.update(train_s=t1 - t0, aggregate_s=t2 - t1, eval_s=t3 - t2)
        return state, head, row

    def run(self) -> dict[str, Any]:
        """Rounds from the last checkpoint to ``cfg.rounds``; returns the summary."""
        cfg = self.exp.cfg
        start, state, head, totals = self._restore()
        if start:
            self.log(f"resuming after round {start} of {cfg.rounds}")
        self.on_start(start)
        for rnd in range(start + 1, cfg.rounds + 1):
            t0 = time.perf_counter()
            state, head, row = self.round(rnd, state, head)
            totals = {"upload": totals["upload"] + row["upload_bytes"],
                      "download": totals["download"] + row["download_bytes"]}
            row.update(cum_upload_bytes=totals["upload"], cum_download_bytes=totals["download"])
            row["wall_s"] = time.perf_counter() - t0
            # metrics first: a kill between the two leaves a row past the checkpoint, which resume drops and redoes
            self.files.append_metrics(row)
            self._save(rnd, state, head, totals)
            self.on_round(row)
        return self.finish(state, head)

    def finish(self, state: Tensors, head: Tensors) -> dict[str, Any]:
        """Final evaluation, summary.json and the PEFT adapter export."""
        exp, cfg = self.exp, self.exp.cfg
        rows = self.files.read_metrics()
        # the last round is always evaluated on the per-round subset: without final_full that row is the final one;
        # the nodes' validation splits (no server test data) are evaluated whole every time
        full = cfg.eval.final_full and exp.test is not None
        final = self.evaluate(state, head, exp.test) if full else rows[-1]
        summary = {
            "method": cfg.method,
            "seed": cfg.seed,
            "rounds": cfg.rounds,
            "headline": exp.task.headline.key,
            "evaluation": exp.evaluation,
            "device": str(exp.task.compute.device),
            "precision": exp.task.compute.precision,  # `auto` resolved on the machine that ran it
            "final_eval_examples": (int(final.get(EVAL_EXAMPLES, 0)) if exp.test is None
                                    else len(exp.test if full else exp.test_round)),
            **exp.task.headline.summary(final, rows),
            "upload_bytes": rows[-1]["cum_upload_bytes"],
            "download_bytes": rows[-1]["cum_download_bytes"],
            "wall_s": sum(r["wall_s"] for r in rows),
            "global_rank": exp.policy.global_rank,
            "tiers": exp.policy.tiers,
        }
        exp.model.export(self.files.adapter, exp.method.global_factors(state),
                         exp.heads.for_rank(head, exp.policy.global_rank), exp.fresh_base)
        checkpoint.atomic_write(self.files.summary, json.dumps(summary, indent=2).encode())
        return summary
