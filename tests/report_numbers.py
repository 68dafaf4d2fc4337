"""The numbers of a ``report.md`` table, and the same numbers computed independently from the run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

MB = 1e6


def table(report: Path) -> dict[str, dict[str, str]]:
    """The method table of ``report`` as {method: {column header: cell}}."""
    lines = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| method |"))
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in lines[lines.index(header) + 1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(names) or set(cells[0]) <= {"-"}:
            break
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def column(row: dict[str, str], prefix: str) -> str:
    (key,) = [k for k in row if k.startswith(prefix)]
    return row[key]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), written out."""
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _read(run: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows, json.loads((run / "summary.json").read_text())


def expected(runs: list[Path], target: float) -> dict[str, Any]:
    """One method's row, from its runs' metrics.jsonl and summary.json."""
    read = [_read(r) for r in runs]
    reached = [next((r["round"] for r in rows if r.get("accuracy", -1.0) >= target), None) for rows, _ in read]
    hit = [x for x in reached if x is not None]
    return {
        "seeds": len(runs),
        "final": _mean_std([s["final_accuracy"] for _, s in read]),
        "best": _mean_std([max(r["accuracy"] for r in rows if "accuracy" in r) for rows, _ in read]),
        "reach": (sum(hit) / len(hit) if hit else None, f"{len(hit)}/{len(reached)}"),
        "upload_mb": sum(sum(r["upload_bytes"] for r in rows) for rows, _ in read) / len(read) / MB,
        "download_mb": sum(sum(r["download_bytes"] for r in rows) for rows, _ in read) / len(read) / MB,
    }


def _pair(cell: str) -> tuple[float, float]:
    mean, std = cell.split("±")
    return float(mean), float(std)


def assert_report_matches(report: Path, groups: dict[str, list[Path]], target: float) -> None:
    """Every method row of ``report`` equals the independent computation from its runs (to the printed digits)."""
    rows = table(report)
    assert set(rows) == set(groups)
    for label, runs in groups.items():
        row, want = rows[label], expected(runs, target)
        assert int(row["seeds"]) == want["seeds"], label
        for name, prefix in (("final", "final accuracy"), ("best", "best accuracy")):
            mean, std = _pair(column(row, prefix))
            assert mean == pytest.approx(want[name][0], abs=5e-5) and std == pytest.approx(want[name][1], abs=5e-5), (
                label, name, column(row, prefix), want[name])
        mean_rounds, share = want["reach"]
        reach = column(row, "rounds to")
        assert reach.endswith(f"({share})"), (label, reach, share)
        if mean_rounds is None:
            assert reach.startswith("—"), (label, reach)
        else:
            assert float(reach.split()[0]) == pytest.approx(mean_rounds, abs=0.05), (label, reach, mean_rounds)
        assert float(column(row, "upload MB")) == pytest.approx(want["upload_mb"], abs=0.005), label
        assert float(column(row, "download MB")) == pytest.approx(want["download_mb"], abs=0.005), label
