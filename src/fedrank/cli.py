"""The ``fedrank`` command."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn,  # noqa: E402
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table  # noqa: E402

from fedrank.config import Config, ConfigError, describe, load_config, to_dict  # noqa: E402
from fedrank.headline import LABELS, final_line, of_summary  # noqa: E402
from fedrank.job import Hooks, execute, round_line  # noqa: E402

if TYPE_CHECKING:
    from fedrank.report import RunRecord

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated LoRA fine-tuning with rank-heterogeneous clients.")
console = Console(stderr=True)

RESUMABLE = {"rounds"}


@contextmanager
def user_errors() -> Iterator[None]:
    """Configuration and data errors: one line on stderr, exit code 2, no traceback."""
    try:
        yield
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _resume_config(run_dir: Path, overrides: list[str]) -> Config:
    saved = run_dir / "config.toml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} holds no fedrank run (no config.toml): pass the --out folder of a run")
    before = to_dict(load_config(saved))
    cfg = load_config(saved, overrides)
    changed = {k for k, v in to_dict(cfg).items() if before[k] != v} - RESUMABLE
    if changed:
        raise ConfigError(f"--resume can only change {', '.join(sorted(RESUMABLE))}; "
                          f"{', '.join(sorted(changed))} differ: start a new run with --out instead")
    return cfg


def _new_run_dir(cfg: Config, config: Optional[Path], out: Optional[Path]) -> Path:
    if out is None:
        stem = config.stem if config else "default"
        out = Path("runs") / f"{stem}-{cfg.method}-seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "checkpoints").exists():
        raise ConfigError(f"{out} already holds a run: continue it with --resume {out} or choose another --out")
    return out


def _table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> Table:
    """Per round: the task's reported metrics (``—`` where a round was not evaluated), MB and seconds."""
    reported = of_summary(summary).reported
    table = Table(title=f"{summary['method']} · seed {summary['seed']}")
    for col in ("round", *(LABELS.get(k, k) for k in reported), "up MB", "down MB", "s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["round"]), *(f"{r[k]:.4f}" if k in r else "—" for k in reported),
                      f"{r['upload_bytes'] / 1e6:.2f}", f"{r['download_bytes'] / 1e6:.2f}", f"{r['wall_s']:.1f}")
    return table


@app.command()
def run(
    config: Annotated[Optional[Path], typer.Argument(help="experiment TOML (see configs/); defaults apply when omitted")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="override a key: --set ranks.values=[5,20]")] = [],
    out: Annotated[Optional[Path], typer.Option(help="run folder (default: runs/<config>-<method>-seed<s>-<time>)")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue the run in this folder (only `rounds` may change)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar or table")] = False,
) -> None:
    """Run a federated fine-tuning job (or continue one with --resume)."""
    with user_errors():
        if resume is not None:
            if config is not None or out is not None:
                raise ConfigError("--resume takes the run folder only: drop CONFIG and --out")
            cfg, run_dir = _resume_config(resume, set_), resume
        else:
            cfg = load_config(config, set_)
            run_dir = _new_run_dir(cfg, config, out)
        summary = run_with_progress(cfg, run_dir, quiet)
    if not quiet:
        console.print(f"{final_line(summary)} · outputs in {run_dir}")


def run_with_progress(cfg: Config, run_dir: Path, quiet: bool = True,
                      progress: Progress | None = None) -> dict[str, Any]:
    """``fedrank.job.execute`` with a progress bar that appears once the experiment is built (a configuration or
    data error stays one line): a row of ``progress`` when given (removed at the end), else a bar of its own
    unless ``quiet``; unless ``quiet``, the per-round table at the end."""
    per_round = cfg.clients.per_round
    bar = progress or _progress(quiet)
    rows: list[TaskID] = []

    def start(done: int) -> None:
        if progress is None:
            bar.start()
        rows.append(bar.add_task(f"{run_dir.name}: round {min(done + 1, cfg.rounds)}/{cfg.rounds}",
                                 total=cfg.rounds * per_round, completed=done * per_round))

    hooks = Hooks(start=start, client=lambda task: bar.advance(rows[0]),
                  round=lambda done: bar.update(rows[0], description=f"{run_dir.name}: {round_line(done, cfg)}"),
                  log=console.print)
    try:
        summary = execute(cfg, run_dir, hooks)
    finally:
        if progress is None and rows:  # started (stopping a bar that never started prints an empty line)
            bar.stop()
    if progress is not None:
        bar.remove_task(rows[0])
    if not quiet:
        from fedrank.server import RunFiles

        console.print(_table(RunFiles(run_dir).read_metrics(), summary))
    return summary


def _progress(quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, disable=quiet)


TargetOption = Annotated[float, typer.Option(help="value of the task's headline metric (accuracy; perplexity for "
                                                "instruct) whose first round reaching it is reported")]
DiagnoseOption = Annotated[bool, typer.Option(help="add Byun & Lee's round-1 zeropad vs replication diagnostic")]
DiagnoseSetOption = Annotated[list[str], typer.Option(
    "--diagnose-set", help="override a key for the diagnostic only (e.g. train.local_epochs=1: a full local epoch "
                           "as in the paper); implies --diagnose")]
BaselineOption = Annotated[Optional[str], typer.Option(
    help="add paired per-seed differences of every method against this one (e.g. zeropad), with paired tests")]
HeadRefitOption = Annotated[int, typer.Option(
    help="refit only the head of each run's final model by a linear probe on this many training examples and "
         "report test accuracy before and after (0 = off)", min=0)]


@app.command()
def compare(
    config: Annotated[Optional[Path], typer.Argument(help="experiment TOML shared by every run")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated methods; METHOD@R runs every client at rank R")] = "",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0",
    set_: Annotated[list[str], typer.Option("--set", help="override a key for every run")] = [],
    out: Annotated[Path, typer.Option(help="comparison folder: runs/ inside, report.md beside")] = Path("runs/compare"),
    target: TargetOption = 0.8,
    diagnose: DiagnoseOption = False,
    diagnose_set: DiagnoseSetOption = [],
    baseline: BaselineOption = None,
    head_refit: HeadRefitOption = 0,
    jobs: Annotated[int, typer.Option(min=1, help="runs at a time, each in its own process; with threads=0 the "
                                                 "CPU cores are shared between them")] = 1,
) -> None:
    """Run several methods on the same partitions, ranks and seeds; finished runs are not redone."""
    from fedrank.compare import plan, run_parallel
    from fedrank.report import load_run

    with user_errors():
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got `{seeds}`") from None
        runs = plan(config, [m for m in methods.split(",") if m.strip()], seed_list, set_, out)
        with _progress(quiet=False) as bar:
            if jobs > 1:
                rounds = bar.add_task(f"{len(runs)} runs, {jobs} at a time: rounds",
                                      total=sum(r.cfg.rounds for r in runs))
                run_parallel(runs, jobs, lambda done: bar.update(rounds, completed=done))
            else:
                overall = bar.add_task("runs", total=len(runs), completed=sum(r.finished for r in runs))
                for run in runs:
                    if not run.finished:
                        run_with_progress(run.cfg, run.folder, progress=bar)
                        bar.advance(overall)
        records = [load_run(r.folder) for r in runs]
        path = _render(records, out, target, diagnose, diagnose_set, baseline, head_refit)
    console.print(f"report: {path}")


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run folders")],
    out: Annotated[Path, typer.Option(help="where report.md and the plots go")] = Path("runs/report"),
    target: TargetOption = 0.8,
    diagnose: DiagnoseOption = False,
    diagnose_set: DiagnoseSetOption = [],
    baseline: BaselineOption = None,
    head_refit: HeadRefitOption = 0,
) -> None:
    """Render report.md and plots from finished runs."""
    from fedrank.report import load_run

    with user_errors():
        records = [load_run(d) for d in run_dirs]
        path = _render(records, out, target, diagnose, diagnose_set, baseline, head_refit)
    console.print(f"report: {path}")


def _render(records: list[RunRecord], out: Path, target: float, diagnose: bool, diagnose_set: list[str],
            baseline: str | None = None, head_refit: int = 0) -> Path:
    """report.md and plots, with the paired differences, the head refit and the round-1 diagnostic appended
    when asked for."""
    from fedrank.report import headline_of, paired, paired_markdown, write_report

    appendix = paired_markdown(paired(records, baseline, target), baseline, target,
                               headline_of(records)) if baseline else ""
    if head_refit:
        appendix += _head_refit(records, out, head_refit)
    if diagnose or diagnose_set:
        appendix += _diagnostic(records, out, diagnose_set)
    return write_report(records, out, target, appendix=appendix)


def _head_refit(records: list[RunRecord], out: Path, examples: int) -> str:
    """Refit each run's head (progress on the console); save head_refit.json; return its markdown."""
    import json

    from fedrank.diagnose import head_refit, head_refit_markdown

    results = []
    with _progress(quiet=False) as bar:
        for record in bar.track(records, description="head refit"):
            results.append(head_refit(record.path, examples))
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_refit.json").write_text(json.dumps(results, indent=2))
    return head_refit_markdown(results, [r.label for r in records])


def _diagnostic(records: list[RunRecord], out: Path, overrides: list[str]) -> str:
    """Run the round-1 diagnostic on the shared config of the runs (plus ``overrides``); save diagnostic.json;
    return its markdown."""
    import json

    from fedrank.diagnose import markdown, padding_diagnostic

    base = next((r for r in records if "@" not in r.label), records[0])  # not a METHOD@R variant
    cfg = load_config(base.path / "config.toml", overrides) if overrides else base.cfg
    results = [{**r, "overrides": overrides} for r in padding_diagnostic(cfg)]
    (out / "diagnostic.json").write_text(json.dumps(results, indent=2))
    return markdown(results)


@app.command("eval")
def eval_adapter(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder (holds config.toml and adapter/)")],
) -> None:
    """Reload the exported PEFT adapter on a fresh base model and evaluate it on the run's test split."""
    with user_errors():
        from fedrank.export import evaluate_exported
        from fedrank.tasks import make_task

        if not (run_dir / "adapter" / "adapter_config.json").is_file():
            raise ConfigError(f"{run_dir} has no exported adapter: finish the run first (fedrank run --resume {run_dir})")
        cfg = load_config(run_dir / "config.toml")
        metrics = evaluate_exported(cfg, run_dir / "adapter")
    reported = "  ".join(f"{k} {metrics[k]:.4f}" for k in make_task(cfg).headline.reported)
    print(f"{reported}  ({metrics['examples']} test examples)")


@app.command("config")
def show_config() -> None:
    """List every config key with its default and meaning."""
    for key, default, help_text in describe():
        print(f"{key:<28} {default:<22} {help_text}")


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="fedrank")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

