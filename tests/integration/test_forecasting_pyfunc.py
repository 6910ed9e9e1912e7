"""The forecasting pyfunc logged beside each registered version, through a real sqlite MLflow store:
the server's Forecast RPC answers, and bad input refused with messages that name the series."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.conftest import register_model_dir
from tests.forecasting_support import assert_same_forecasts, long_histories, rpc_forecasts
from tests.serving_support import RunningServer, server_config

COVARIATES = ("temperature", "workday")


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    """A store with one production version of a covariate model: (tracking URI, version)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)  # the sqlite store's default artifact root is ./mlruns
        version = register_model_dir(uri, tiny_model_dir("lstm", covariates=COVARIATES), alias="production")
        yield uri, MlflowClient().get_model_version("forecaster", version)
    mlflow.set_tracking_uri(None)


def test_pyfunc_forecasts_equal_the_forecast_rpc(registry):
    tracking_uri, version = registry
    uri = version.tags["forecasting_model_uri"]
    assert uri == f"runs:/{version.run_id}/forecasting"  # logged in the registered version's own run
    model = mlflow.pyfunc.load_model(uri)
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["series_id", "timestamp", "demand", *COVARIATES]
    assert sig.outputs.input_names() == ["series_id", "origin", "step", "timestamp", "point", "q10", "q50", "q90"]

    # Seven series, four lengths (one of a single step), rows shuffled across series and time.
    histories = long_histories([1, 24, 24, 60, 60, 60, 130], COVARIATES, seed=4)
    got = model.predict(histories)
    with RunningServer(server_config("models:/forecaster@production", tracking_uri=tracking_uri)) as server:
        want = rpc_forecasts(server.target, histories, "demand", COVARIATES)
    assert_same_forecasts(got, want)

    horizon = 6
    first = histories["series_id"].drop_duplicates().tolist()
    assert got["series_id"].tolist() == [sid for sid in first for _ in range(horizon)]
    last = histories.groupby("series_id")["timestamp"].max()
    origin = got.groupby("series_id")["origin"].first()
    assert (origin == last[origin.index]).all()
    steps = got["timestamp"] - got["origin"]
    assert (steps == pd.to_timedelta(got["step"] * 30, unit="min")).all()
    np.testing.assert_array_equal(got["point"], got["q50"])  # the metadata's point_quantile
    assert (got["q10"] <= got["q50"]).all() and (got["q50"] <= got["q90"]).all()

    # One series alone gets the forecast it gets among the others.
    alone = model.predict(histories[histories["series_id"] == "series-3"])
    assert_same_forecasts(alone, got[got["series_id"] == "series-3"].reset_index(drop=True))


def test_bad_input_is_refused_with_what_and_where(registry):
    _, version = registry
    model = mlflow.pyfunc.load_model(version.tags["forecasting_model_uri"])
    good = long_histories([5, 8], COVARIATES, seed=1)
    in_b = good.index[good["series_id"] == "series-1"]

    def with_value(col: str, value) -> pd.DataFrame:
        bad = good.copy()
        bad[col] = bad[col].astype(object if isinstance(value, str) else bad[col].dtype)
        bad.loc[in_b[2], col] = value
        return bad

    duplicate = pd.concat([good, good.loc[in_b[:1]]], ignore_index=True)
    cases = [
        (good.drop(columns="workday"), "missing inputs ['workday']"),  # MLflow's signature check
        (good.iloc[:0], "no rows"),
        (with_value("demand", np.nan), "series 'series-1', row"),
        (with_value("demand", np.inf), "'demand' is inf; values must be finite"),
        (with_value("temperature", np.nan), "'temperature' is missing"),
        (with_value("timestamp", pd.NaT), "series 'series-1', row"),
        (duplicate, "series 'series-1': two rows have the timestamp"),
        (with_value("series_id", ""), "series id (column 'series_id') is missing or empty"),
    ]
    for frame, message in cases:
        with pytest.raises(MlflowException) as err:
            model.predict(frame)
        assert message in err.value.message, (message, err.value.message)
    # Epoch milliseconds are not datetimes: MLflow's type check says so before the model runs.
    epoch = good.assign(timestamp=good["timestamp"].to_numpy().astype("datetime64[ms]").astype(np.int64))
    with pytest.raises(MlflowException, match="timestamp"):
        model.predict(epoch)
    # The order of rows does not matter; each series is sorted by time.
    np.testing.assert_array_equal(
        model.predict(good.sort_values("timestamp"))["point"], model.predict(good.iloc[::-1])["point"]
    )
