"""The forecasting pyfunc as MLServer 1.7's MLflow runtime can answer it.

MLServer's pandas codec maps each output column's dtype to a V2 datatype and has none for
datetime columns (``KeyError: 'M'``) or pandas 3's string dtype (``KeyError: 'O'``), so
``mlserver_mlflow`` fails every request on the forecasting pyfunc's output (series_id, origin and
timestamp). A user of MLServer would wrap the model as this does: the same forecast, with those
columns as ISO strings (object dtype, which the codec sends as BYTES). bench/peers.py copies this
file into a copy of the registered version's pyfunc as its loader module, beside
``forecasting_pyfunc``; it imports nothing of this project.
"""

from __future__ import annotations

from typing import Any

import forecasting_pyfunc  # the registered pyfunc's own code, on sys.path beside this file
import pandas as pd


class StringColumns:
    def __init__(self, inner: forecasting_pyfunc.SequenceForecaster) -> None:
        self.inner = inner

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        out = self.inner.predict(model_input, params)
        for name in out.columns:
            if out[name].dtype.kind not in "biuf":  # datetimes and strings -> object of str
                out[name] = out[name].astype(str).astype(object)
        return out


def _load_pyfunc(data_path: str) -> StringColumns:
    return StringColumns(forecasting_pyfunc._load_pyfunc(data_path))
