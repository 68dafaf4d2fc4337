"""How the server treats the task head (e.g. a classifier), separately from the LoRA method.

The head state is a flat ``dict[str, Tensor]``.  A rule says what each client receives, how replies
combine, and which head evaluates the global model truncated to a rank.  An empty head sent to a
client means "keep your seeded initial head and do not train it".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedrank import aggregation
from fedrank.config import ConfigError
from fedrank.methods import Tensors


@dataclass(frozen=True)
class HeadReply:
    """One client's trained head, with its rank and aggregation weight."""

    rank: int
    weight: float
    head: Tensors


class HeadRule(ABC):
    name: ClassVar[str]

    def __init__(self, tiers: Sequence[int]) -> None:
        self.tiers = sorted(set(tiers))

    @abstractmethod
    def init_state(self, head: Tensors) -> Tensors:
        """The server's head state before round 1, from the seeded initial head."""

    @abstractmethod
    def for_client(self, state: Tensors, rank: int) -> Tensors:
        """The head a rank-``rank`` client receives (and must send back with the same keys and shapes)."""

    @abstractmethod
    def aggregate(self, state: Tensors, replies: Sequence[HeadReply]) -> Tensors:
        """The new head state from the round's valid replies (at least one)."""

    @abstractmethod
    def for_rank(self, state: Tensors, rank: int) -> Tensors:
        """The head that evaluates the global model truncated to ``rank``."""


class FedAvgHead(HeadRule):
    """One head, FedAvg-ed over every client of the round: ``h = Σ_k p_k h_k``."""

    name = "fedavg"

    def init_state(self, head: Tensors) -> Tensors:
        return dict(head)

    def for_client(self, state: Tensors, rank: int) -> Tensors:
        return dict(state)

    def aggregate(self, state: Tensors, replies: Sequence[HeadReply]) -> Tensors:
        return aggregation.weighted_mean([r.head for r in replies], [r.weight for r in replies])

    def for_rank(self, state: Tensors, rank: int) -> Tensors:
        return dict(state)


class TierHead(HeadRule):
    """One head per rank tier: ``h_t = Σ_{k: r_k = t} p_k h_k`` over the tier's clients, or over all clients of
    the round when the tier is absent.  The model truncated to rank ``t`` is evaluated with ``h_t``; a rank
    between tiers uses the head of the highest tier not above it.  Stored as ``r{t}/{name}``."""

    name = "tier"

    def _tier(self, rank: int) -> int:
        return max((t for t in self.tiers if t <= rank), default=self.tiers[0])

    def init_state(self, head: Tensors) -> Tensors:
        return {f"r{t}/{k}": v.clone() for t in self.tiers for k, v in head.items()}

    def for_rank(self, state: Tensors, rank: int) -> Tensors:
        prefix = f"r{self._tier(rank)}/"
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}

    def for_client(self, state: Tensors, rank: int) -> Tensors:
        return self.for_rank(state, rank)

    def aggregate(self, state: Tensors, replies: Sequence[HeadReply]) -> Tensors:
        out: Tensors = {}
        for t in self.tiers:
            own = [r for r in replies if self._tier(r.rank) == t] or list(replies)
            mean = aggregation.weighted_mean([r.head for r in own], [r.weight for r in own])
            out.update({f"r{t}/{k}": v for k, v in mean.items()})
        return out


class FrozenHead(HeadRule):
    """FedBABU: the head stays at its seeded initialisation; it is never sent, trained or averaged."""

    name = "frozen"

    def init_state(self, head: Tensors) -> Tensors:
        return dict(head)

    def for_client(self, state: Tensors, rank: int) -> Tensors:
        return {}

    def aggregate(self, state: Tensors, replies: Sequence[HeadReply]) -> Tensors:
        return state

    def for_rank(self, state: Tensors, rank: int) -> Tensors:
        return dict(state)


HEAD_RULES: dict[str, type[HeadRule]] = {cls.name: cls for cls in (FedAvgHead, TierHead, FrozenHead)}


def make_head_rule(name: str, tiers: Sequence[int]) -> HeadRule:
    try:
        return HEAD_RULES[name](tiers)
    except KeyError:
        raise ConfigError(f"unknown server.head `{name}`: use one of {', '.join(HEAD_RULES)}") from None
