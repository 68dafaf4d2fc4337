"""`fedrank compare` and `fedrank report` on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrank.cli import app
from fedrank.compare import method_overrides
from fedrank.config import ConfigError
from fedrank.config import load_config
from fedrank.report import RunRecord, rounds_to

from report_numbers import assert_report_matches
from test_run import TINY


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def test_compare_runs_every_method_and_seed_once_then_reports(tmp_path: Path) -> None:
    args = ["compare", "--methods", "fedit@4,replication", "--seeds", "0,1", "--out", str(tmp_path),
            "--target", "0.3", *_sets(TINY)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["fedit@4-seed0", "fedit@4-seed1", "replication-seed0", "replication-seed1"]
    # same partitions and sampling: the same clients are sampled by both methods for a seed
    rows = {r: [json.loads(x) for x in (tmp_path / "runs" / r / "metrics.jsonl").read_text().splitlines()]
            for r in runs}
    assert [x["clients"] for x in rows["fedit@4-seed0"]] == [x["clients"] for x in rows["replication-seed0"]]
    groups = {label: [tmp_path / "runs" / f"{label}-seed{s}" for s in (0, 1)] for label in ("fedit@4", "replication")}
    assert_report_matches(tmp_path / "report.md", groups, 0.3)
    for png in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "accuracy_by_tier.png"):
        assert (tmp_path / png).stat().st_size > 1000
    stamps = {r: (tmp_path / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    again = CliRunner().invoke(app, args)  # resumable: finished runs are not redone
    assert again.exit_code == 0, again.output
    assert stamps == {r: (tmp_path / "runs" / r / "summary.json").stat().st_mtime_ns for r in runs}
    rendered = CliRunner().invoke(app, ["report", *[str(tmp_path / "runs" / r) for r in runs],
                                        "--out", str(tmp_path / "again"), "--target", "0.3"])
    assert rendered.exit_code == 0, rendered.output
    assert_report_matches(tmp_path / "again" / "report.md", groups, 0.3)


def test_method_variants() -> None:
    assert method_overrides("fedit@5") == ["method=fedit", "ranks.policy=fixed", "ranks.values=[5]",
                                           "ranks.fractions=[]"]
    assert method_overrides("flora") == ["method=flora"]
    with pytest.raises(ConfigError, match="not a method"):
        method_overrides("fedavg")


@pytest.mark.parametrize("overrides, summary, label", [
    (method_overrides("fedit@5"), {}, "fedit@5"),
    (method_overrides("fedit@5") + ["precision=bf16"], {}, "fedit@5 bf16"),
    (["method=replication", "server.head=tier", "precision=fp16"], {}, "replication+tier fp16"),
    (["method=flexlora", "precision=auto"], {"precision": "bf16"}, "flexlora bf16"),  # as resolved where it ran
    (["method=flexlora", "precision=auto"], {"precision": "fp32"}, "flexlora"),
])
def test_a_runs_label_names_its_method_rank_head_and_a_precision_other_than_fp32(
        overrides: list[str], summary: dict[str, str], label: str) -> None:
    assert RunRecord(Path("run"), load_config(None, overrides), [], summary).label == label


def test_rounds_to_target() -> None:
    rows = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.81}, {"round": 3, "accuracy": 0.7}]
    assert rounds_to(rows, 0.8) == 2 and rounds_to(rows, 0.9) is None


def test_report_on_unfinished_run_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a finished fedrank run" in result.output


def test_round_one_diagnostic_reports_both_padding_methods(tmp_path: Path) -> None:
    from fedrank.config import load_config
    from fedrank.diagnose import markdown, padding_diagnostic

    results = padding_diagnostic(load_config(None, TINY))
    assert [r["method"] for r in results] == ["zeropad", "replication"]
    for r in results:
        assert r["rank"] == max(r["ranks"]) == 8
        for key in ("own_local_accuracy", "received_local_accuracy", "own_test_accuracy", "received_test_accuracy"):
            assert 0.0 <= r[key] <= 1.0
    # the same client trained the same way under both methods: its own model is identical
    assert results[0]["own_test_accuracy"] == results[1]["own_test_accuracy"]
    assert "| zeropad |" in markdown(results) and "| replication |" in markdown(results)
    changed = markdown([{**r, "overrides": ["train.local_epochs=1"]} for r in results])
    assert "diagnostic only: `train.local_epochs=1`" in changed


def test_diagnose_set_with_a_bad_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from test_run import run_tiny

    run_tiny(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"),
                                      "--diagnose-set", "train.no_such_key=1"])
    assert result.exit_code == 2 and "no_such_key" in result.output


def test_parallel_compare_equals_sequential_runs(tmp_path: Path) -> None:
    from test_run import metrics, run_tiny, untimed

    args = ["compare", "--methods", "replication", "--seeds", "0,1", "--jobs", "2", "--out", str(tmp_path / "cmp"),
            *_sets(TINY)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_tiny(tmp_path / "alone", "method=replication", "seed=1")
    assert untimed(metrics(tmp_path / "cmp" / "runs" / "replication-seed1")) == untimed(metrics(tmp_path / "alone"))
    assert "| replication | 2 |" in (tmp_path / "cmp" / "report.md").read_text()


def test_eval_every_skips_rounds_and_the_report_still_renders(tmp_path: Path) -> None:
    from fedrank.report import load_run, table, write_report
    from test_run import metrics, run_tiny

    run_tiny(tmp_path / "run", "rounds=3", "eval.every=2")
    rows = metrics(tmp_path / "run")
    assert ["accuracy" in r for r in rows] == [False, True, True]  # round 2, then the last round always
    record = load_run(tmp_path / "run")
    best = table([record], 0.0)[0]["best"][0]
    assert best == max(rows[1]["accuracy"], rows[2]["accuracy"])
    assert rounds_to(rows, 0.0) == 2
    write_report([record], tmp_path / "report", 0.5)
    assert (tmp_path / "report" / "accuracy_vs_mb.png").stat().st_size > 1000
