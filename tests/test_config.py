"""Typed config: TOML files, key=value overrides and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrank.config import Config, ConfigError, describe, load_config, parse_override, save_config
from fedrank.methods import METHODS
from fedrank.ranks import make_rank_policy

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_name_known_parts(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.method in METHODS
    make_rank_policy(cfg.ranks, cfg.clients.count, cfg.seed, slot_cost=12 * 768)


def test_paper_analog_config_matches_the_issue() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "bbc_hetero.toml")
    assert (cfg.clients.count, cfg.clients.per_round) == (100, 10)
    assert (cfg.data.partition, cfg.ranks.policy, cfg.ranks.values, cfg.ranks.top_fraction) == (
        "quality", "quality", [5, 20], 0.1)


@pytest.mark.parametrize(("text", "key", "value"), [
    ("ranks.values=[5,20]", ["ranks", "values"], [5, 20]),
    ("method=replication", ["method"], "replication"),
    ("train.lr=1e-4", ["train", "lr"], 1e-4),
    ("eval.final_full=false", ["eval", "final_full"], False),
    ('data.dataset="my file.jsonl"', ["data", "dataset"], "my file.jsonl"),
])
def test_overrides_are_toml_literals(text: str, key: list[str], value) -> None:
    assert parse_override(text) == (key, value)


def test_file_then_overrides_then_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('method = "flora"\nrounds = 3\n[ranks]\nvalues = [2, 4]\n')
    cfg = load_config(path, ["rounds=5", "train.lr=1"])
    assert (cfg.method, cfg.rounds, cfg.ranks.values, cfg.train.lr) == ("flora", 5, [2, 4], 1.0)
    save_config(cfg, tmp_path / "saved.toml")
    assert load_config(tmp_path / "saved.toml") == cfg


@pytest.mark.parametrize(("overrides", "message"), [
    (["rouds=3"], "did you mean `rounds`"),
    (["train.lr=fast"], "`train.lr` must be float"),
    (["ranks.values=4"], "must be a list"),
    (["ranks.values=[0,4]"], "must be ≥ 1"),
    (["clients.per_round=30"], "exceeds clients.count"),
    (["data.test_fraction=1.5"], "must be ≤ 0.9"),
    (["clients=3"], "is a table"),
    (["rounds"], "key=value"),
    (["rounds=true"], "must be int"),
    (["train.lr_schedule=cosin"], "did you mean `cosine`"),
])
def test_bad_config_says_what_is_wrong(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_invalid_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("rounds = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_every_key_has_help() -> None:
    rows = describe(Config)
    assert len(rows) > 30 and all(help_text for _, _, help_text in rows)
