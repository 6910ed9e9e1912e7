"""examples/spark_batch.py as a user runs it: Spark in local mode forecasts 1,200 series through the
forecasting pyfunc of the production version (grouped by series with applyInPandas), with no
project code on its path, and matches the pyfunc run in one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import register_model_dir
from tests.forecasting_support import assert_same_forecasts, long_histories

ROOT = Path(__file__).resolve().parents[2]
COVARIATES = ("temperature", "workday")
SERIES = 1_200

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java 17+ (`java` not on PATH)")


def test_spark_forecasts_1200_series_as_the_pyfunc_does(mlflow_store, tiny_model_dir, tmp_path):
    version = register_model_dir(mlflow_store, tiny_model_dir("lstm", covariates=COVARIATES), alias="production")
    lengths = np.random.default_rng(5).integers(8, 73, SERIES)  # 65 lengths: many batches per bucket
    histories = long_histories(lengths.tolist(), COVARIATES, seed=5)
    histories.to_parquet(tmp_path / "histories.parquet", coerce_timestamps="us")  # Spark reads up to us

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYSPARK_PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)  # no project code: the registry, the model's own code, pyspark
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "spark_batch.py"), "--model-uri", "models:/forecaster@production",
         "--input", "histories.parquet", "--output", "forecasts", "--master", "local[2]", "--buckets", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "wrote forecasts (series_id, origin, step, timestamp, point, q10, q50, q90)" in proc.stdout
    print(f"spark_batch.py: {SERIES} series, {len(histories)} rows, {seconds:.1f}s")

    got = pd.read_parquet(tmp_path / "forecasts")
    assert got["series_id"].nunique() == SERIES and len(got) == SERIES * 6
    uri = MlflowClient().get_model_version("forecaster", version).tags["forecasting_model_uri"]
    want = mlflow.pyfunc.load_model(uri).predict(histories)

    def ordered(frame: pd.DataFrame) -> pd.DataFrame:  # Spark's row order is its own
        return frame.sort_values(["series_id", "step"], kind="stable").reset_index(drop=True)

    assert_same_forecasts(ordered(got), ordered(want))
