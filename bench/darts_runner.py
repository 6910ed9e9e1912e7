"""One Darts model trained and forecast on elecdemand; runs in the Darts environment (bench/peers_env.py).

    python -m bench.darts_runner --model block|rnn --data IN.npz --out OUT.npz   (PYTHONPATH = the repo)

bench/accuracy.py --darts writes IN.npz (the series, the training split and the settings of this
project's config) and scores OUT.npz with this project's backtest (training/evaluate.py), so the
protocol and the metric code are the project's own. The forecast origins come from
training.evaluate here too (imported from the repo: numpy and statsmodels only, no torch pin).

The model as a Darts user would set it up for this task: an LSTM of the project's size (2 layers
of 64), quantile regression on the same quantiles, a week of input (336 steps), the calendar the
project's graphs compute (time of day, weekday, the config's holidays) as covariates, values
standardised on the training part, trained on the same training part with the last
``val_fraction`` held out for early stopping (patience as configured, the best epoch's weights
kept), window stride as configured, and a wall-time budget like the project's ``train.max_minutes``.
- ``block``: BlockRNNModel, encoder over the input window, all 48 steps out at once (the calendar as
  past covariates, which is what it takes); quantiles read directly from the likelihood.
- ``rnn``: RNNModel, DeepAR-like, one step at a time, trained on windows of ``train.window``; the
  calendar as future covariates; forecasts sampled (autoregressive), quantiles of the samples.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from darts import TimeSeries
from darts.models import BlockRNNModel, RNNModel
from darts.utils.likelihood_models import QuantileRegression
from pytorch_lightning.callbacks import Callback, EarlyStopping

from training.evaluate import backtest_origins, holdout_start

INPUT = 336  # a week of half-hours, the longest lag the project's model keeps
SAMPLES = 200  # RNNModel: sampled paths per origin


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seconds.append(time.perf_counter() - self._t)


# Module-level (and partial) functions: Darts pickles the model, encoders included, for its checkpoints.
def tod_sin(idx):
    return np.sin(2 * np.pi * (idx.hour * 60 + idx.minute) / 1440)


def tod_cos(idx):
    return np.cos(2 * np.pi * (idx.hour * 60 + idx.minute) / 1440)


def holiday(idx, days: tuple[str, ...] = (), ahead: int = 0):
    return (idx.normalize() + pd.Timedelta(days=ahead)).isin(pd.to_datetime(list(days))).astype(np.float32)


def calendar(holidays: list[str]) -> dict:
    """Darts encoders: the calendar the project's graphs compute from timestamps (time of day,
    weekday, holiday today and tomorrow)."""
    days = tuple(holidays)
    return {
        "cyclic": ["dayofweek"],
        "custom": [tod_sin, tod_cos, partial(holiday, days=days), partial(holiday, days=days, ahead=1)],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["block", "rnn"], required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    d = np.load(args.data, allow_pickle=False)
    s = {k: d[k].item() if d[k].ndim == 0 else d[k] for k in d.files}
    torch.manual_seed(int(s["seed"]))
    torch.set_num_threads(int(s["threads"]))
    quantiles = [float(q) for q in s["quantiles"]]
    horizon, season, test_fraction = int(s["horizon"]), int(s["season"]), float(s["test_fraction"])
    values = s["values"].astype(np.float64)  # the whole series [T]
    times = pd.DatetimeIndex(s["timestamps_ms"].astype("datetime64[ms]"))
    n = len(values)
    cut = holdout_start(n, test_fraction)  # the project's split: the test region is never trained on
    mean, std = float(values[:cut].mean()), float(values[:cut].std())
    series = TimeSeries.from_times_and_values(times, ((values - mean) / std).astype(np.float32), freq=s["freq"])
    train_part = series[:cut]
    val_start = cut - math.ceil(float(s["val_fraction"]) * cut)
    train, val = train_part[:val_start], train_part[val_start - INPUT - horizon :]

    timer = EpochTimer()
    trainer = {
        "accelerator": "cpu",
        "callbacks": [EarlyStopping(monitor="val_loss", patience=int(s["patience"]), mode="min"), timer],
        "max_time": {"minutes": float(s["minutes"])},
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
    }
    work = tempfile.mkdtemp(prefix="darts-")
    common = dict(
        model="LSTM",
        hidden_dim=int(s["hidden_size"]),
        n_rnn_layers=int(s["num_layers"]),
        likelihood=QuantileRegression(quantiles),
        batch_size=int(s["batch_size"]),
        n_epochs=int(s["max_epochs"]),
        optimizer_kwargs={"lr": float(s["lr"])},
        random_state=int(s["seed"]),
        pl_trainer_kwargs=trainer,
        save_checkpoints=True,
        work_dir=work,
        model_name=args.model,
        force_reset=True,
    )
    encoders = calendar([str(h) for h in s["holidays"]])
    if args.model == "block":
        cls = BlockRNNModel
        model = cls(
            input_chunk_length=INPUT,
            output_chunk_length=horizon,
            add_encoders={k: {"past": v} for k, v in encoders.items()},
            **common,
        )
    else:
        cls = RNNModel
        model = cls(
            input_chunk_length=INPUT,
            training_length=int(s["window"]),
            add_encoders={k: {"future": v} for k, v in encoders.items()},
            **common,
        )
    started = time.perf_counter()
    model.fit(train, val_series=val, stride=int(s["stride"]), verbose=False)
    seconds = time.perf_counter() - started
    epochs = len(timer.seconds)
    stop = (
        "budget"
        if seconds >= 60 * float(s["minutes"]) * 0.98
        else ("max_epochs" if epochs >= int(s["max_epochs"]) else "patience")
    )
    # The best validation epoch's weights; trusted: the checkpoint is this process' own, just written
    # (Darts' safe loader refuses the calendar functions above, which it cannot know).
    model = cls.load_from_checkpoint(args.model, work_dir=work, best=True, trusted=True)

    origins = backtest_origins(n, test_fraction, season, horizon)  # the project's rolling origins
    histories = [series[: int(o) + 1] for o in origins]
    started = time.perf_counter()
    if args.model == "block":
        preds = model.predict(n=horizon, series=histories, predict_likelihood_parameters=True, verbose=False)
        fc = np.stack([p.values() for p in preds])  # [N, horizon, Q] in quantile order
    else:
        preds = model.predict(n=horizon, series=histories, num_samples=SAMPLES, verbose=False)
        fc = np.stack([np.quantile(p.all_values()[:, 0, :], quantiles, axis=-1).T for p in preds])  # [N, horizon, Q]
    predict_seconds = time.perf_counter() - started
    np.savez(
        args.out,
        origins=origins,
        forecast=fc * std + mean,  # back to raw units; an affine map keeps quantiles quantiles
        epochs=epochs,
        train_seconds=seconds,
        epoch_seconds=np.asarray(timer.seconds),
        predict_seconds=predict_seconds,
        stop_reason=stop,
    )


if __name__ == "__main__":
    main()
