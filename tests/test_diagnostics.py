"""Study diagnostics: paired differences against a baseline and the head refit, checked independently."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats
from typer.testing import CliRunner

from fedrank.cli import app
from fedrank.config import ConfigError, load_config, save_config
from fedrank.job import execute
from fedrank.report import headline_of, load_run, paired, paired_markdown, table


def fake_run(folder: Path, method: str, seed: int, final: float, curve: list[float], key: str = "accuracy") -> Path:
    """A finished run folder with the given final and per-round headline metric ``key`` (a summary without
    `headline`, as runs wrote before it existed, for accuracy)."""
    folder.mkdir(parents=True)
    save_config(load_config(None, [f"method={method}", f"seed={seed}", f"rounds={len(curve)}"]), folder / "config.toml")
    rows = [{"round": i + 1, key: a, "cum_upload_bytes": 1, "cum_download_bytes": 1} for i, a in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(curve) if key == "accuracy" else min(curve)
    summary = {f"final_{key}": final, f"best_round_{key}": best, "upload_bytes": 1, "download_bytes": 1,
               "wall_s": 1.0, "final_tiers": {}, **({} if key == "accuracy" else {"headline": key})}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_paired_differences_match_an_independent_computation(tmp_path: Path) -> None:
    finals = {"zeropad": [0.80, 0.82, 0.79, 0.85], "updatepad": [0.84, 0.83, 0.80, 0.90]}
    curves = {"zeropad": [[0.5, 0.7, 0.81], [0.6, 0.9, 0.9], [0.5, 0.6, 0.7], [0.85, 0.9, 0.9]],
              "updatepad": [[0.81, 0.9, 0.9], [0.7, 0.82, 0.9], [0.5, 0.6, 0.79], [0.6, 0.85, 0.9]]}
    runs = [load_run(fake_run(tmp_path / f"{m}-{s}", m, s, finals[m][s], curves[m][s]))
            for m in finals for s in range(4)]
    (row,) = paired(runs, "zeropad", target=0.8)
    diffs = [a - b for a, b in zip(finals["updatepad"], finals["zeropad"])]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t = mean / (sd / math.sqrt(4))
    assert row["method"] == "updatepad" and row["seeds"] == [0, 1, 2, 3]
    assert row["final"]["diffs"] == pytest.approx(diffs)
    assert row["final"]["mean"] == pytest.approx(mean) and row["final"]["std"] == pytest.approx(sd)
    assert row["final"]["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))
    flips = [abs(sum(s * d for s, d in zip(signs, diffs))) for signs in itertools.product([1, -1], repeat=4)]
    assert row["final"]["perm_p"] == pytest.approx(sum(f >= abs(sum(diffs)) - 1e-12 for f in flips) / 16)
    assert row["final"]["wins"] == 4
    # rounds to 0.8: updatepad 1, 2, 4 (never: rounds + 1), 2; zeropad 3, 2, 4 (never), 1
    assert row["rounds"]["diffs"] == [-2, 0, 0, 1]
    # late accuracy: the mean of rounds 2 and 3 (the second half of 3 rounds)
    late = [statistics.fmean(curves["updatepad"][s][1:]) - statistics.fmean(curves["zeropad"][s][1:]) for s in range(4)]
    assert row["late"]["diffs"] == pytest.approx(late)


def test_perplexity_runs_are_paired_and_tabulated_with_lower_as_better(tmp_path: Path) -> None:
    finals = {"zeropad": [9.0, 8.0], "updatepad": [7.0, 8.5]}
    curves = {"zeropad": [[12.0, 9.0], [11.0, 8.0]], "updatepad": [[9.5, 7.0], [12.5, 8.5]]}
    runs = [load_run(fake_run(tmp_path / f"{m}-{s}", m, s, finals[m][s], curves[m][s], "perplexity"))
            for m in finals for s in range(2)]
    (row,) = paired(runs, "zeropad", target=10.0)
    assert row["final"]["diffs"] == [-2.0, 0.5] and row["final"]["wins"] == 1  # lower perplexity wins
    assert row["rounds"]["diffs"] == [-1, 0]  # first round at most 10: updatepad 1, 2; zeropad 2, 2
    rows = {r["method"]: r for r in table(runs, 10.0)}
    assert rows["updatepad"]["best"][0] == pytest.approx(7.75) and rows["updatepad"]["final"][0] == 7.75
    text = paired_markdown([row], "zeropad", 10.0, headline_of(runs))
    assert "Δ final perplexity" in text and "| lower on |" in text
    with pytest.raises(ConfigError, match="different metrics"):
        headline_of(runs + [load_run(fake_run(tmp_path / "acc", "zeropad", 9, 0.8, [0.8]))])


def test_paired_refuses_an_unknown_baseline(tmp_path: Path) -> None:
    runs = [load_run(fake_run(tmp_path / "z", "zeropad", 0, 0.8, [0.8]))]
    with pytest.raises(ConfigError, match="--baseline fedavg"):
        paired(runs, "fedavg", 0.8)


TINY = ["rounds=2", "clients.count=4", "clients.per_round=3", "train.local_steps=3", "train.batch_size=4",
        "train.max_length=32", "ranks.values=[2,8]", "eval.max_examples=32", "data.max_train_examples=160",
        "data.test_fraction=0.05", "data.partition=iid", "threads=1", "method=replication"]


def test_report_adds_paired_differences_and_a_head_refit_that_fixes_a_random_head(tmp_path: Path) -> None:
    summaries = {head: execute(load_config(None, TINY + [f"server.head={head}"]), tmp_path / head)
                 for head in ("fedavg", "frozen")}
    result = CliRunner().invoke(app, ["report", str(tmp_path / "fedavg"), str(tmp_path / "frozen"), "--out",
                                      str(tmp_path / "report"), "--baseline", "replication", "--head-refit", "120"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Paired differences against replication" in text and "| replication+frozen | 1 |" in text
    assert "Head refit" in text
    refit = {r["head"]: r for r in json.loads((tmp_path / "report" / "head_refit.json").read_text())}
    for head, summary in summaries.items():
        # "before" is the run's own final model on the whole test split: the same number the run reported
        assert refit[head]["before_r8"] == pytest.approx(summary["final_accuracy"], abs=1e-12)
        assert refit[head]["train_examples"] == 120 and {"after_r2", "after_r8"} <= refit[head].keys()
    # a head frozen at its random init is near chance; a probe on the same features is far better
    assert refit["frozen"]["after_r8"] > refit["frozen"]["before_r8"] + 0.15


def test_report_drops_a_torn_last_metrics_line_and_names_a_bad_middle_line(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r", "zeropad", 0, 0.8, [0.5, 0.8])
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "accur')
    assert [r["round"] for r in load_run(run).rows] == [1, 2]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        load_run(run)
