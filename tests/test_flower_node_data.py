"""Node-local data on Flower: every SuperNode trains on its own file, the server sees sizes and label sets only."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedrank.config import ConfigError, load_config, save_config  # noqa: E402
from fedrank.data import Splits, TextDataset, load_splits  # noqa: E402
from fedrank.data.sources import holdout_size  # noqa: E402
from fedrank.job import Hooks, execute  # noqa: E402
from fedrank.runtime import flower, loopback  # noqa: E402
from fedrank.serverapp import record_enrolment  # noqa: E402

from test_flower import DEPLOY_RUN_CONFIG, DEPLOY_WAIT_S, ThreadGrid  # noqa: E402
from test_run import TINY, metrics  # noqa: E402

SANDBOX = Path(__file__).parent / "sandbox"  # sitecustomize.py: files a process tree may not open
SIZES = [30, 40, 50]  # examples in each organisation's file


@pytest.fixture(scope="module")
def bbc() -> Splits:
    """The tiny config's BBC News splits: the examples the organisations' files are cut from."""
    return load_splits(load_config(None, TINY).data, 0)


def write_jsonl(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    return path


def rows_of(data: TextDataset, indices: Sequence[int]) -> list[tuple[str, str]]:
    return [(data.texts[i], data.label_names[data.labels[i]]) for i in indices]


def organisations(train: TextDataset, folder: Path) -> list[Path]:
    """One JSONL file per organisation, each in its own folder, cut from ``train`` sorted by label (so their label
    sets differ), of ``SIZES`` examples."""
    order = sorted(range(len(train)), key=lambda i: train.labels[i])
    starts = [sum(SIZES[:k]) for k in range(len(SIZES))]
    return [write_jsonl(folder / f"org{k}" / "shard.jsonl", rows_of(train, order[start:start + size]))
            for k, (start, size) in enumerate(zip(starts, SIZES))]


def node_overrides(labels: Sequence[str], *extra: str) -> list[str]:
    """The tiny config on node-local data: one rank tier pair, one local step, no tier evaluation."""
    return TINY + ["data.dataset=nodes", f"data.labels={json.dumps(list(labels))}", "ranks.values=[2,4]",
                   "train.local_steps=1", "eval.tiers=false", *extra]


def test_nodes_enrol_by_their_files_and_the_server_evaluates_on_its_own_test_file(bbc: Splits,
                                                                                   tmp_path: Path) -> None:
    """In-process grid: three nodes with their own files and one whose file has a label outside data.labels; the
    fourth is refused with one log line, the quality policy raises a client through evaluate messages, a node back
    under a new node id serves its client again, and the server's test file evaluates the global model."""
    files = organisations(bbc.train, tmp_path)
    stranger = write_jsonl(tmp_path / "org3" / "shard.jsonl", [("Rain all week across the north.", "weather")] * 5)
    test_file = write_jsonl(tmp_path / "server" / "test.jsonl", rows_of(bbc.test, range(24)))
    cfg = load_config(None, node_overrides(bbc.train.label_names, f"data.test_path={json.dumps(str(test_file))}",
                                           "clients.count=4", "clients.per_round=3", "ranks.policy=quality",
                                           "ranks.values=[2,8]", "ranks.top_fraction=0.3"))
    logs: list[str] = []
    grid = ThreadGrid([{"data": str(f)} for f in [*files, stranger]])
    runtime = flower.FlowerRuntime(grid, cfg, timeout_s=DEPLOY_WAIT_S, log=logs.append)
    moved: list[int] = []

    def restart_node_1(row: dict) -> None:  # back under a new node id: its file says which client it is
        if row["round"] == 1:
            moved.append(grid.restart(1001))

    try:
        sizes = runtime.node_sizes()
        summary = execute(runtime.cfg, tmp_path / "run", Hooks(round=restart_node_1, log=logs.append),
                          lambda exp: runtime, sizes)
    finally:
        grid.pool.shutdown(wait=True)
    assert any(line.startswith(f"flower: node {moved[0]} (shard.jsonl) serves client ") for line in logs), logs
    refused = [line for line in logs if "refused" in line]
    assert refused == [f"flower: refused node 1003: shard.jsonl has labels ['weather'] that are not in data.labels "
                       f"{bbc.train.label_names}; the run goes on without it"], logs
    assert sorted(sizes) == [n - holdout_size(n, cfg.clients.val_fraction) for n in SIZES]
    assert load_config(tmp_path / "run" / "config.toml").clients.count == 3
    rows = metrics(tmp_path / "run")
    assert [(r["clients"], r["missing"]) for r in rows] == [([0, 1, 2], [])] * 2
    assert rows[0]["ranks"] == [2, 2, 2] and sorted(rows[1]["ranks"]) == [2, 2, 8]  # quality, via evaluate messages
    assert summary["evaluation"] == f"server test file {test_file}" and summary["final_eval_examples"] == 24
    assert 0.0 <= summary["final_accuracy"] <= 1.0


def test_a_node_reads_a_jsonl_or_csv_file_or_a_save_to_disk_folder_alike(tmp_path: Path) -> None:
    """The same examples as JSONL, CSV and a datasets ``save_to_disk`` folder: the same report to the server."""
    import csv

    import datasets

    rows = [("Shares rose.", "business"), ("A late goal.", "sport"), ("Rates held.", "business")]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]}).save_to_disk(
        str(tmp_path / "saved"))
    config = flower.config_text(load_config(None, node_overrides(["business", "sport"])))
    reports = [dict(flower.data_record(str(path), config)) for path in (jsonl, tmp_path / "a.csv", tmp_path / "saved")]
    assert [r.pop("name") for r in reports] == ["a.jsonl", "a.csv", "saved"]
    assert reports[0] == reports[1] == reports[2] and reports[0]["examples"] == 3
    assert reports[0]["labels"] == ["business", "sport"]


def test_a_node_says_in_one_line_what_is_wrong_with_its_file(tmp_path: Path) -> None:
    """What a node reports instead of its file's sizes, for the server's refusal line: one line naming the file and
    what to fix."""
    config = flower.config_text(load_config(None, node_overrides(["business", "sport"])))
    unlabelled = tmp_path / "topics.jsonl"
    unlabelled.write_text(json.dumps({"text": "Shares rose.", "topic": "business"}) + "\n")
    errors = {path: flower.data_record(str(path), config)["error"]
              for path in (tmp_path / "gone.jsonl", unlabelled, write_jsonl(tmp_path / "empty.jsonl", []))}
    for path, error in errors.items():
        assert str(path) in error and "\n" not in error, error
    assert "not found" in errors[tmp_path / "gone.jsonl"] and "data.label_field" in errors[unlabelled]
    assert "no examples" in errors[tmp_path / "empty.jsonl"]


def test_a_resumed_run_needs_the_nodes_it_started_with(tmp_path: Path) -> None:
    """The enrolled files fix the client ids: resuming a run folder with other nodes is a one-line error."""
    def shard(name: str) -> flower.NodeShard:
        return flower.NodeShard(7, name, 10, ["business", "sport"], f"sha-of-{name}")

    record_enrolment(tmp_path, [shard("a.jsonl"), shard("b.jsonl")])
    assert json.loads((tmp_path / "nodes.json").read_text())[1] == {
        "name": "b.jsonl", "examples": 10, "labels": ["business", "sport"], "fingerprint": "sha-of-b.jsonl"}
    record_enrolment(tmp_path, [shard("a.jsonl"), shard("b.jsonl")])  # the same nodes again
    with pytest.raises(ConfigError, match=r"\['a.jsonl'\]\) are not those of its start"):
        record_enrolment(tmp_path, [shard("a.jsonl")])


def sandboxed(log: Path, forbidden: Sequence[Path], watched: Path) -> dict[str, str]:
    """Environment under which a process tree cannot open ``forbidden`` and records what it opens of those and of
    ``watched`` in ``log`` (``sandbox/sitecustomize.py``)."""
    return {"FEDRANK_FORBIDDEN": os.pathsep.join(map(str, forbidden)), "FEDRANK_WATCHED": str(watched),
            "FEDRANK_OPEN_LOG": str(log)}


def opened(log: Path) -> list[tuple[str, str]]:
    """(what, path) of each recorded open: ``opened`` or ``refused``."""
    return [tuple(line.split(" ", 2)[1:]) for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.skipif(not loopback.binaries_available(),
                    reason="Flower deployment binaries (flower-superlink, flower-supernode, flwr) are not installed")
def test_three_organisations_train_on_their_own_files_on_a_loopback_deployment(bbc: Splits, tmp_path: Path) -> None:
    """Three SuperNodes, each with its own file in its own folder; each node's process tree cannot open the other
    nodes' files and the SuperLink's (ServerApp included) cannot open any of them.  The run finishes, evaluated on
    the nodes' validation splits."""
    files = [f.resolve() for f in organisations(bbc.train, tmp_path / "orgs")]
    cfg_path, out, audit = tmp_path / "nodes.toml", tmp_path / "run", tmp_path / "audit"
    save_config(load_config(None, node_overrides(bbc.train.label_names, "clients.count=3", "clients.per_round=3",
                                                 "eval.every=2")), cfg_path)
    audit.mkdir()
    env = {k: v for k, v in os.environ.items() if k != flower.FAULT_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(SANDBOX), *filter(None, [env.get("PYTHONPATH")])]),
               **sandboxed(audit / "server.log", files, cfg_path))
    with loopback.loopback_deployment(tmp_path, 0, env=env, start_timeout=DEPLOY_WAIT_S) as dep:
        for k, own in enumerate(files):
            dep.start_supernode(f"org{k}", node_config=f"data='{own}'",
                                env=sandboxed(audit / f"org{k}.log", [f for f in files if f != own], own))
        run = dep.run(cfg_path, out, timeout=3 * DEPLOY_WAIT_S, run_config=DEPLOY_RUN_CONFIG)
        assert (out / "summary.json").is_file(), run.stdout + run.stderr + dep.log("superlink")
    for k, own in enumerate(files):
        assert set(opened(audit / f"org{k}.log")) == {("opened", str(own))}, k  # its own file, no other
    assert set(opened(audit / "server.log")) == {("opened", str(cfg_path))}  # the config; no node's file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "node validation, size-weighted"
    assert summary["final_eval_examples"] == sum(holdout_size(n, 0.1) for n in SIZES)
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    rows = metrics(out)
    assert [(r["clients"], r["missing"]) for r in rows] == [([0, 1, 2], [])] * 2 and "accuracy" in rows[-1]
    said = [line for line in run.stdout.splitlines() if line.startswith("fedrank: flower: client ")]
    assert len(said) == 3 and all("examples, labels" in line for line in said), run.stdout
    known = json.loads((out / "nodes.json").read_text())  # all the server knows of the nodes' data
    assert sorted(n["examples"] for n in known) == SIZES and {n["name"] for n in known} == {"shard.jsonl"}
