"""A task's headline metric: the number a run is summarised, compared, plotted and printed by.

Accuracy for the label tasks (``classify``, ``generate-label``), perplexity for ``instruct``.  Runs name their
headline in ``summary.json`` (``headline``); a summary written before that field existed is an accuracy run.
Light on purpose (no torch): the report and the CLI's final line use it without loading a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Headline:
    """``key``: the metrics field (``accuracy``); ``higher_is_better``: its direction; ``reported``: the
    evaluation fields a run summarises and tabulates, the headline first."""

    key: str
    higher_is_better: bool
    reported: tuple[str, ...]

    def best(self, values: Iterable[float]) -> float | None:
        """The best of ``values`` (the largest or the smallest), ``None`` when there is none."""
        present = list(values)
        if not present:
            return None
        return max(present) if self.higher_is_better else min(present)

    def reaches(self, value: float, target: float) -> bool:
        """Whether ``value`` is at least as good as ``target``."""
        return value >= target if self.higher_is_better else value <= target

    def gain(self, difference: float) -> float:
        """``difference`` (a minus b) turned so that a positive gain means a is better."""
        return difference if self.higher_is_better else -difference

    def tier(self, rank: int) -> str:
        """The field of the global model truncated to ``rank``: ``accuracy_r4``, ``perplexity_r4``."""
        return f"{self.key}_r{rank}"

    @property
    def tier_prefix(self) -> str:
        return f"{self.key}_r"

    def summary(self, final: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The summary.json fields of the final evaluation ``final`` and the per-round ``rows``:
        ``final_<field>`` per reported field (``None`` when the evaluation has none: no node answered a node
        validation), ``final_tiers`` and ``best_round_<headline>``."""
        return {**{f"final_{k}": final.get(k) for k in self.reported},
                "final_tiers": {k: v for k, v in final.items() if k.startswith(self.tier_prefix)},
                f"best_round_{self.key}": self.best(r[self.key] for r in rows if self.key in r)}


ACCURACY = Headline("accuracy", True, ("accuracy", "macro_f1", "loss"))
PERPLEXITY = Headline("perplexity", False, ("perplexity", "loss"))
HEADLINES = {h.key: h for h in (ACCURACY, PERPLEXITY)}
NODE_VALIDATION = "node validation, size-weighted"  # summary.json's `evaluation` without server test data
LABELS = {"macro_f1": "macro-F1"}  # column titles that differ from the field name


def of_summary(summary: dict[str, Any]) -> Headline:
    """The headline a ``summary.json`` names (accuracy for a summary without the field)."""
    return HEADLINES[summary.get("headline", ACCURACY.key)]


def final_line(summary: dict[str, Any]) -> str:
    """``final accuracy 0.8780 on 1811 test examples`` (the run's own headline)."""
    key = of_summary(summary).key
    value = summary[f"final_{key}"]
    shown = "unknown" if value is None else f"{value:.4f}"
    where = "the nodes' validation examples" if summary.get("evaluation") == NODE_VALIDATION else "test examples"
    return f"final {key} {shown} on {summary['final_eval_examples']} {where}"
