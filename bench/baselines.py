"""The baselines alone on the accuracy suite: MASE of naive, the seasonal naives and mstl_ets, and how long
the classical fit takes, per data set. No network is trained.

python -m bench.baselines [--sets bank_calls nox ...] [--results NAME]

Each set goes through `training.evaluate.backtest` with its suite config (bench/datasets.py) and the
seasonal periods `fit` would use; the "model" slot holds a seasonal naive, only so the backtest has a
forecaster to score. Writes bench/results/NAME.json (default: baselines).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from bench.common import print_table, write_results
from bench.datasets import DEFAULT_CACHE, SUITE, suite_config
from training.data import Series, load_dataset
from training.evaluate import backtest, classical_periods, seasonal_naive_forecast

QUANTILES = (0.1, 0.5, 0.9)
BASELINES = ("naive", "seasonal_naive", "weekly_seasonal_naive", "mstl_ets")


def seasonal_naive_model(season: int, horizon: int):
    """forecast_fn giving the seasonal naive at every step, all quantiles equal: [T, horizon, Q]."""

    def forecast(series: Series) -> np.ndarray:
        y = np.asarray(series.values, np.float64)
        fc = np.repeat(y[:, None], horizon, axis=1)  # [T, H]; naive before a season of history exists
        rows = np.arange(season - 1, len(y))
        fc[rows] = seasonal_naive_forecast(y, rows, horizon, season)
        return np.repeat(fc[..., None], len(QUANTILES), axis=2)

    return forecast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=list(SUITE), choices=list(SUITE))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="folder of the prepared CSVs")
    parser.add_argument("--results", default="baselines", help="results file name under bench/results/ (NAME.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import statsmodels.tsa.api  # noqa: F401  # import once up front, so no set's fit time includes it

    rows = []
    for name in args.sets:
        cfg = suite_config(name, args.cache)
        dataset = load_dataset(cfg.data)
        periods = classical_periods(dataset, cfg.eval.test_fraction)
        started = time.perf_counter()
        bt = backtest(
            dataset,
            seasonal_naive_model(cfg.eval.season, cfg.model.horizon),
            quantiles=QUANTILES,
            horizon=cfg.model.horizon,
            season=cfg.eval.season,
            test_fraction=cfg.eval.test_fraction,
            seasonal_periods=periods,
        )
        rows.append(
            {
                "set": name,
                "steps": sum(len(s) for s in dataset.series),
                "series": len(dataset.series),
                "periods": periods,
                "origins": sum(len(d.origins) for d in bt.details),
                **{b: bt.baselines[b]["mase"] if b in bt.baselines else None for b in BASELINES},
                "mstl_ets fit s": sum(f.seconds for f in bt.classical),
                "backtest s": time.perf_counter() - started,
                "methods": sorted({f.method for f in bt.classical}),
                "converged": all(f.converged for f in bt.classical),
            }
        )
        print(f"{name}: done in {rows[-1]['backtest s']:.1f}s", flush=True)
    print_table(
        rows,
        ["set", "steps", "series", "periods", "origins", *BASELINES, "mstl_ets fit s", "backtest s"],
        "Backtest MASE of the baselines on the accuracy suite",
    )
    print(f"wrote {write_results(args.results, {'sets': args.sets, 'rows': rows})}")


if __name__ == "__main__":
    main()
