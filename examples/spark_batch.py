"""Forecast many series at once on Spark with a registered version's forecasting pyfunc.

No project code: MLflow, pyspark and pandas, and the model's own code from the registry.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python examples/spark_batch.py \
        --model-uri models:/forecaster@production --input histories.parquet --output forecasts

--model-uri takes a registered version (its tag ``forecasting_model_uri`` names the pyfunc logged
beside it) or the pyfunc's own URI (``runs:/RUN_ID/forecasting``). --input is Parquet or CSV in
long format, one row per series and step, with the columns the pyfunc's signature lists (the
training config's names); timestamps are UTC. --output is a Parquet directory of forecasts:
series_id, origin, step, timestamp, point and one column per quantile.

The pyfunc forecasts whole series, so rows are grouped by series and handed to it with
``groupBy().applyInPandas``: each group is a bucket of whole series (a hash of the series id), which
the pyfunc runs through the sequence graph batched by length. ``mlflow.pyfunc.spark_udf`` does not
fit a forecaster: it is a scalar UDF (one output row per input row) and it cuts a series' rows
into arbitrary batches. Under spark-submit, pass the cluster's --master; the model travels to the
executors with ``SparkContext.addFile``, so they need no access to the registry.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from pyspark import SparkFiles
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

FORECASTING_TAG = "forecasting_model_uri"
SPARK_TYPES = {"string": "string", "datetime": "timestamp", "long": "bigint", "float": "float", "double": "double"}


def forecasting_uri(model_uri: str) -> str:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> the forecasting pyfunc logged beside that
    version; any other URI is taken to be the pyfunc itself."""
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or rest.startswith("m-"):  # not a registered version (m-...: a logged model id)
        return model_uri
    client = MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, number = rest.rsplit("/", 1)
        version = client.get_model_version(name, number)
    if FORECASTING_TAG not in version.tags:
        raise SystemExit(
            f"{model_uri} (version {version.version}) has no tag {FORECASTING_TAG!r}: registered before it"
        )
    return version.tags[FORECASTING_TAG]


def forecast(histories: DataFrame, model_uri: str, buckets: int) -> DataFrame:
    """Forecasts after each series' last row (the pyfunc's output schema), ``buckets`` pyfunc calls."""
    spark = histories.sparkSession
    if spark.conf.get("spark.sql.session.timeZone") != "UTC":
        # Spark hands timestamps to pandas as naive times in the session's zone; the model reads UTC.
        raise ValueError("set spark.sql.session.timeZone to UTC: the model's timestamps are UTC")
    local = mlflow.artifacts.download_artifacts(forecasting_uri(model_uri))  # on the driver, once
    meta = mlflow.models.Model.load(local)
    inputs = meta.get_input_schema().input_names()  # series id, timestamp, target, covariates...
    schema = ", ".join(f"`{c.name}` {SPARK_TYPES[c.type.name]}" for c in meta.get_output_schema().inputs)
    spark.sparkContext.addFile(local, recursive=True)  # ships the model to every executor
    name = Path(local).name

    def predict(series: pd.DataFrame) -> pd.DataFrame:  # runs on an executor, once per bucket
        model = mlflow.pyfunc.load_model(SparkFiles.get(name))
        return model.predict(series[inputs])

    bucket = F.pmod(F.xxhash64(F.col(f"`{inputs[0]}`")), F.lit(buckets))  # every row of a series in one bucket
    return histories.select(*(f"`{c}`" for c in inputs)).groupBy(bucket.alias("_bucket")).applyInPandas(predict, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/forecaster@production")
    parser.add_argument("--input", required=True, help="Parquet file or directory, or a .csv file")
    parser.add_argument("--output", required=True, help="Parquet directory to write (replaced)")
    parser.add_argument("--master", default=None, help="Spark master (default: local[*], or spark-submit's)")
    parser.add_argument("--buckets", type=int, default=None, help="pyfunc calls (default: 4 x default parallelism)")
    args = parser.parse_args()
    # Local mode runs Python workers: the same interpreter as this script, unless told otherwise.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

    builder = SparkSession.builder.appName("streamcast-batch-forecast")
    if args.master or "SPARK_HOME" not in os.environ:
        builder = builder.master(args.master or "local[*]")
    spark = builder.config("spark.sql.session.timeZone", "UTC").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        buckets = args.buckets or 4 * spark.sparkContext.defaultParallelism
        spark.conf.set("spark.sql.shuffle.partitions", str(buckets))
        if args.input.endswith(".csv"):
            histories = spark.read.csv(args.input, header=True, inferSchema=True)
        else:
            histories = spark.read.parquet(args.input)
        forecasts = forecast(histories, args.model_uri, buckets)
        forecasts.write.mode("overwrite").parquet(args.output)
        print(f"wrote forecasts ({', '.join(forecasts.columns)}) to {args.output}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
