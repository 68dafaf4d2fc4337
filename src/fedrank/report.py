"""Tables and plots from finished runs: ``report.md`` with the task's headline metric (accuracy; perplexity for
``instruct``), communication and time per method."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedrank.config import Config, ConfigError, load_config  # noqa: E402
from fedrank.headline import ACCURACY, Headline, of_summary  # noqa: E402

MB = 1e6
NAN = float("nan")


@dataclass
class RunRecord:
    """One finished run: its config, per-round metrics and summary."""

    path: Path
    cfg: Config
    rows: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        """The method, with the rank when every client has the same one (``fedit@5``) and the head rule when it
        is not FedAvg (``replication+tier``): the spec `fedrank compare --methods` takes; runs in another precision
        than fp32 are labelled apart (``flexlora bf16``), so a report over both pairs them instead of pooling them."""
        values = self.cfg.ranks.values
        label = self.cfg.method
        if self.cfg.ranks.policy == "fixed" and len(set(values)) == 1:
            label += f"@{values[0]}"
        if self.cfg.server.head != "fedavg":
            label += f"+{self.cfg.server.head}"
        precision = self.summary.get("precision", self.cfg.precision)  # as resolved where it ran (`auto`)
        if precision != "fp32":
            label += f" {precision}"
        return label


def load_run(path: Path) -> RunRecord:
    files = [path / "config.toml", path / "metrics.jsonl", path / "summary.json"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{path} is not a finished fedrank run (missing {', '.join(missing)}): "
                          f"finish it with `fedrank run --resume {path}`")
    return RunRecord(path, load_config(files[0]), _metric_rows(files[1]), json.loads(files[2].read_text()))


def _metric_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a last line cut by a crash is dropped, any other bad line is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ConfigError(f"{path} line {number} is not valid JSON: restore the file or rerun the run") from None
    return rows


def headline_of(runs: list[RunRecord]) -> Headline:
    """The headline metric every run reports; runs of tasks with different headlines are refused."""
    found = {of_summary(r.summary) for r in runs}
    if len(found) > 1:
        raise ConfigError(f"the runs report different metrics ({', '.join(sorted(h.key for h in found))}): "
                          "report each task's runs separately")
    return found.pop() if found else ACCURACY


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std of the values that exist (NaN when none does: a run written before its task had a
    headline)."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    if not present:
        return NAN, NAN
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def rounds_to(rows: list[dict[str, Any]], target: float, headline: Headline = ACCURACY) -> int | None:
    """The first evaluated round whose global headline metric reaches ``target`` (at least it for accuracy, at
    most it for perplexity)."""
    key = headline.key
    return next((r["round"] for r in rows if key in r and headline.reaches(r[key], target)), None)


def group(runs: list[RunRecord]) -> dict[str, list[RunRecord]]:
    out: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        out[run.label].append(run)
    return dict(out)


def table(runs: list[RunRecord], target: float) -> list[dict[str, Any]]:
    """One row per method label, mean ± std over seeds of the final and best headline metric."""
    h = headline_of(runs)
    rows = []
    for label, group_runs in group(runs).items():
        final = _mean_std([r.summary.get(f"final_{h.key}") for r in group_runs])
        best = _mean_std([r.summary.get(f"best_round_{h.key}") for r in group_runs])
        reached = [rounds_to(r.rows, target, h) for r in group_runs]
        hit = [x for x in reached if x is not None]
        rows.append({
            "method": label,
            "seeds": len(group_runs),
            "final": final,
            "best": best,
            "rounds_to_target": (statistics.fmean(hit) if hit else None, f"{len(hit)}/{len(reached)}"),
            "upload_mb": statistics.fmean(r.summary["upload_bytes"] / MB for r in group_runs),
            "download_mb": statistics.fmean(r.summary["download_bytes"] / MB for r in group_runs),
            "wall_s": statistics.fmean(r.summary["wall_s"] for r in group_runs),
        })
    return rows


def paired(runs: list[RunRecord], baseline: str, target: float) -> list[dict[str, Any]]:
    """Each method against ``baseline`` on the seeds both ran (same partitions and ranks per seed).

    ``final``: per-seed differences of the final headline metric (accuracy; perplexity for instruct), their
    mean and sample std, the paired t-test's two-sided p, the exact sign-flip permutation test's two-sided p
    (all 2^n sign patterns of the differences) and ``wins``, the seeds where the method is better.  ``late``: the
    same for the mean per-round metric over the evaluated rounds of the second half (less sensitive to where
    the last round happens to land).  ``rounds``: the same for rounds to ``target``, a run that never reaches
    it counted as ``rounds + 1``.
    """
    from scipy import stats

    h = headline_of(runs)
    groups = group(runs)
    if baseline not in groups:
        raise ConfigError(f"--baseline {baseline} is not among the runs' methods: use one of {', '.join(groups)}")
    base = {r.cfg.seed: r for r in groups[baseline]}

    def reached(run: RunRecord) -> int:
        return rounds_to(run.rows, target, h) or run.cfg.rounds + 1

    out = []
    for label, group_runs in groups.items():
        pairs = [(r, base[r.cfg.seed]) for r in group_runs if label != baseline and r.cfg.seed in base]
        if not pairs:
            continue
        row: dict[str, Any] = {"method": label, "seeds": [r.cfg.seed for r, _ in pairs]}
        for key, value, gain in (("final", lambda r: r.summary[f"final_{h.key}"], h.gain),
                                 ("late", lambda r: late_mean(r, h.key), h.gain), ("rounds", reached, lambda d: -d)):
            diffs = [value(r) - value(b) for r, b in pairs]
            row[key] = paired_stats(diffs, stats, gain)
        out.append(row)
    return out


def late_mean(run: RunRecord, key: str) -> float:
    """Mean per-round ``key`` over the evaluated rounds after the first half of the run."""
    return statistics.fmean(r[key] for r in run.rows if key in r and r["round"] > run.cfg.rounds / 2)


def paired_stats(diffs: list[float], stats: Any, gain: Callable[[float], float]) -> dict[str, Any]:
    """Mean, std, t-test and sign-flip p of ``diffs``; ``wins``: how many are better by ``gain`` (> 0)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    t_p = float(stats.ttest_1samp(diffs, 0.0).pvalue) if n > 1 and std > 0 else NAN
    signs = [[1 if (mask >> i) & 1 else -1 for i in range(n)] for mask in range(2**n)]
    extreme = sum(abs(sum(s * d for s, d in zip(sign, diffs))) >= abs(sum(diffs)) - 1e-12 for sign in signs)
    return {"diffs": diffs, "mean": mean, "std": std, "t_p": t_p, "perm_p": extreme / 2**n,
            "wins": sum(gain(d) > 0 for d in diffs)}


def paired_markdown(rows: list[dict[str, Any]], baseline: str, target: float, headline: Headline = ACCURACY) -> str:
    key, better = headline.key, "higher" if headline.higher_is_better else "lower"
    lines = [f"## Paired differences against {baseline}\n",
             f"Per seed, method minus {baseline} (same partitions, ranks and seeds). p: paired t-test / exact "
             f"sign-flip permutation test, two-sided. Rounds to {target:.2f}: a run that never reaches it counts "
             "as rounds + 1 (fewer is better).\n",
             f"| method | seeds | Δ final {key}, mean ± std | p (t / perm) | {better} on | per-seed Δ | "
             f"Δ late {key} (2nd-half rounds) | p (t / perm) | "
             f"Δ rounds to {target:.2f} | p (t / perm) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, late, k = r["final"], r["late"], r["rounds"]
        lines.append(
            f"| {r['method']} | {len(r['seeds'])} | {f['mean']:+.4f} ± {f['std']:.4f} | {f['t_p']:.3g} / "
            f"{f['perm_p']:.3g} | {f['wins']}/{len(r['seeds'])} | {', '.join(f'{d:+.3f}' for d in f['diffs'])} | "
            f"{late['mean']:+.4f} ± {late['std']:.4f} | {late['t_p']:.3g} / {late['perm_p']:.3g} | "
            f"{k['mean']:+.1f} ± {k['std']:.1f} | {k['t_p']:.3g} / {k['perm_p']:.3g} |")
    return "\n".join(lines) + "\n"


def _fmt(pair: tuple[float, float]) -> str:
    return "n/a" if math.isnan(pair[0]) else f"{pair[0]:.4f} ± {pair[1]:.4f}"


def markdown_table(rows: list[dict[str, Any]], target: float, key: str = ACCURACY.key) -> str:
    head = (f"| method | seeds | final {key} | best {key} | rounds to {target:.2f} (runs reaching it) | "
            "upload MB | download MB | wall s |\n|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        mean_rounds, share = r["rounds_to_target"]
        reach = f"{mean_rounds:.1f} ({share})" if mean_rounds is not None else f"— ({share})"
        body += (f"| {r['method']} | {r['seeds']} | {_fmt(r['final'])} | {_fmt(r['best'])} | {reach} | "
                 f"{r['upload_mb']:.2f} | {r['download_mb']:.2f} | {r['wall_s']:.0f} |\n")
    return head + body


def _series(group_runs: list[RunRecord], key: str) -> tuple[list[int], list[float]]:
    """Rounds where ``key`` was recorded (``eval.every`` may skip some) and its mean over the runs there."""
    rounds = sorted({row["round"] for r in group_runs for row in r.rows if row.get(key) is not None})
    return rounds, [_mean_at(group_runs, k, lambda row: row[key] if key in row else None) for k in rounds]


def _mean_at(group_runs: list[RunRecord], rnd: int, value: Any) -> float:
    return statistics.fmean(v for r in group_runs for row in r.rows if row["round"] == rnd
                            for v in [value(row)] if v is not None)


def _save(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_vs_round(runs: list[RunRecord], path: Path, key: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group_runs in group(runs).items():
        ax.plot(*_series(group_runs, key), marker="o", ms=3, label=label)
    ax.set(xlabel="round", ylabel=f"test {key} (mean over seeds)", title=f"Global model {key} per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, ax, path)


def plot_vs_mb(runs: list[RunRecord], path: Path, key: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group_runs in group(runs).items():
        rounds, values = _series(group_runs, key)
        mb = [_mean_at(group_runs, k, lambda row: (row["cum_upload_bytes"] + row["cum_download_bytes"]) / MB)
              for k in rounds]
        ax.plot(mb, values, marker="o", ms=3, label=label)
    ax.set(xlabel="cumulative MB communicated (up + down)", ylabel=f"test {key}",
           title=f"{key.capitalize()} against communication")
    ax.set_xscale("log")
    _save(fig, ax, path)


def plot_tiers(runs: list[RunRecord], path: Path, headline: Headline = ACCURACY) -> bool:
    """Final headline metric of the global model truncated to each rank tier; False when no run has tiers."""
    prefix = headline.tier_prefix
    bars = {label: {k: statistics.fmean(r.summary["final_tiers"].get(k, float("nan")) for r in g)
                    for k in g[0].summary.get("final_tiers", {})}
            for label, g in group(runs).items()}
    bars = {label: tiers for label, tiers in bars.items() if tiers}
    if not bars:
        return False
    tiers = sorted({k for t in bars.values() for k in t}, key=lambda k: int(k.removeprefix(prefix)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(tiers)
    for i, tier in enumerate(tiers):
        ax.bar([j + i * width for j in range(len(bars))], [t.get(tier, 0.0) for t in bars.values()], width,
               label=f"truncated to rank {tier.removeprefix(prefix)}")
    ax.set_xticks([j + width * (len(tiers) - 1) / 2 for j in range(len(bars))], list(bars), rotation=20)
    ax.set(ylabel=f"final test {headline.key}", title="Global model truncated to each rank tier")
    _save(fig, ax, path)
    return True


def plot_dynamics(runs: list[RunRecord], path: Path) -> bool:
    """Per round, mean over seeds: the norm of the top tier's part of the global update and the cosine between
    successive updates of the high slots (``eval.dynamics``); False when no run recorded them."""
    keys = sorted({k for r in runs for row in r.rows for k in row if k.startswith("tier_norm_r")},
                  key=lambda k: int(k.removeprefix("tier_norm_r")))
    if not keys:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, group_runs in group(runs).items():
        for key, style in zip(keys, ("--", "-")) if len(keys) == 2 else ((keys[-1], "-"),):
            rounds, values = _series(group_runs, key)
            if rounds:
                left.plot(rounds, values, style, label=f"{label} r{key.removeprefix('tier_norm_r')}")
        rounds, values = _series(group_runs, "high_update_cos")
        if rounds:
            right.plot(rounds, values, marker="o", ms=3, label=label)
    left.set(xlabel="round", ylabel="‖s·Σ_{j in tier} B_j A_j‖_F", title="Each tier's part of the global update")
    right.set(xlabel="round", ylabel="cosine", title="Successive updates of the high slots")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    _save(fig, right, path)
    return True


def write_report(runs: list[RunRecord], out: Path, target: float, title: str = "fedrank comparison",
                 notes: str = "", appendix: str = "") -> Path:
    """``out/report.md`` plus the PNG plots beside it (``<headline>_vs_round.png``, ``<headline>_vs_mb.png``,
    ``<headline>_by_tier.png``: ``accuracy_…`` for the label tasks, ``perplexity_…`` for instruct)."""
    if not runs:
        raise ConfigError("no finished runs to report on: pass run folders that hold summary.json")
    h = headline_of(runs)
    key = h.key
    out.mkdir(parents=True, exist_ok=True)
    plot_vs_round(runs, out / f"{key}_vs_round.png", key)
    plot_vs_mb(runs, out / f"{key}_vs_mb.png", key)
    has_tiers = plot_tiers(runs, out / f"{key}_by_tier.png", h)
    first = next((r for r in runs if "@" not in r.label), runs[0])  # the shared config, not a METHOD@R variant
    text = [f"# {title}\n", notes,
            f"Model `{first.cfg.model.name}`, data `{first.cfg.data.dataset}` ({first.cfg.data.partition} split), "
            f"{first.cfg.clients.count} clients, {first.cfg.clients.per_round} per round, {first.cfg.rounds} rounds, "
            f"rank policy `{first.cfg.ranks.policy}` {first.cfg.ranks.values}. Final {key} is on the whole test "
            f"split; best {key} is the best per-round evaluation (the seeded test subset of `eval.max_examples`).\n",
            markdown_table(table(runs, target), target, key),
            f"\n![{key} vs round]({key}_vs_round.png)\n\n![{key} vs MB]({key}_vs_mb.png)\n"]
    if has_tiers:
        text.append(f"\n![{key} by rank tier]({key}_by_tier.png)\n")
    if plot_dynamics(runs, out / "dynamics.png"):
        text.append("\n![update dynamics](dynamics.png)\n")
    text.append(appendix)
    path = out / "report.md"
    path.write_text("\n".join(t for t in text if t))
    return path
