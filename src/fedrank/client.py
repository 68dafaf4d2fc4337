"""One client's side of a round: build the local adapter, train it, upload; and evaluation.

The payload a client receives is the method's tensors plus the task head under ``head/``;
a reply carries the method's upload plus the trained head under ``head/``, in the wire dtype
the payload came in (``fedrank.wire``).  Training and evaluation run on the task's device and
precision (``fedrank.compute``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedrank import wire
from fedrank.adapters import AdaptedModel
from fedrank.config import TrainConfig
from fedrank.methods import Method, Reply, Task, Tensors
from fedrank.methods.base import Factors, task_generator
from fedrank.tasks import Classify, Encoded, LearningTask, collate, task_of

HEAD = "head/"
EVAL_EXAMPLES = "eval_examples"  # a validation's number of examples, next to its metrics


def split_head(tensors: Tensors) -> tuple[Tensors, dict[str, Tensor]]:
    """(method tensors, head tensors without the prefix)."""
    head = {k.removeprefix(HEAD): v for k, v in tensors.items() if k.startswith(HEAD)}
    rest = {k: v for k, v in tensors.items() if not k.startswith(HEAD)}
    return rest, head


def with_head(tensors: Tensors, head: dict[str, Tensor]) -> Tensors:
    return {**tensors, **{HEAD + k: v for k, v in head.items()}}


def local_steps(cfg: TrainConfig, examples: int) -> int:
    if cfg.local_epochs > 0:
        return max(1, math.ceil(cfg.local_epochs * examples / cfg.batch_size))
    return cfg.local_steps


def lr_factor(cfg: TrainConfig, steps: int):
    """Warmup then constant / cosine / linear decay, as a LambdaLR factor."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1.0 - progress}[
            cfg.lr_schedule]
    return factor


def batch_order(n: int, batch_size: int, gen: torch.Generator) -> Iterator[list[int]]:
    """Endless shuffled epochs of batch indices."""
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


@dataclass
class ClientData:
    train: Encoded
    val: Encoded


class FedClient:
    """A client process's state: the method's client half, the shared model and the clients' data."""

    def __init__(self, method: Method, model: AdaptedModel, cfg: TrainConfig, data: Mapping[int, ClientData],
                 num_labels: int, pad_id: int, seed: int, task: LearningTask | None = None) -> None:
        self.method, self.model, self.cfg, self.data = method, model, cfg, data
        self.num_labels, self.pad_id, self.seed = num_labels, pad_id, seed
        self.task = task or Classify()

    def fit(self, task: Task, payload: Tensors) -> tuple[Reply, dict[str, float]]:
        """Build the local adapter from the payload, train it, return the upload and training stats."""
        received, head = split_head(wire.decode(payload))
        start = self.method.local_start(received, task)
        model = self.model
        model.use_rank(task.rank)
        model.set_base(start.fold)
        model.set_factors(start.init)
        model.set_head(head)
        loss = self._train(task, start.train_A, train_head=bool(head))
        trained = model.get_factors()
        upload = wire.encode(with_head(self.method.upload(start, trained, task), model.get_head() if head else {}),
                             wire.dtype_of(payload))
        model.set_base(None)
        return Reply(task, float(len(self.data[task.client].train)), upload), {"train_loss": loss}

    def validate(self, client: int, factors: Factors, head: dict[str, Tensor]) -> dict[str, float]:
        """The task's metrics of the given global model on this client's local validation split, with the split's
        size under ``EVAL_EXAMPLES`` (only that, 0, when the client has no validation example)."""
        val = self.data[client].val
        if len(val) == 0:
            return {EVAL_EXAMPLES: 0.0}
        self.model.set_head(head)
        with self.model.merged(factors) as net:
            metrics = evaluate(net, val, self.num_labels, self.cfg.batch_size, self.pad_id)
        return {**metrics, EVAL_EXAMPLES: float(len(val))}

    def _train(self, task: Task, train_A: bool, train_head: bool = True) -> float:
        """Local steps on the active adapter (and the head when the server sent one; else it stays frozen)."""
        cfg, model, data = self.cfg, self.model, self.data[task.client].train
        lora, head = model.trainable(train_A, train_head)
        groups = [{"params": lora, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}]
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        steps = local_steps(cfg, len(data))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))
        gen = task_generator(self.seed, task, "batches")
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))  # dropout
        order = batch_order(len(data), cfg.batch_size, gen)
        compute = self.task.compute
        scaler = compute.scaler()  # fp16 only: scales the loss so small gradients survive, skips overflowed steps
        model.peft.train()
        total = 0.0
        for _ in range(steps):
            with compute.autocast():
                loss = self.task.loss(model.peft, compute.to(collate(data, next(order), self.pad_id)))
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(lora + head, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
        model.peft.eval()
        return total / steps


def evaluate(model: torch.nn.Module, data: Encoded, num_labels: int, batch_size: int, pad_id: int) -> dict[str, float]:
    """The task's metrics of ``model`` on ``data``: accuracy, macro_f1 and loss (classify, generate-label) or
    loss and perplexity (instruct).  The task is the one that encoded ``data``."""
    return task_of(data).evaluate(model, data, batch_size, pad_id, num_labels=num_labels)
