"""`python -m serving`: parse flags and environment into ServerConfig, then run the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from serving.config import (
    DEVICES,
    BatchConfig,
    LimitsConfig,
    ModelSourceConfig,
    MonitorConfig,
    RuntimeConfig,
    SecurityConfig,
    ServerConfig,
    StateConfig,
)
from serving.logs import setup_logging

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STATE_SECRET_ENV = "FORECAST_STATE_SECRET"


def parser() -> argparse.ArgumentParser:
    d_server, d_batch, d_state, d_rt = ServerConfig(), BatchConfig(), StateConfig(), RuntimeConfig()
    d_limits = LimitsConfig()
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Streaming forecast server: forecast.v1 and the Open Inference Protocol over gRPC (and HTTP).",
    )
    a = p.add_argument
    a(
        "--model-uri",
        default=ModelSourceConfig().model_uri,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a directory with model.onnx and sequence.onnx",
    )
    a("--model-name", default=None, help="name reported for a local directory (default: forecaster)")
    a(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    a(
        "--watch-interval-s",
        type=float,
        default=ModelSourceConfig().watch_interval_s,
        help="seconds between checks of the registry alias; 0 disables",
    )
    a("--host", default=d_server.host, help="gRPC address to bind (default: loopback only)")
    a("--port", type=int, default=d_server.port, help="gRPC port; 0 picks a free one")
    a(
        "--metrics-port",
        type=int,
        default=d_server.metrics_port,
        help="Prometheus port; 0 picks a free one, -1 disables",
    )
    a("--metrics-host", default=None, help="address the metrics endpoint binds (default: the same as --host)")
    a(
        "--http-port",
        type=int,
        default=-1,
        help="the Open Inference Protocol's HTTP/REST binding on --host; 0 picks a free port, -1 (default) is off",
    )
    a("--tls-cert", type=Path, default=None, help="server certificate chain (PEM); with --tls-key: serve TLS")
    a("--tls-key", type=Path, default=None, help="the server certificate's private key (PEM, unencrypted)")
    a(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="CA bundle (PEM): require client certificates that chain to it (mutual TLS)",
    )
    a(
        "--auth-token-file",
        type=Path,
        default=None,
        help="require 'authorization: Bearer TOKEN' on every RPC but health; one token a line, # comments",
    )
    a(
        "--state-secret-file",
        type=Path,
        default=None,
        help=f"secret that signs resumable-series snapshots (return_state/resume_state), the same on every "
        f"replica; or ${STATE_SECRET_ENV}. Without one, snapshots are refused",
    )
    a(
        "--device",
        choices=DEVICES,
        default=d_rt.device,
        help="auto: CUDA when really usable, else CPU; cuda: fail unless CUDA runs",
    )
    a("--intra-op-threads", type=int, default=d_rt.intra_op_threads, help="ONNX Runtime threads per call")
    a("--max-batch-size", type=int, default=d_batch.max_batch_size, help="rows per ONNX Runtime step call")
    a(
        "--max-batch-delay-us",
        type=int,
        default=d_batch.max_batch_delay_us,
        help="extra wait for more rows when idle, microseconds (0: batch only what is queued)",
    )
    a(
        "--max-series",
        type=int,
        default=d_state.max_series,
        help="cap on live series; past it, new series are refused with RESOURCE_EXHAUSTED",
    )
    a(
        "--idle-timeout-s",
        type=float,
        default=d_state.idle_timeout_s,
        help="free a series not stepped for this long (seconds)",
    )
    a(
        "--initial-state-rows",
        type=int,
        default=d_state.initial_capacity,
        help="state rows preallocated per model version (doubles as needed)",
    )
    a(
        "--max-message-bytes",
        type=int,
        default=d_server.max_receive_message_bytes,
        help="largest request message accepted; larger ones get RESOURCE_EXHAUSTED",
    )
    a(
        "--max-series-id-bytes",
        type=int,
        default=d_limits.max_series_id_bytes,
        help="longest series id (UTF-8 bytes); longer ones get INVALID_ARGUMENT",
    )
    a(
        "--max-series-per-stream",
        type=int,
        default=d_limits.max_series_per_stream,
        help="live series one stream may hold; past it, new series get RESOURCE_EXHAUSTED",
    )
    a(
        "--max-streams",
        type=int,
        default=d_limits.max_streams,
        help="concurrent StreamForecast calls; past it, new streams get RESOURCE_EXHAUSTED",
    )
    a(
        "--max-observations-per-request",
        type=int,
        default=d_limits.max_observations_per_request,
        help="observations in one request (Forecast: summed over histories); more get RESOURCE_EXHAUSTED",
    )
    d_mon = MonitorConfig()
    a(
        "--monitor-fraction",
        type=float,
        default=d_mon.fraction,
        help="share of series scored live as their actuals arrive (a hash of the series id); 0 disables",
    )
    a(
        "--monitor-max-series",
        type=int,
        default=d_mon.max_series,
        help="cap on monitored series per model version (28 KiB each with horizon 48, 3 quantiles, every origin; "
        "4 KiB at origin stride 8)",
    )
    a(
        "--monitor-origin-stride",
        type=int,
        default=d_mon.origin_stride,
        metavar="K",
        help="score the forecasts of every K-th origin only: 1/K of the memory and scoring CPU (1: every forecast; "
        "default: the smallest K that fits --monitor-memory-mib, 8 for the default model)",
    )
    a(
        "--monitor-memory-mib",
        type=int,
        default=d_mon.memory_mib,
        help="memory for one version's live scores at --monitor-max-series series; sets the default origin stride",
    )
    a(
        "--monitor-window",
        type=int,
        default=d_mon.window_observations,
        help="observations the recent live-accuracy figures span, per model version",
    )
    a(
        "--shadow-alias",
        default=None,
        help="registry alias (e.g. candidate) run beside the served version on monitored series, scored, never answered",
    )
    a("--grace-s", type=float, default=d_server.grace_s, help="seconds in-flight RPCs get on SIGTERM")
    a("--log-level", default="INFO")
    a("--log-format", choices=("kv", "json"), default="kv")
    return p  # fmt: skip


def config_from(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=None if args.http_port < 0 else args.http_port,
        max_receive_message_bytes=args.max_message_bytes,
        grace_s=args.grace_s,
        source=ModelSourceConfig(
            model_uri=args.model_uri,
            watch_interval_s=args.watch_interval_s,
            tracking_uri=args.tracking_uri or environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
            model_name=args.model_name,
        ),
        runtime=RuntimeConfig(device=args.device, intra_op_threads=args.intra_op_threads),
        batch=BatchConfig(max_batch_size=args.max_batch_size, max_batch_delay_us=args.max_batch_delay_us),
        state=StateConfig(
            max_series=args.max_series,
            idle_timeout_s=args.idle_timeout_s,
            initial_capacity=args.initial_state_rows,
        ),
        limits=LimitsConfig(
            max_series_id_bytes=args.max_series_id_bytes,
            max_series_per_stream=args.max_series_per_stream,
            max_streams=args.max_streams,
            max_observations_per_request=args.max_observations_per_request,
        ),
        monitor=MonitorConfig(
            fraction=args.monitor_fraction,
            max_series=args.monitor_max_series,
            window_observations=args.monitor_window,
            origin_stride=args.monitor_origin_stride,
            memory_mib=args.monitor_memory_mib,
            shadow_alias=args.shadow_alias,
        ),
        security=SecurityConfig(
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            auth_token_file=args.auth_token_file,
            state_secret_file=args.state_secret_file,
            state_secret=environ[STATE_SECRET_ENV].encode() if STATE_SECRET_ENV in environ else None,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        config = config_from(args, dict(os.environ))
    except ValueError as exc:
        parser().error(str(exc))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per event in logs
    # The alias watch backs off by itself (serving.model_store.retry_delay). mlflow's default of 7
    # retries with exponential backoff would hold one check ~4 minutes against a registry that is
    # down; two quick retries (~3 s) still ride out a dropped connection.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    logging.getLogger("serving").info("event=config %s", config)
    from serving.server import serve  # here: --help and flag errors need neither gRPC nor the stubs

    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
