"""Paths of the ``fedrank`` command and of the training loop that no other test takes, on tiny runs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from fedrank import checkpoint
from fedrank.cli import app
from fedrank.client import local_steps, lr_factor
from fedrank.config import TrainConfig, describe, load_config, save_config
from fedrank.server import sample_clients

from test_run import TINY, adapter, metrics, run_tiny


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-round tiny run; tests must leave it as it is (they check that they did)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_tiny(out, "rounds=1")
    return out


# --------------------------------------------------------------------------- fedrank config / run / eval


def test_config_lists_every_key_with_its_default_and_meaning() -> None:
    result = invoke("config")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    keys = describe()
    assert len(lines) == len(keys)
    for key, default, help_text in keys:
        assert default in lines[key] and help_text in lines[key], key
    assert lines["rounds"].split()[1] == "10"


@pytest.mark.parametrize("extra", [["CONFIG"], ["--out", "OUT"]])
def test_resume_with_a_config_or_an_out_folder_is_refused(extra: list[str], finished: Path, tmp_path: Path) -> None:
    before = snapshot(finished)
    config = tmp_path / "x.toml"
    save_config(load_config(None, TINY), config)
    args = [{"CONFIG": str(config), "OUT": str(tmp_path / "o")}.get(a, a) for a in extra]
    assert_one_line_error(invoke("run", *args, "--resume", str(finished)), "--resume takes the run folder only")
    assert snapshot(finished) == before and not (tmp_path / "o").exists()


def test_a_new_run_into_an_existing_run_folder_is_refused(finished: Path) -> None:
    before = snapshot(finished)
    result = invoke("run", "--out", str(finished), *[x for o in TINY for x in ("--set", o)])
    assert_one_line_error(result, "already holds a run")
    assert snapshot(finished) == before


def test_eval_of_a_run_without_an_adapter_is_refused(finished: Path, tmp_path: Path) -> None:
    run = shutil.copytree(finished, tmp_path / "run")
    shutil.rmtree(run / "adapter")
    assert_one_line_error(invoke("eval", str(run)), "has no exported adapter")


@pytest.mark.parametrize(("summary", "printed"), [
    ({"final_accuracy": 0.0}, "final accuracy 0.0000"), ({"final_accuracy": 0.5}, "final accuracy 0.5000"),
    ({"headline": "accuracy", "final_accuracy": 0.25}, "final accuracy 0.2500"),
    ({"headline": "perplexity", "final_perplexity": 3.25}, "final perplexity 3.2500")])
def test_final_line_prints_the_tasks_headline_as_it_is(summary: dict[str, Any], printed: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """0.0 is an accuracy (it printed as nan); instruct prints its perplexity; a summary without `headline`
    (written before it existed) is an accuracy run."""
    monkeypatch.setattr("fedrank.cli.run_with_progress",
                        lambda cfg, run_dir, quiet: {**summary, "final_eval_examples": 7})
    result = invoke("run", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert f"{printed} on 7 test examples" in result.output


def test_report_diagnose_writes_diagnostic_json(finished: Path, tmp_path: Path) -> None:
    before = snapshot(finished)
    result = invoke("report", str(finished), "--out", str(tmp_path), "--diagnose")
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "diagnostic.json").read_text())
    assert [r["method"] for r in results] == ["zeropad", "replication"]
    for r in results:
        assert r["rank"] == max(r["ranks"]) and len(set(r["ranks"])) > 1
        assert all(0.0 <= r[k] <= 1.0 for k in ("own_test_accuracy", "received_test_accuracy"))
    assert results[0]["own_test_accuracy"] == results[1]["own_test_accuracy"]  # the same local training
    report = (tmp_path / "report.md").read_text()
    assert "diagnostic" in report and "| zeropad |" in report and "| replication |" in report
    assert snapshot(finished) == before


# --------------------------------------------------------------------------- server.max_update_norm


def state_norm(run: Path) -> float:
    """L2 norm of the method's global state (every factor of every layer) in the run's last checkpoint."""
    tensors = checkpoint.latest(run / "checkpoints").tensors
    return math.sqrt(sum(float(t.double().square().sum()) for k, t in tensors.items() if "#" in k))


def test_max_update_norm_clips_or_rejects_uploads_in_a_real_run(tmp_path: Path) -> None:
    """The same round 1 twice: with ``reject`` every upload is refused for its norm (so the bound is active:
    the seeded A alone has a norm of about 4); with ``clip`` all are kept, scaled to the bound, and fedit's
    average of them stays within it."""
    bound = 2.0
    common = ["rounds=1", "method=fedit", "ranks.values=[4]", "eval.tiers=false", f"server.max_update_norm={bound}"]
    run_tiny(tmp_path / "reject", *common, "server.norm_action=reject")
    (row,) = metrics(tmp_path / "reject")
    assert sorted(r["client"] for r in row["rejected"]) == row["clients"]
    assert all("exceeds server.max_update_norm=2" in r["reason"] for r in row["rejected"])
    assert all(torch.count_nonzero(t) == 0 for k, t in adapter(tmp_path / "reject").items() if "lora_B" in k)
    run_tiny(tmp_path / "clip", *common, "server.norm_action=clip")
    (row,) = metrics(tmp_path / "clip")
    assert row["rejected"] == [] and 0.95 * bound <= state_norm(tmp_path / "clip") <= bound * (1 + 1e-6)


# --------------------------------------------------------------------------- local training schedule


COS = [(1 + math.cos(math.pi * p)) / 2 for p in (0.0, 0.25, 0.5, 0.75)]


@pytest.mark.parametrize(("schedule", "warmup", "factors"), [
    ("constant", 0, [1.0] * 6),
    ("constant", 3, [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 2, [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", 2, [0.5, 1.0, *COS]),
])
def test_lr_factor_warms_up_then_follows_the_schedule(schedule: str, warmup: int, factors: list[float]) -> None:
    factor = lr_factor(TrainConfig(lr_schedule=schedule, warmup_steps=warmup), 6)
    assert [factor(step) for step in range(6)] == pytest.approx(factors)


def test_local_epochs_replace_local_steps() -> None:
    assert local_steps(TrainConfig(local_steps=7), 100) == 7
    assert local_steps(TrainConfig(local_steps=3, local_epochs=1.0, batch_size=16), 100) == 7  # ceil(100/16)
    assert local_steps(TrainConfig(local_epochs=0.5, batch_size=4), 30) == 4  # ceil(15/4)
    assert local_steps(TrainConfig(local_epochs=0.01, batch_size=4), 30) == 1


def recorded_lrs(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Every AdamW step's learning rate per parameter group (LoRA, head), recorded as training runs."""
    seen: list[list[float]] = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return seen


ONE_CLIENT = ["rounds=1", "clients.per_round=1", "eval.tiers=false"]


@pytest.mark.parametrize(("train", "lora", "head"), [
    (["train.lr_schedule=cosine", "train.warmup_steps=2", "train.local_steps=6", "train.lr=0.01",
      "train.head_lr=0.03"], [0.01 * f for f in [0.5, 1.0, *COS]], [0.03 * f for f in [0.5, 1.0, *COS]]),
    (["train.lr_schedule=linear", "train.local_steps=4", "train.lr=0.01", "train.head_lr=0"],
     [0.01, 0.0075, 0.005, 0.0025], [0.01, 0.0075, 0.005, 0.0025]),  # head_lr 0: the head follows lr
])
def test_training_uses_the_schedule_warmup_and_head_lr(train: list[str], lora: list[float], head: list[float],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = recorded_lrs(monkeypatch)
    run_tiny(tmp_path, *ONE_CLIENT, *train)
    assert [s[0] for s in seen] == pytest.approx(lora)
    assert [s[1] for s in seen] == pytest.approx(head)


def test_local_epochs_set_the_number_of_steps_in_a_real_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedrank.experiment import build

    cfg = load_config(None, TINY + ONE_CLIENT + ["train.local_epochs=0.5"])
    client = sample_clients(cfg.seed, 1, cfg.clients.count, 1)[0]
    examples = build(cfg).sizes[client]
    seen = recorded_lrs(monkeypatch)
    run_tiny(tmp_path, *ONE_CLIENT, "train.local_epochs=0.5")
    assert len(seen) == math.ceil(0.5 * examples / cfg.train.batch_size) > cfg.train.local_steps


# --------------------------------------------------------------------------- compare


def test_compare_refuses_a_folder_that_holds_another_config(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "replication-seed0"
    folder.mkdir(parents=True)
    save_config(load_config(None, TINY + ["method=replication", "rounds=5"]), folder / "config.toml")
    result = invoke("compare", "--methods", "replication", "--seeds", "0", "--out", str(tmp_path),
                    *[x for o in TINY for x in ("--set", o)])
    assert_one_line_error(result, "holds a run with another config")
    assert sorted(p.name for p in folder.iterdir()) == ["config.toml"] and not (tmp_path / "report.md").exists()


def test_a_failing_run_stops_compare_jobs_with_its_error(tmp_path: Path) -> None:
    """fedit refuses the mixed ranks in its worker process; the run already going in the other worker
    finishes; no report is written."""
    result = invoke("compare", "--methods", "fedit,replication", "--seeds", "0", "--jobs", "2",
                    "--out", str(tmp_path), *[x for o in TINY + ["rounds=1"] for x in ("--set", o)])
    assert result.exit_code == 2, result.output
    assert "same rank" in result.output and "Traceback" not in result.output
    assert (tmp_path / "runs" / "replication-seed0" / "summary.json").is_file()
    assert not (tmp_path / "runs" / "fedit-seed0" / "summary.json").exists()
    assert not (tmp_path / "report.md").exists()
