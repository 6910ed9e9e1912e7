"""Accuracy: backtest MASE of the model against every baseline, on elecdemand and on the suite.

python -m bench.accuracy [--seeds 0 1 2] [--config configs/elecdemand.yaml] [--set k=v ...]
                         [--variants ...] [--results NAME]
python -m bench.accuracy --suite [SET ...] [--seeds 0] [--set k=v ...] [--results NAME]

Without --suite: the elecdemand config (default configs/elecdemand.yaml) from demand and calendar
alone, and again with temperature and workday as covariates; the same rolling-origin backtest as
`fit` (test_fraction 0.2, one origin a day, horizon 48).

With --suite: the built-in defaults on every data set of bench/datasets.py (or the ones named),
each given only its data keys, horizon, season and test share, as a new user would: the model's
MASE against every baseline (naive, seasonal naives, the classical mstl_ets), the band's coverage,
the training time and why training stopped. The target: below the best baseline on every set.

No MLflow: this measures the model, not the bookkeeping. Writes bench/results/NAME.json (default:
accuracy, or accuracy-suite).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from bench.common import print_table, write_results
from training.config import load_config
from training.pipeline import prepare, run_backtest
from training.train import train_forecaster

VARIANTS = {"demand+calendar": [], "+temperature+workday": ["data.covariate_cols=[Temperature, WorkDay]"]}
TARGET_MASE = 0.60


def train_and_score(cfg) -> tuple[dict, dict]:
    """Train cfg's model as `fit` would and backtest it: (run record, baselines' metrics)."""
    dataset, parts, model_cfg, cfg = prepare(cfg)
    started = time.perf_counter()
    model, result = train_forecaster(model_cfg, parts, cfg.train, progress=False)
    seconds = time.perf_counter() - started
    bt = run_backtest(model, dataset, cfg)
    run = {
        "seed": cfg.train.seed,
        "train_seconds": seconds,
        "epochs": result.epochs,
        "stop_reason": result.stop_reason,
        "lags": list(model_cfg.lags or ()),
        "window": cfg.train.window,
        **bt.metrics,
    }
    return run, bt.baselines


def elecdemand(args: argparse.Namespace) -> None:
    rows, runs, baselines = [], [], {}
    for variant in args.variants:
        scores, times = [], []
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.overrides, *VARIANTS[variant], f"train.seed={seed}"])
            run, baselines = train_and_score(cfg)
            scores.append(run["mase"])
            times.append(run["train_seconds"])
            runs.append({"variant": variant, **run})
            print(
                f"{variant} seed {seed}: MASE {run['mase']:.4f} coverage {run['coverage']:.3f} "
                f"({run['train_seconds']:.0f}s, {run['epochs']} epochs, stopped by {run['stop_reason']})",
                flush=True,
            )
        rows.append(
            {
                "forecaster": f"LSTM {variant}",
                "MASE mean": statistics.mean(scores),
                "MASE sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                "train s (mean)": statistics.mean(times),
            }
        )
    for name, metrics in baselines.items():
        rows.append({"forecaster": name, "MASE mean": metrics["mase"], "MASE sd": 0.0})
    print_table(
        rows,
        ["forecaster", "MASE mean", "MASE sd", "train s (mean)"],
        f"elecdemand backtest (target MASE <= {TARGET_MASE})",
    )
    payload = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "rows": rows, "runs": runs}
    print(f"wrote {write_results(args.results or 'accuracy', {**payload, 'baselines': baselines})}")


def suite(args: argparse.Namespace) -> None:
    from bench.datasets import DEFAULT_CACHE, SUITE
    from training.config import apply_override, build_config

    names = args.suite or list(SUITE)
    unknown = sorted(set(names) - set(SUITE))
    if unknown:
        raise SystemExit(f"unknown suite set(s) {unknown}; the suite has: {', '.join(SUITE)}")
    rows, runs = [], []
    for name in names:
        given = SUITE[name](DEFAULT_CACHE)  # what a new user writes; prepares the CSV on first use
        for seed in args.seeds:
            path = f"suite:{name}"
            raw = {section: dict(values) for section, values in given.items()}
            for assignment in [*args.overrides, f"train.seed={seed}"]:
                apply_override(raw, assignment)
            run, baselines = train_and_score(build_config(raw))
            best = min(baselines, key=lambda k: baselines[k]["mase"])
            run = {"set": name, "config": path, **run, "baselines": baselines, "best_baseline": best}
            runs.append(run)
            ratio = run["mase"] / baselines[best]["mase"]
            print(
                f"{name} seed {seed}: MASE {run['mase']:.4f} vs best baseline {best} {baselines[best]['mase']:.4f} "
                f"(x{ratio:.3f}) coverage {run['coverage']:.3f} ({run['train_seconds']:.0f}s, {run['epochs']} epochs, "
                f"stopped by {run['stop_reason']}, lags {run['lags']}, window {run['window']})",
                flush=True,
            )
        mine = [r for r in runs if r["set"] == name]
        rows.append(
            {
                "set": name,
                "model MASE": statistics.mean(r["mase"] for r in mine),
                "best baseline": mine[0]["best_baseline"],
                "its MASE": mine[0]["baselines"][mine[0]["best_baseline"]]["mase"],
                **{b: m["mase"] for b, m in mine[0]["baselines"].items()},
                "coverage": statistics.mean(r["coverage"] for r in mine),
                "train s": statistics.mean(r["train_seconds"] for r in mine),
            }
        )
        rows[-1]["ratio"] = rows[-1]["model MASE"] / rows[-1]["its MASE"]
    columns = ["set", "model MASE", "ratio", "best baseline", "its MASE", "naive", "seasonal_naive"]
    columns += ["weekly_seasonal_naive", "mstl_ets", "coverage", "train s"]
    print_table(rows, columns, "accuracy suite, built-in defaults (target: ratio < 1 on every set)")
    payload = {"suite": names, "overrides": args.overrides, "seeds": args.seeds, "rows": rows, "runs": runs}
    print(f"wrote {write_results(args.results or 'accuracy-suite', payload)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/elecdemand.yaml")
    parser.add_argument("--suite", nargs="*", default=None, metavar="SET", help="run the suite (all sets, or these)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--results", default=None, help="results file name under bench/results/ (NAME.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.suite is not None:
        args.seeds = args.seeds or [0]
        suite(args)
    else:
        args.seeds = args.seeds or [0, 1, 2]
        elecdemand(args)


if __name__ == "__main__":
    main()
