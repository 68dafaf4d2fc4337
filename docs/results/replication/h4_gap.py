"""H4: does a change of budget, share or step size close replication's gap to zero padding?

Per seed, the gap is replication − zeropad (same partitions, ranks and seeds), on the final accuracy and on the
late accuracy (mean over the evaluated rounds of the second half). For each setting: the gap's paired tests, and
the change of the gap against the study's base setting, paired by seed. Run from the repository root:

    .venv/bin/python docs/results/replication/h4_gap.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

from scipy import stats

from fedrank.report import late_mean, load_run, paired_stats

HERE = Path(__file__).parent
SETTINGS = {"base (lr 1e-3, top 10%, 4 local steps)": "quality", "lr 5e-4": "h4_lr5e-4", "lr 2e-3": "h4_lr2e-3",
            "top 30% at rank 20": "h4_top30", "one local epoch": "h4_epoch"}
MEASURES = {"final": lambda run: run.summary["final_accuracy"], "late": lambda run: late_mean(run, "accuracy")}


def gaps(folder: str, measure: str) -> dict[int, tuple[float, float, float, float]]:
    """seed → (replication, zeropad, replication − zeropad) of ``measure`` and replication's final accuracy
    truncated to rank 5, for seeds with both runs finished."""
    runs = [load_run(p) for p in sorted((HERE / folder / "runs").iterdir()) if (p / "summary.json").is_file()]
    value = {(r.label, r.cfg.seed): MEASURES[measure](r) for r in runs}
    rank5 = {r.cfg.seed: r.summary["final_tiers"]["accuracy_r5"] for r in runs if r.label == "replication"}
    return {seed: (value[("replication", seed)], value[("zeropad", seed)],
                   value[("replication", seed)] - value[("zeropad", seed)], rank5[seed])
            for label, seed in value if label == "replication" and ("zeropad", seed) in value}


def describe(diffs: list[float]) -> str:
    s = paired_stats(diffs, stats, lambda d: d)
    return (f"{s['mean']:+.3f} ± {s['std']:.3f} (p {s['t_p']:.2g} / {s['perm_p']:.2g}; "
            f"{s['wins']}/{len(diffs)} positive)")


def main() -> None:
    for measure in MEASURES:
        base = gaps(SETTINGS[next(iter(SETTINGS))], measure)
        print(f"\n{measure} accuracy | seeds | replication | zeropad | gap replication − zeropad | "
              f"gap change vs base (same seeds) | replication's final model truncated to rank 5")
        for name, folder in SETTINGS.items():
            g = gaps(folder, measure) if (HERE / folder / "runs").is_dir() else {}
            seeds = sorted(g)
            if not seeds:
                print(f"{name} | not run")
                continue
            rep, zp = (statistics.fmean(g[s][i] for s in seeds) for i in (0, 1))
            change = describe([g[s][2] - base[s][2] for s in seeds]) if folder != "quality" else "—"
            print(f"{name} | {','.join(map(str, seeds))} | {rep:.3f} | {zp:.3f} | "
                  f"{describe([g[s][2] for s in seeds])} | {change} | {statistics.fmean(g[s][3] for s in seeds):.3f}")


if __name__ == "__main__":
    main()
