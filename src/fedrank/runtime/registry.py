"""Runtime registry: config name → a factory taking the built experiment."""

from __future__ import annotations

from collections.abc import Callable

from fedrank.config import ConfigError
from fedrank.experiment import Experiment
from fedrank.runtime import Runtime
from fedrank.runtime.local import LocalRuntime

RUNTIMES: dict[str, Callable[[Experiment], Runtime]] = {
    "local": lambda exp: LocalRuntime(exp.client, exp.cfg.faults, exp.cfg.seed),
    "flower": lambda exp: _flower(exp),
}


def _flower(exp: Experiment) -> Runtime:
    from fedrank.runtime.flower import SimulationRuntime  # imports flwr only when asked for

    return SimulationRuntime(exp, timeout_s=exp.cfg.runtime_timeout_s)


def make_runtime(name: str, exp: Experiment) -> Runtime:
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime `{name}`: use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name](exp)
