"""Accuracy: backtest MASE of the model against every baseline, on elecdemand and on the suite.

python -m bench.accuracy [--seeds 0 1 2] [--config configs/elecdemand.yaml] [--set k=v ...]
                         [--variants ...] [--results NAME]
python -m bench.accuracy --suite [SET ...] [--seeds 0] [--set k=v ...] [--results NAME]
python -m bench.accuracy --darts [--seeds 0] [--darts-minutes M] [--results NAME]

Without --suite: the elecdemand config (default configs/elecdemand.yaml) from demand and calendar
alone, and again with temperature and workday as covariates; the same rolling-origin backtest as
`fit` (test_fraction 0.2, one origin a day, horizon 48).

With --suite: the built-in defaults on every data set of bench/datasets.py (or the ones named),
each given only its data keys, horizon, season and test share, as a new user would: the model's
MASE against every baseline (naive, seasonal naives, the classical mstl_ets), the band's coverage,
the training time and why training stopped. The target: below the best baseline on every set.

With --darts: the default config's model (demand and calendar) against Darts' BlockRNNModel and
RNNModel (an LSTM of the same size, quantile regression on the same quantiles; bench/darts_runner.py)
trained on the same split of elecdemand in Darts' own environment (bench/peers_env.py, never this
project's), their forecasts at the same origins scored here by training/evaluate.py's backtest.
Training time per epoch for each. Target: this project's MASE at least 5% below the better Darts row.

No MLflow: this measures the model, not the bookkeeping. Writes bench/results/NAME.json (default:
accuracy, or accuracy-suite).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import print_table, write_results
from training.config import load_config
from training.evaluate import BacktestResult, backtest, point_index
from training.pipeline import prepare, run_backtest
from training.train import describe_blend, train_forecaster

VARIANTS = {"demand+calendar": [], "+temperature+workday": ["data.covariate_cols=[Temperature, WorkDay]"]}
TARGET_MASE = 0.60
DARTS_MODELS = {
    "block": "Darts BlockRNNModel (LSTM 2x64, quantile regression)",
    "rnn": "Darts RNNModel (LSTM 2x64, quantile regression)",
}
FORECAST_CHART = Path(__file__).resolve().parents[1] / "docs" / "img" / "forecast-week.png"
DARTS_MARGIN = 0.05  # the project's MASE must be at least 5% below the better Darts row


def train_and_score(cfg) -> tuple[dict, dict, BacktestResult]:
    """Train cfg's model as `fit` would and backtest it: (run record, baselines' metrics, the backtest)."""
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
        "blend": describe_blend(model.config),
        **bt.metrics,
    }
    return run, bt.baselines, bt


def forecast_week_chart(bt: BacktestResult, path: Path, days: int = 7) -> Path:
    """PNG: a week of the test region, day-ahead forecasts (one origin a day, at the last step of the
    day before) against the actuals, median and outer quantile band; the first week that starts on
    a Monday. One series (the first)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = bt.details[0]
    times = d.timestamps_ms.astype("datetime64[ms]")
    first_day = times[d.origins + 1].astype("datetime64[D]")  # [N] the day each forecast starts
    weekday = (first_day.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday: Monday -> 0
    start = int(np.flatnonzero(weekday == 0)[0]) if (weekday == 0).any() else 0
    pick = slice(start, min(start + days, len(d.origins)))
    h = bt.horizon
    steps = (d.origins[pick, None] + 1 + np.arange(h)).reshape(-1)  # [days * H] consecutive when H is a day
    fc = d.forecast[pick].reshape(-1, len(bt.quantiles))  # [days * H, Q]
    actual = d.actual[pick].reshape(-1)
    mid = point_index(bt.quantiles)
    inside = float(np.mean((actual >= fc[:, 0]) & (actual <= fc[:, -1])))
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    t = times[steps]
    ax.fill_between(t, fc[:, 0], fc[:, -1], color="tab:blue", alpha=0.25,
                    label=f"q{bt.quantiles[0]:g}..q{bt.quantiles[-1]:g} band")  # fmt: skip
    ax.plot(t, fc[:, mid], color="tab:blue", label=f"forecast (q{bt.quantiles[mid]:g})")
    ax.plot(t, actual, color="black", linewidth=1, label="actual")
    for o in d.origins[pick]:
        ax.axvline(times[o], color="0.8", linewidth=0.8)
    ax.set_ylabel(bt.target)
    ax.set_xlabel("time (UTC); grey lines: forecast origins, one a day, each forecasting the next 48 half-hours")
    week = np.datetime_as_string(t[0], unit="D")
    ax.set_title(f"Day-ahead forecasts for the week of {week} (test region): {inside:.0%} of actuals inside the band\n"
                 f"whole backtest MASE {bt.metrics['mase']:.3f}, coverage {bt.metrics['coverage']:.0%}")  # fmt: skip
    ax.legend(loc="upper right", fontsize="small")
    ax.grid(True, alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def elecdemand(args: argparse.Namespace) -> None:
    rows, runs, baselines = [], [], {}
    for variant in args.variants:
        scores, times = [], []
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.overrides, *VARIANTS[variant], f"train.seed={seed}"])
            run, baselines, _ = train_and_score(cfg)
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
            run, baselines, _ = train_and_score(build_config(raw))
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


def run_darts(python: Path, kind: str, cfg, dataset, work: Path, minutes: float) -> dict:
    """Train and forecast one Darts model in the Darts environment; score it with this project's backtest."""
    (s,) = dataset.series  # elecdemand is one series
    data = work / f"darts-{kind}-{cfg.train.seed}.npz"
    out = data.with_suffix(".out.npz")
    np.savez(data, values=s.values, timestamps_ms=s.timestamps_ms, freq=cfg.data.freq, seed=cfg.train.seed,
             quantiles=np.asarray(cfg.model.quantiles), horizon=cfg.model.horizon, season=cfg.eval.season,
             test_fraction=cfg.eval.test_fraction, val_fraction=cfg.train.val_fraction, patience=cfg.train.patience,
             hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers, batch_size=cfg.train.batch_size,
             max_epochs=cfg.train.max_epochs, lr=cfg.train.lr, window=cfg.train.window, stride=cfg.train.stride,
             holidays=np.asarray([str(h) for h in cfg.model.holidays]), minutes=minutes,
             threads=cfg.train.threads or os.cpu_count() or 1)  # fmt: skip
    # The child imports training.evaluate from this checkout for the origins (numpy and statsmodels only).
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [str(python), "-m", "bench.darts_runner", "--model", kind, "--data", str(data), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env)
    r = np.load(out)
    origins, forecast = r["origins"], r["forecast"]

    def forecast_fn(series):  # [T, horizon, Q]: Darts' forecasts at the backtest's origins, nothing elsewhere
        full = np.zeros((len(series.values), cfg.model.horizon, len(cfg.model.quantiles)))
        full[origins] = forecast
        return full

    bt = backtest(dataset, forecast_fn, quantiles=cfg.model.quantiles, horizon=cfg.model.horizon,
                  season=cfg.eval.season, test_fraction=cfg.eval.test_fraction, classical=False)  # fmt: skip
    epochs = int(r["epochs"])
    return {"model": kind, "seed": cfg.train.seed, "train_seconds": float(r["train_seconds"]), "epochs": epochs,
            "seconds_per_epoch": float(np.mean(r["epoch_seconds"])) if epochs else math.nan,
            "predict_seconds": float(r["predict_seconds"]), "stop_reason": str(r["stop_reason"]), **bt.metrics}  # fmt: skip


def darts_comparison(args: argparse.Namespace) -> None:
    from bench import peers_env

    python = peers_env.darts_python()
    runs = []
    with tempfile.TemporaryDirectory(prefix="darts-") as tmp:
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.overrides, f"train.seed={seed}"])
            ours, baselines, bt = train_and_score(cfg)
            if seed == args.seeds[0]:
                print(f"wrote {forecast_week_chart(bt, FORECAST_CHART)}")
            epochs = ours["epochs"]
            runs.append({"model": "this project", **ours, "seconds_per_epoch": ours["train_seconds"] / max(1, epochs)})
            print(f"this project seed {seed}: MASE {ours['mase']:.4f} ({ours['train_seconds']:.0f}s)", flush=True)
            dataset, _, _, cfg = prepare(cfg)
            for kind in DARTS_MODELS:
                run = run_darts(python, kind, cfg, dataset, Path(tmp), args.darts_minutes)
                runs.append(run)
                print(f"{DARTS_MODELS[kind]} seed {seed}: MASE {run['mase']:.4f} coverage {run['coverage']:.3f} "
                      f"({run['train_seconds']:.0f}s, {run['epochs']} epochs of {run['seconds_per_epoch']:.1f}s, "
                      f"stopped by {run['stop_reason']})", flush=True)  # fmt: skip
    rows = []
    for model, label in {"this project": "LSTM 2x64, this project (configs/elecdemand.yaml)", **DARTS_MODELS}.items():
        mine = [r for r in runs if r["model"] == model]
        rows.append({
            "forecaster": label,
            "MASE per seed": ", ".join(f"{r['mase']:.3f}" for r in mine),
            "MASE mean": statistics.mean(r["mase"] for r in mine),
            "coverage": statistics.mean(r["coverage"] for r in mine),
            "train s": statistics.mean(r["train_seconds"] for r in mine),
            "epochs": statistics.mean(r["epochs"] for r in mine),
            "s per epoch": statistics.mean(r["seconds_per_epoch"] for r in mine),
            "stopped by": ", ".join(r["stop_reason"] for r in mine),
        })  # fmt: skip
    for name, metrics in baselines.items():
        rows.append({"forecaster": name, "MASE mean": metrics["mase"]})
    better = min(rows[1]["MASE mean"], rows[2]["MASE mean"])
    ratio = rows[0]["MASE mean"] / better
    columns = ["forecaster", "MASE per seed", "MASE mean", "coverage", "train s", "epochs", "s per epoch", "stopped by"]
    print_table(
        rows, columns, f"elecdemand backtest, this project against Darts (budget {args.darts_minutes} min per model)"
    )
    verdict = "met" if ratio <= 1 - DARTS_MARGIN else "MISSED"
    print(f"target: MASE at least {DARTS_MARGIN:.0%} below the better Darts row: x{ratio:.3f} of it, {verdict}")
    payload = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "rows": rows, "runs": runs,
               "baselines": baselines, "ratio_to_better_darts": ratio, "darts_minutes": args.darts_minutes}  # fmt: skip
    print(f"wrote {write_results(args.results or 'accuracy-darts', payload)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/elecdemand.yaml")
    parser.add_argument("--suite", nargs="*", default=None, metavar="SET", help="run the suite (all sets, or these)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--results", default=None, help="results file name under bench/results/ (NAME.json)")
    parser.add_argument("--darts", action="store_true", help="this project's model against Darts' RNN models")
    parser.add_argument(
        "--darts-minutes", type=float, default=5.0, help="training budget per Darts model (train.max_minutes' default)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.darts:
        args.seeds = args.seeds or [0]
        darts_comparison(args)
    elif args.suite is not None:
        args.seeds = args.seeds or [0]
        suite(args)
    else:
        args.seeds = args.seeds or [0, 1, 2]
        elecdemand(args)


if __name__ == "__main__":
    main()
