"""Prometheus metrics of one server, on its own registry (no process-global state).

Gauges that describe the data plane (live series, state bytes, streams) are computed when
scraped, so the hot path only pays for counters and histograms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        lat, sizes = _LATENCY_BUCKETS, _BATCH_BUCKETS
        self.requests = Counter(
            "forecast_requests", "RPCs finished (a stream counts once)", ["rpc", "code"], registry=r
        )
        self.messages = Counter("forecast_stream_messages", "StreamForecast messages answered", registry=r)
        self.observations = Counter("forecast_observations", "Steps forecast", ["rpc"], registry=r)
        self.latency = Histogram(
            "forecast_latency_seconds", "Server time per unary call or per stream message", ["rpc"],
            buckets=lat, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram("forecast_batch_size", "Rows per step ORT call", buckets=sizes, registry=r)
        self.ort_seconds = Histogram("forecast_ort_step_seconds", "Seconds per step ORT call", buckets=lat, registry=r)
        self.expired = Counter("forecast_series_expired", "Series freed by the idle timeout", registry=r)
        self.swaps = Counter("forecast_model_swaps", "Model versions installed after start-up", registry=r)
        self.refused = Counter("forecast_model_refused", "Model versions that failed to load or check", registry=r)
        self.model_info = Gauge(
            "forecast_model_info",
            "The serving model version (value 1)",
            ["name", "version", "provider"],
            registry=r,
        )
        self.live_series = Gauge("forecast_live_series", "Series with state held", registry=r)
        self.state_bytes = Gauge("forecast_state_bytes", "Bytes of preallocated series state", registry=r)
        self.streams = Gauge("forecast_active_streams", "Open StreamForecast calls", registry=r)
        self.loaded_versions = Gauge("forecast_loaded_versions", "Model versions in memory", registry=r)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.ort_seconds.observe(seconds)

    def set_model(self, name: str, version: str, provider: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, provider).set(1)

    def track(self, live_series: Callable[[], int], state_bytes: Callable[[], int],
              streams: Callable[[], int], loaded_versions: Callable[[], int]) -> None:  # fmt: skip
        self.live_series.set_function(live_series)
        self.state_bytes.set_function(state_bytes)
        self.streams.set_function(streams)
        self.loaded_versions.set_function(loaded_versions)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP endpoint on a daemon thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port
