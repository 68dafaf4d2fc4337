"""The job runner below the front ends: its hooks, its round line, and the import layers around it."""

from __future__ import annotations

import ast
from pathlib import Path

from fedrank.config import load_config
from fedrank.job import Hooks, execute, round_line

from test_run import TINY

SRC = Path(__file__).resolve().parents[1] / "src" / "fedrank"


def imported(path: Path) -> set[str]:
    """Every fedrank module a source file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedrank"):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("fedrank"))
    return names


def test_each_layer_imports_only_downward() -> None:
    """cli → compare / serverapp → job → server → runtime: no module imports one above it."""
    above = {
        "job.py": {"fedrank.cli", "fedrank.compare", "fedrank.serverapp"},
        "compare.py": {"fedrank.cli", "fedrank.serverapp"},
        "serverapp.py": {"fedrank.cli", "fedrank.compare"},
        "server.py": {"fedrank.cli", "fedrank.compare", "fedrank.serverapp", "fedrank.job"},
    }
    above.update({f"runtime/{p.name}": above["server.py"] | {"fedrank.server"} for p in (SRC / "runtime").glob("*.py")})
    for name, forbidden in above.items():
        assert not imported(SRC / name) & forbidden, (name, imported(SRC / name) & forbidden)


def test_hooks_see_the_start_every_client_and_every_round_also_on_resume(tmp_path: Path) -> None:
    seen: dict[str, list] = {"start": [], "client": [], "round": []}
    hooks = Hooks(start=seen["start"].append, client=seen["client"].append, round=seen["round"].append,
                  log=lambda line: None)
    cheap = TINY + ["train.local_steps=1", "eval.max_examples=8"]
    cfg = load_config(None, cheap + ["rounds=1"])
    execute(cfg, tmp_path, hooks)
    longer = load_config(None, cheap + ["rounds=2"])
    summary = execute(longer, tmp_path, hooks)  # resumes after round 1
    assert seen["start"] == [0, 1]
    assert [t.round for t in seen["client"]] == [1] * cfg.clients.per_round + [2] * cfg.clients.per_round
    assert [r["round"] for r in seen["round"]] == [1, 2] and summary["rounds"] == 2
    last = seen["round"][-1]
    assert round_line(last, longer) == (f"round 2/2 · accuracy {last['accuracy']:.4f} · "
                                        f"{cfg.clients.per_round} clients, 0 missing · {last['wall_s']:.1f} s")
    unevaluated = {k: v for k, v in last.items() if k != "accuracy"} | {"missing": [3]}
    assert round_line(unevaluated, longer).startswith("round 2/2 · 3 clients, 1 missing [3] · ")
