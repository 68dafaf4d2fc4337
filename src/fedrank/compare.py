"""Side-by-side runs: every method on the same partitions, rank assignment and seeds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedrank.config import Config, ConfigError, load_config, to_dict
from fedrank.methods import METHODS

_VARIANT = re.compile(r"^(?P<method>[a-z]+)(@(?P<rank>\d+))?$")


@dataclass(frozen=True)
class PlannedRun:
    label: str
    seed: int
    cfg: Config
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / "summary.json").is_file()


def method_overrides(spec: str) -> list[str]:
    """``replication`` → method only; ``fedit@5`` → that method with every client at rank 5."""
    match = _VARIANT.match(spec.strip())
    if not match or match["method"] not in METHODS:
        raise ConfigError(f"`{spec}` is not a method: use one of {', '.join(METHODS)}, optionally with @RANK "
                          "(fedit@5 runs every client at rank 5)")
    out = [f"method={match['method']}"]
    if match["rank"]:
        out += ["ranks.policy=fixed", f"ranks.values=[{match['rank']}]", "ranks.fractions=[]"]
    return out


def plan(config: Path | None, methods: list[str], seeds: list[int], overrides: list[str], out: Path) -> list[PlannedRun]:
    """One run per (seed, method); identical configs apart from the method (and rank for ``@R`` variants)."""
    if not methods or not seeds:
        raise ConfigError("give at least one method (--methods a,b) and one seed (--seeds 0,1)")
    runs = []
    for seed in seeds:  # seed-major: every method has a result as early as possible
        for spec in methods:
            cfg = load_config(config, overrides + method_overrides(spec) + [f"seed={seed}"])
            folder = out / "runs" / f"{spec.strip()}-seed{seed}"
            saved = folder / "config.toml"
            if saved.is_file() and to_dict(load_config(saved)) != to_dict(cfg):
                raise ConfigError(f"{folder} holds a run with another config: use a new --out or delete that folder")
            runs.append(PlannedRun(spec.strip(), seed, cfg, folder))
    return runs
