"""The method plug-in interface: a server half and a client half per method.

Everything that crosses the wire is a flat ``dict[str, Tensor]`` (``Tensors``): the
server state, each client's payload and each reply.  Layer factors are stored under
``"{layer}#A"`` (shape ``(r, n)``) and ``"{layer}#B"`` (shape ``(m, r)``) in the shared
convention ``ΔW = s·B·A``.  The server loop and the runtimes only see this interface.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedrank import aggregation
from fedrank.config import ConfigError

Tensors = dict[str, Tensor]
Factors = dict[str, tuple[Tensor, Tensor]]
Shapes = dict[str, tuple[int, int]]  # layer -> (m, n) = (out, in)


@dataclass(frozen=True)
class Task:
    """One client's job in one round."""

    client: int
    rank: int
    round: int


@dataclass
class LocalStart:
    """How a client sets up local training: initial factors, factors folded into its frozen base, what trains."""

    init: Factors
    fold: Factors | None = None
    train_A: bool = True


@dataclass
class Reply:
    """A client's upload for the method, with its aggregation weight (local training examples)."""

    task: Task
    weight: float
    tensors: Tensors


# --------------------------------------------------------------------------- tensor helpers


def pack(factors: Factors) -> Tensors:
    out: Tensors = {}
    for layer, (A, B) in factors.items():
        out[f"{layer}#A"], out[f"{layer}#B"] = A, B
    return out


def unpack(tensors: Tensors) -> Factors:
    """Layer factors from a flat dict; a factor that is absent (e.g. FFA-LoRA's A) is None."""
    layers = sorted({k.rsplit("#", 1)[0] for k in tensors if "#" in k})
    return {layer: (tensors.get(f"{layer}#A"), tensors.get(f"{layer}#B")) for layer in layers}


def truncate(factors: Factors, rank: int) -> Factors:
    """The first ``rank`` slots: ``A[:rank]``, ``B[:, :rank]``."""
    return {layer: (A[:rank].clone(), B[:, :rank].clone()) for layer, (A, B) in factors.items()}


def seeded_A(seed: int, layer: str, rank: int, n: int, stream: str = "init") -> Tensor:
    """PEFT's LoRA init for A (Kaiming-uniform, ``U(-1/√n, 1/√n)``), reproducible from (seed, layer, stream)."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{stream}/{layer}".encode()))
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(rank, n, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def fresh_factors(shapes: Shapes, rank: int, seed: int, stream: str = "init") -> Factors:
    """LoRA's standard start: seeded A, zero B, so ``ΔW = 0``."""
    return {layer: (seeded_A(seed, layer, rank, n, stream), torch.zeros(m, rank)) for layer, (m, n) in shapes.items()}


def task_generator(seed: int, task: Task, stream: str) -> torch.Generator:
    """A generator private to (seed, round, client, stream): independent of client order and runtime."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{stream}/{task.round}/{task.client}".encode()))


def compact(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Exactly the same ``B·A`` with at most ``min(m, n)`` slots (an SVD when the stack is taller)."""
    limit = min(B.shape[0], A.shape[1])
    if A.shape[0] <= limit:
        return A, B
    return aggregation.flexlora([A], [B], [1.0], [limit])[0]


def empty_factors(shapes: Shapes) -> Factors:
    """Rank-0 factors: ``ΔW = 0`` with nothing to send."""
    return {layer: (torch.zeros(0, n), torch.zeros(m, 0)) for layer, (m, n) in shapes.items()}


def per_layer(
    replies: Sequence[Reply],
    shapes: Shapes,
    combine: Callable[[str, list[Tensor], list[Tensor], list[float]], tuple[Tensor, Tensor]],
) -> Factors:
    """Apply ``combine(layer, As, Bs, weights)`` to every layer's replies."""
    weights = [r.weight for r in replies]
    uploads = [unpack(r.tensors) for r in replies]
    return {layer: combine(layer, [u[layer][0] for u in uploads], [u[layer][1] for u in uploads], weights)
            for layer in shapes}


# --------------------------------------------------------------------------- interface


class Method(ABC):
    """A federated LoRA method: what the server sends and aggregates, what a client builds and uploads."""

    name: ClassVar[str]
    #: global slot j means the same at every rank, so the global model truncated to a rank tier is meaningful
    rank_ordered: ClassVar[bool] = False

    def __init__(self, shapes: Shapes, global_rank: int, seed: int) -> None:
        self.shapes, self.global_rank, self.seed = shapes, global_rank, seed

    def check_tiers(self, tiers: Sequence[int]) -> None:
        """Reject rank assignments the method cannot handle (ConfigError)."""

    # ----------------------------------------------------------------- server half

    def init_state(self) -> Tensors:
        """Global state before round 1: rank-R LoRA init (seeded A, zero B)."""
        return pack(fresh_factors(self.shapes, self.global_rank, self.seed))

    @abstractmethod
    def payload(self, state: Tensors, task: Task) -> Tensors:
        """What the server sends to one client."""

    @abstractmethod
    def aggregate(self, state: Tensors, replies: Sequence[Reply]) -> Tensors:
        """The new global state from the replies of one round (at least one reply)."""

    def global_factors(self, state: Tensors) -> Factors:
        """The global update ``ΔW = s·B·A`` per layer, for evaluation and export."""
        return unpack(state)

    # ----------------------------------------------------------------- client half

    def local_start(self, payload: Tensors, task: Task) -> LocalStart:
        """Build the local adapter from the payload (default: train the received factors)."""
        return LocalStart(init=unpack(payload))

    def upload(self, start: LocalStart, trained: Factors, task: Task) -> Tensors:
        """What the client sends back (default: its trained A and B)."""
        return pack(trained)

    def upload_spec(self, task: Task) -> dict[str, tuple[int, ...]]:
        """The keys and shapes a valid upload from this task has (default: rank-r_k A and B per layer)."""
        return {k: v for layer, (m, n) in self.shapes.items()
                for k, v in ((f"{layer}#A", (task.rank, n)), (f"{layer}#B", (m, task.rank)))}

    def check_upload(self, tensors: Tensors, task: Task) -> str | None:
        """A method-specific reason to reject a well-shaped upload, or None."""
        return None


def single_tier(name: str, tiers: Sequence[int]) -> None:
    if len(set(tiers)) != 1:
        raise ConfigError(f"{name} needs every client at the same rank, got ranks {sorted(set(tiers))}: "
                          "set ranks.values=[R] or pick a rank-heterogeneous method")
