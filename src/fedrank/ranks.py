"""Rank allocation policies (DESIGN.md §3): which LoRA rank each client trains at.

:func:`make_rank_policy` builds the policy named by ``[ranks].policy`` from the
:data:`POLICIES` registry.  Config mistakes raise :class:`~fedrank.config.ConfigError`
in one line; mistakes by the calling code (unknown client ids, mismatched lengths)
raise plain ``ValueError``.

Seeded choices use their own stream derived from ``seed``, so they are independent
of the client sampling and training draws made with the same seed.
"""

from __future__ import annotations

import bisect
import difflib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

from fedrank.config import ConfigError, RanksConfig

__all__ = [
    "RankPolicy",
    "FixedPolicy",
    "RandomPolicy",
    "QualityPolicy",
    "BudgetPolicy",
    "POLICIES",
    "DISTRIBUTIONS",
    "make_rank_policy",
]

HEAVY_TAIL_EXPONENT = 1.5
_TOLERANCE = 1e-6

# Unnormalised probability of drawing rank ``r`` (random policy without fractions).
DISTRIBUTIONS: dict[str, Callable[[int], float]] = {
    "uniform": lambda r: 1.0,
    "heavy_tail": lambda r: r**-HEAVY_TAIL_EXPONENT,
}


def _unknown(key: str, name: str, choices: Sequence[str]) -> str:
    """One-line message for an unknown choice, with a did-you-mean when one is close."""
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"unknown {key} `{name}`{hint}: choose one of {', '.join(choices)}"


def _check_config(cfg: RanksConfig) -> None:
    """Checks shared by all policies: ranks, fractions, distribution."""
    if not cfg.values:
        raise ConfigError("ranks.values is empty: give at least one rank, e.g. ranks.values=[8]")
    if min(cfg.values) < 1:
        raise ConfigError(f"ranks must be ≥ 1, got ranks.values={cfg.values}: use positive LoRA ranks")
    if cfg.fractions:
        if len(cfg.fractions) != len(cfg.values):
            raise ConfigError(
                f"ranks.fractions has {len(cfg.fractions)} entries but ranks.values has {len(cfg.values)}: "
                "give one fraction per rank"
            )
        if not all(0.0 < f <= 1.0 for f in cfg.fractions):
            raise ConfigError(
                f"ranks.fractions must each be in (0, 1], got {cfg.fractions}: drop empty tiers from values and fractions"
            )
        if abs(sum(cfg.fractions) - 1.0) > _TOLERANCE:
            raise ConfigError(f"ranks.fractions must sum to 1, got {sum(cfg.fractions):g} from {cfg.fractions}: rescale them")
    if cfg.distribution not in DISTRIBUTIONS:
        raise ConfigError(_unknown("ranks.distribution", cfg.distribution, list(DISTRIBUTIONS)))


def _rng(seed: int) -> random.Random:
    return random.Random(f"fedrank.ranks/{seed}")


def _tier_counts(fractions: Sequence[float], n: int) -> list[int]:
    """Largest-remainder apportionment: ``n`` clients over tiers, each count within 1 of ``fraction · n``.

    Leftover clients go to the largest remainders first, ties to the earlier tier.
    """
    total = sum(fractions)
    quotas = [f / total * n for f in fractions]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


# --------------------------------------------------------------------------- policies


class RankPolicy(ABC):
    """Assigns a LoRA rank to each client, possibly per round."""

    needs_scores_after_round: ClassVar[int | None] = None
    needs_validation: bool = False  # whether observe_scores reads the clients' local validation scores

    def __init__(self, cfg: RanksConfig, num_clients: int, seed: int, slot_cost: int = 1) -> None:
        """Every policy takes the same arguments (see :func:`make_rank_policy`) and validates ``cfg``."""
        _check_config(cfg)
        if num_clients < 1:
            raise ConfigError(f"clients.count must be ≥ 1, got {num_clients}")
        self.num_clients = num_clients
        self.global_rank: int = max(cfg.values)
        self.tiers: list[int] = sorted(set(cfg.values))

    def validates_after(self, round: int) -> bool:
        """Whether the clients' local validation scores are wanted after ``round`` (``observe_scores``)."""
        return self.needs_validation and self.needs_scores_after_round == round

    def ranks(self, round: int, clients: Sequence[int], sizes: Sequence[int]) -> list[int]:
        """Rank of each of ``clients`` in ``round`` (1-based); ``sizes`` are their training-example counts."""
        if round < 1:
            raise ValueError(f"rounds are 1-based, got round={round}")
        if len(sizes) != len(clients):
            raise ValueError(f"got {len(sizes)} sizes for {len(clients)} clients: pass one size per client")
        unknown = [c for c in clients if not 0 <= c < self.num_clients]
        if unknown:
            raise ValueError(f"client ids {unknown} are not in 0..{self.num_clients - 1}")
        return self._assign(round, list(clients), list(sizes))

    @abstractmethod
    def _assign(self, round: int, clients: list[int], sizes: list[int]) -> list[int]:
        """:meth:`ranks` after its argument checks."""

    def observe_scores(self, scores: Mapping[int, float], sizes: Sequence[int] | None = None) -> None:
        """Take client id → local validation score (higher is better) and every client's training examples;
        ignored by default."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state for checkpoints; empty for stateless policies."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; nothing to restore by default."""


class _PerClientPolicy(RankPolicy):
    """Keeps one rank per registered client, whatever the round or the sampled clients."""

    _ranks: list[int]

    def _assign(self, round: int, clients: list[int], sizes: list[int]) -> list[int]:
        return [self._ranks[c] for c in clients]

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": list(self._ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != self.num_clients or not set(ranks) <= set(self.tiers):
            raise ConfigError(
                f"rank-policy checkpoint does not fit {self.num_clients} clients with ranks {self.tiers}: "
                "resume with the config the run was started with"
            )
        self._ranks = [int(r) for r in ranks]


class FixedPolicy(_PerClientPolicy):
    """Static ranks in one of three forms.

    ``values=[r]``: every client gets ``r``.  ``values`` with one rank per client (and no
    fractions): client ``i`` gets ``values[i]``.  Otherwise ``values`` are tiers: tier ``t``
    gets ``fractions[t] · N`` clients (equal shares when no fractions are given;
    largest-remainder rounding, counts sum to ``N``) and a seeded permutation decides which.
    """

    def __init__(self, cfg: RanksConfig, num_clients: int, seed: int, slot_cost: int = 1) -> None:
        super().__init__(cfg, num_clients, seed, slot_cost)
        values = cfg.values
        if len(values) == 1:
            self._ranks = values * num_clients
        elif len(values) == num_clients and not cfg.fractions:
            self._ranks = list(values)
        else:
            fractions = cfg.fractions or [1.0 / len(values)] * len(values)
            counts = _tier_counts(fractions, num_clients)
            self._ranks = [v for v, count in zip(values, counts) for _ in range(count)]
            _rng(seed).shuffle(self._ranks)


class RandomPolicy(_PerClientPolicy):
    """Static ranks, each client's drawn once (seeded) from ``values``.

    P(rank = values[t]) is ``fractions[t]`` when given, else by ``distribution``:
    ``uniform`` (equal) or ``heavy_tail`` (∝ rank^-1.5: small ranks common, large ranks rare).
    """

    def __init__(self, cfg: RanksConfig, num_clients: int, seed: int, slot_cost: int = 1) -> None:
        super().__init__(cfg, num_clients, seed, slot_cost)
        weights = cfg.fractions or [DISTRIBUTIONS[cfg.distribution](v) for v in cfg.values]
        self._ranks = _rng(seed).choices(cfg.values, weights=weights, k=num_clients)


class QualityPolicy(_PerClientPolicy):
    """Byun & Lee: all clients start at the low rank of ``values=[low, high]``.

    After round 1 the top ``⌈top_fraction · N⌉`` clients by local validation score
    (``quality_by = "validation"``) or by training examples (``"size"``) move to the high rank for
    all later rounds.  Ties go to the lower client id; clients without a score (missing or NaN)
    rank below every scored client.
    """

    needs_scores_after_round: ClassVar[int | None] = 1

    def __init__(self, cfg: RanksConfig, num_clients: int, seed: int, slot_cost: int = 1) -> None:
        super().__init__(cfg, num_clients, seed, slot_cost)
        if len(cfg.values) != 2 or cfg.values[0] == cfg.values[1]:
            raise ConfigError(
                f"quality policy needs two distinct ranks [low, high], got ranks.values={cfg.values}: "
                "set e.g. ranks.values=[4,16]"
            )
        if not 0.0 <= cfg.top_fraction <= 1.0:
            raise ConfigError(f"ranks.top_fraction must be in [0, 1], got {cfg.top_fraction}")
        self._low, self._high = self.tiers
        # The tolerance keeps float noise from adding a client: 0.07 · 100 is 7.000000000000001.
        self._top = math.ceil(cfg.top_fraction * num_clients - _TOLERANCE)
        self._ranks = [self._low] * num_clients
        self.quality_by = cfg.quality_by
        self.needs_validation = cfg.quality_by == "validation"

    def observe_scores(self, scores: Mapping[int, float], sizes: Sequence[int] | None = None) -> None:
        """Raise the top clients to the high rank, by ``scores`` or, with ``quality_by = "size"``, by ``sizes``
        (training examples per client id); everyone else is at the low rank."""
        if self.quality_by == "size":
            if sizes is None or len(sizes) != self.num_clients:
                raise ValueError(f"quality_by='size' needs the sizes of all {self.num_clients} clients")
            scores = {c: float(s) for c, s in enumerate(sizes)}
        unknown = [c for c in scores if not 0 <= c < self.num_clients]
        if unknown:
            raise ValueError(f"scores for client ids {unknown} that are not in 0..{self.num_clients - 1}")

        def order(c: int) -> tuple[int, float, int]:
            score = scores.get(c, math.nan)
            return (1, 0.0, c) if math.isnan(score) else (0, -score, c)

        top = set(sorted(range(self.num_clients), key=order)[: self._top])
        self._ranks = [self._high if c in top else self._low for c in range(self.num_clients)]


class BudgetPolicy(RankPolicy):
    """Each round the sampled clients share ``budget`` uplink parameters; a rank costs ``rank · slot_cost``.

    Every client first gets the smallest rank.  The rest of the budget is split in
    proportion to data size (equally when all sizes are 0) and each client rises to the
    largest rank its share pays for.  Then, largest data first (ties: lower id), clients
    step up to the next rank while the round total stays within budget, until no step fits.
    """

    def __init__(self, cfg: RanksConfig, num_clients: int, seed: int, slot_cost: int = 1) -> None:
        super().__init__(cfg, num_clients, seed, slot_cost)
        if cfg.budget <= 0:
            raise ConfigError(
                f"budget policy needs ranks.budget > 0 (uplink parameters per round), got {cfg.budget:g}: "
                "set e.g. ranks.budget=1e6"
            )
        if slot_cost < 1:
            raise ValueError(f"slot_cost must be ≥ 1 parameter per rank slot, got {slot_cost}")
        self.budget = cfg.budget
        self.slot_cost = slot_cost

    def _assign(self, round: int, clients: list[int], sizes: list[int]) -> list[int]:
        if any(s < 0 for s in sizes):
            raise ValueError(f"data sizes must be non-negative, got {sizes}")
        tiers, cost, n = self.tiers, self.slot_cost, len(clients)
        minimum = n * tiers[0] * cost
        if minimum > self.budget:
            raise ConfigError(
                f"ranks.budget={self.budget:g} is too small: {n} clients at the smallest rank {tiers[0]} need "
                f"{minimum} uplink parameters per round: raise ranks.budget to at least {minimum}"
            )
        # Exact rationals, so rounding can never push the total over the budget.
        spare, total_size = Fraction(self.budget) - minimum, sum(sizes)
        shares = [spare * s / total_size if total_size else spare / n for s in sizes]
        extra_cost = [(t - tiers[0]) * cost for t in tiers]
        levels = [bisect.bisect_right(extra_cost, share) - 1 for share in shares]

        spent = sum(tiers[level] for level in levels) * cost
        by_size = sorted(range(n), key=lambda k: (-sizes[k], clients[k]))
        stepped = True
        while stepped:
            stepped = False
            for k in by_size:
                if levels[k] + 1 < len(tiers):
                    step = (tiers[levels[k] + 1] - tiers[levels[k]]) * cost
                    if spent + step <= self.budget:
                        levels[k] += 1
                        spent += step
                        stepped = True
        return [tiers[level] for level in levels]


POLICIES: dict[str, type[RankPolicy]] = {
    "fixed": FixedPolicy,
    "random": RandomPolicy,
    "quality": QualityPolicy,
    "budget": BudgetPolicy,
}


def make_rank_policy(cfg: RanksConfig, num_clients: int, seed: int, slot_cost: int = 1) -> RankPolicy:
    """Build the ``cfg.policy`` policy for ``num_clients`` clients.

    ``slot_cost`` is the uplink parameters of one rank slot over all adapted layers, Σ (m + n);
    only the ``budget`` policy uses it.
    """
    if cfg.policy not in POLICIES:
        raise ConfigError(_unknown("ranks.policy", cfg.policy, list(POLICIES)))
    return POLICIES[cfg.policy](cfg, num_clients, seed, slot_cost)
