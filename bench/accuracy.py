"""Accuracy on elecdemand: backtest MASE of the default model over seeds, against baselines.

python -m bench.accuracy [--seeds 0 1 2] [--config configs/elecdemand.yaml] [--set k=v ...]
                         [--variants ...] [--results NAME]

Runs the default config from demand and calendar alone, and again with temperature and workday
as covariates; the same rolling-origin backtest as `fit` (test_fraction 0.2, one origin a day,
horizon 48). No MLflow: this measures the model, not the bookkeeping. Writes
bench/results/NAME.json (default: accuracy). The five-member ensemble config:

    python -m bench.accuracy --config configs/elecdemand-ensemble.yaml --variants demand+calendar \
        --results accuracy-ensemble      # 25-35 minutes on 2 cores
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/elecdemand.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--results", default="accuracy", help="results file name under bench/results/ (NAME.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows, runs, baselines = [], [], {}
    for variant in args.variants:
        scores, times = [], []
        for seed in args.seeds:
            cfg = load_config(args.config, [*args.overrides, *VARIANTS[variant], f"train.seed={seed}"])
            dataset, parts, model_cfg = prepare(cfg)
            started = time.perf_counter()
            model, result = train_forecaster(model_cfg, parts, cfg.train, progress=False)
            seconds = time.perf_counter() - started
            bt = run_backtest(model, dataset, cfg)
            scores.append(bt.metrics["mase"])
            times.append(seconds)
            baselines = bt.baselines
            runs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "train_seconds": seconds,
                    "epochs": result.epochs,
                    **bt.metrics,
                }
            )
            print(
                f"{variant} seed {seed}: MASE {bt.metrics['mase']:.4f} coverage {bt.metrics['coverage']:.3f} ({seconds:.0f}s, {result.epochs} epochs)",
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
    path = write_results(
        args.results,
        {
            "config": args.config,
            "overrides": args.overrides,
            "seeds": args.seeds,
            "rows": rows,
            "runs": runs,
            "baselines": baselines,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
