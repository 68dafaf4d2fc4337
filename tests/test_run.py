"""End-to-end federated runs on the packaged MiniLM and BBC News, in tiny settings."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedrank.cli import app
from fedrank.config import load_config
from fedrank.job import execute
from fedrank.methods import METHODS
from fedrank.server import RunFiles

import pausing_cli
from closeness import (LOSS_RTOL, MODEL_RTOL, TIE_EXAMPLES, assert_same_metrics, assert_same_model, model_gap,
                       scaled_updates)

EVAL_EXAMPLES = 32  # test paragraphs evaluated after each round
TINY = [
    "method=replication",  # the runtime, resume and fault tests were written against it; the default is flexlora
    "rounds=2", "clients.count=4", "clients.per_round=3", "train.local_steps=2", "train.batch_size=4",
    "train.max_length=32", "ranks.values=[2,4,2,8]", "ranks.fractions=[]", f"eval.max_examples={EVAL_EXAMPLES}",
    "eval.final_full=false", "data.max_train_examples=120", "data.partition=iid",
    "threads=1",  # bit-identical results across processes need the same torch thread count
]


def run_tiny(out: Path, *overrides: str) -> dict:
    return execute(load_config(None, TINY + list(overrides)), out)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny default run (2 rounds), finished; tests that change it work on a copy (``copy_run``)."""
    out = tmp_path_factory.mktemp("short") / "run"
    run_tiny(out)
    return out


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with 3 rounds, uninterrupted: what every resumed 3-round run must equal exactly."""
    out = tmp_path_factory.mktemp("long") / "run"
    run_tiny(out, "rounds=3")
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def assert_identical_runs(a: Path, b: Path) -> None:
    """The same code path, deterministic: metrics (but timings) and the exported adapter bit for bit."""
    assert untimed(metrics(a)) == untimed(metrics(b))
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k, v in ta.items():
        assert torch.equal(tb[k], v), k


def resume(run: Path, *args: str) -> None:
    result = CliRunner().invoke(app, ["run", "--resume", str(run), *args, "--quiet"])
    assert result.exit_code == 0, result.output


def test_same_seed_gives_identical_metrics(short_run: Path, tmp_path: Path) -> None:
    run_tiny(tmp_path / "b")
    assert untimed(metrics(short_run)) == untimed(metrics(tmp_path / "b"))
    run_tiny(tmp_path / "c", "seed=1")
    assert untimed(metrics(short_run)) != untimed(metrics(tmp_path / "c"))


@pytest.fixture(scope="module")
def fedit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fedit") / "run"
    run_tiny(out, "method=fedit", "ranks.values=[4]")
    return out


@pytest.mark.parametrize("method", ["zeropad", "replication", "fedplora"])
def test_equal_ranks_padding_methods_agree_with_fedit(method: str, fedit_run: Path, tmp_path: Path) -> None:
    """A different code path from fedit's: the same model to ``MODEL_RTOL``, accuracy up to a near-tie.
    (The bytes differ: fedplora also uploads its module indices.)"""
    run_tiny(tmp_path, f"method={method}", "ranks.values=[4]")
    assert_same_metrics(metrics(fedit_run), metrics(tmp_path), EVAL_EXAMPLES, keys=("accuracy", "loss"))
    assert_same_model(adapter(fedit_run), adapter(tmp_path))


def test_the_agreement_tolerance_catches_a_dropped_client_or_a_mis_scaled_update(
        fedit_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrong variants the test above guards against fall far outside its tolerance."""
    fedit = METHODS["fedit"]
    aggregate = fedit.aggregate
    monkeypatch.setattr(fedit, "aggregate", lambda self, state, replies: aggregate(self, state, replies[:-1]))
    run_tiny(tmp_path, "method=fedit", "ranks.values=[4]")
    assert model_gap(adapter(fedit_run), adapter(tmp_path)) > 10 * MODEL_RTOL
    assert model_gap(adapter(fedit_run), scaled_updates(adapter(fedit_run), 1.05)) > 4 * MODEL_RTOL


def test_resume_extends_a_finished_run_to_equal_a_longer_run(short_run: Path, long_run: Path,
                                                             tmp_path: Path) -> None:
    run = copy_run(short_run, tmp_path / "run")
    resume(run, "--set", "rounds=3")
    assert_identical_runs(run, long_run)


def test_only_the_last_two_checkpoints_are_kept(long_run: Path) -> None:
    assert sorted(p.name for p in (long_run / "checkpoints").iterdir()) == [
        "round-0002.json", "round-0002.safetensors", "round-0003.json", "round-0003.safetensors"]


def test_a_torn_last_metrics_line_is_dropped_and_its_round_redone(short_run: Path, long_run: Path,
                                                                   tmp_path: Path) -> None:
    """A kill while round 3's row was being appended leaves half a line after round 2's checkpoint."""
    run = copy_run(short_run, tmp_path / "run")
    row = json.dumps(metrics(long_run)[2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(row[: len(row) // 2])
    assert [r["round"] for r in RunFiles(run).read_metrics()] == [1, 2]
    resume(run, "--set", "rounds=3")
    assert_identical_runs(run, long_run)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedrank.cli", *args]


RESUME_TIMEOUT_S = 900  # a 3-round tiny run takes seconds; this only keeps a hung resume from hanging the suite


@pytest.mark.parametrize("point", pausing_cli.POINTS)
def test_kill_9_mid_run_then_resume_equals_uninterrupted(point: str, long_run: Path, tmp_path: Path) -> None:
    """kill -9 at a fixed point of round 3 (mid-training, or between its metrics row and its checkpoint),
    whatever the machine's speed; the resumed run equals the uninterrupted one bit for bit."""
    out, ready = tmp_path / "killed", tmp_path / "ready"
    sets = [x for o in TINY + ["rounds=3"] for x in ("--set", o)]
    proc = subprocess.Popen([sys.executable, pausing_cli.__file__, point, "3", str(ready), "--",
                             "run", "--out", str(out), "--quiet", *sets],
                            env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "summary.json").exists()
    assert [r["round"] for r in metrics(out)] == ([1, 2] if point == "training" else [1, 2, 3])
    resumed = subprocess.run(_cli("run", "--resume", str(out), "--quiet"), capture_output=True, text=True,
                             timeout=RESUME_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical_runs(out, long_run)


def test_corrupted_checkpoint_falls_back_to_the_previous_one(short_run: Path, long_run: Path,
                                                             tmp_path: Path) -> None:
    run = copy_run(short_run, tmp_path / "run")
    latest = run / "checkpoints" / "round-0002.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    result = CliRunner().invoke(app, ["run", "--resume", str(run), "--set", "rounds=3", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "damaged" in result.output
    assert untimed(metrics(run)) == untimed(metrics(long_run))


def test_exported_adapter_reproduces_the_reported_accuracy(tmp_path: Path) -> None:
    """``fedrank eval`` reloads the PEFT adapter (another fp32 path than the merged model the run evaluated)
    and reproduces the final accuracy on the whole test split up to a near-tie, and its loss."""
    summary = run_tiny(tmp_path, "eval.final_full=true", "method=flexlora", "data.test_fraction=0.05")
    result = CliRunner().invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 0, result.output
    printed = re.fullmatch(r"accuracy (\S+)  macro_f1 (\S+)  loss (\S+)  \((\d+) test examples\)\n", result.output)
    assert printed, result.output
    accuracy, loss, examples = float(printed[1]), float(printed[3]), int(printed[4])
    assert examples == summary["final_eval_examples"] > 2 * EVAL_EXAMPLES
    assert abs(accuracy - summary["final_accuracy"]) <= TIE_EXAMPLES / examples + 5e-5
    assert loss == pytest.approx(summary["final_loss"], rel=LOSS_RTOL, abs=5e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--set", "rouds=3"], "did you mean `rounds`"),
    (["run", "--set", "method=fedavg"], "unknown method `fedavg`"),
    (["run", "--set", "clients.per_round=50"], "exceeds clients.count"),
    (["run", "--set", "method=fedit", "--set", "ranks.values=[4,16]", "--set", "clients.count=2",
      "--set", "clients.per_round=1", "--set", "data.max_train_examples=50"], "same rank"),
    (["run", "no/such.toml"], "not found"),
    (["run", "--set", "data.dataset=no/such.jsonl"], "data file no/such.jsonl not found"),
    (["run", "--set", "data.max_train_examples=3"], "3 examples cannot fill 20 clients"),
    (["run", "--set", "ranks.fractions=[0.5,0.6]"], "must sum to 1"),
    (["run", "--set", "train.lr_schedule=cos"], "did you mean `cosine`"),
    (["run", "--resume", "no/such/run"], "holds no fedrank run"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, args + (["--out", str(tmp_path / "o")] if "--resume" not in args else []))
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_malformed_data_line_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b"\n')
    result = CliRunner().invoke(app, ["run", "--set", f'data.dataset="{bad}"', "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "line 2 is not valid JSON" in result.output


def test_resume_refuses_to_change_anything_but_rounds(tmp_path: Path) -> None:
    run_tiny(tmp_path, "rounds=1")
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path), "--set", "method=zeropad"])
    assert result.exit_code == 2 and "method" in result.output


def test_dropped_and_corrupt_clients_do_not_stop_the_run(tmp_path: Path) -> None:
    run_tiny(tmp_path, "rounds=3", "faults.drop_fraction=0.3", "faults.corrupt_fraction=0.3",
             "faults.fail_fraction=0.1")
    rows = metrics(tmp_path)
    assert len(rows) == 3
    assert any(r["missing"] for r in rows) and any(r["rejected"] for r in rows)
    for r in rows:
        assert set(r["missing"]) <= set(r["clients"])
        assert all("non-finite" in x["reason"] for x in r["rejected"])


def test_a_round_without_valid_updates_leaves_the_global_adapter_unchanged(tmp_path: Path) -> None:
    run_tiny(tmp_path, "faults.corrupt_fraction=1.0")
    rows = metrics(tmp_path)
    assert all(len(r["rejected"]) == len(r["clients"]) for r in rows)
    lora_B = [t for k, t in adapter(tmp_path).items() if "lora_B" in k]
    assert lora_B and all(torch.count_nonzero(t) == 0 for t in lora_B)  # still LoRA's zero init
