"""Prometheus metrics of one server, on its own registry (no process-global state).

Request, observation, message and latency figures carry a `protocol` label: `forecast.v1`,
`oip-grpc` (the Open Inference Protocol over gRPC) or `oip-http` (its REST binding); `rpc` names
the method (Triton's names for the Open Inference Protocol, over HTTP too). Gauges that describe
the data plane (live series, state bytes, streams) are computed when scraped. The per-message metrics (observations, stream messages, latency) are plain Python
numbers that only the event loop thread updates, read by the scrape: prometheus_client's own
counter and histogram take a lock per update, ~1.7 µs of the three per stream message, which is
2% of all the server's CPU per message at 64 one-observation streams.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# The `limit` labels of forecast_limit_refusals_total (ServingError.limit: the flag without its
# dashes), exposed at 0 from the start so an alert can watch each one.
LIMITS = ("max_series", "max_series_per_stream", "max_streams", "max_observations_per_request", "max_series_id_bytes")
PROTOCOLS = ("forecast.v1", "oip-grpc", "oip-http")
STREAMING_PROTOCOLS = ("forecast.v1", "oip-grpc")
# What the rows of a step ORT call belonged to: streams' series, server-wide sequences, or both.
BATCH_HOLDERS = ("stream", "sequence", "both")


class LoopCounter:
    """A counter for one thread's hot path (no lock): the scrape reads `value`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """A histogram for one thread's hot path (no lock). The scrape copies `counts` (one list
    copy, atomic under the GIL), so its buckets are consistent; `sum` may lag by one update."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket le=b holds values <= b
        self.sum += value


class _LoopFamilies(Collector):
    """Exposes labelled LoopCounters and LoopHistograms in the standard text format."""

    def __init__(self) -> None:
        self._counters: dict[str, tuple[str, tuple[str, ...], dict[tuple[str, ...], LoopCounter]]] = {}
        self._histograms: dict[str, tuple[str, tuple[str, ...], Sequence[float], dict]] = {}

    def counter(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> dict[tuple[str, ...], LoopCounter]:
        children: dict[tuple[str, ...], LoopCounter] = {}
        self._counters[name] = (doc, labels, children)
        return children

    def histogram(
        self, name: str, doc: str, labels: tuple[str, ...], bounds: Sequence[float]
    ) -> dict[tuple[str, ...], LoopHistogram]:
        children: dict[tuple[str, ...], LoopHistogram] = {}
        self._histograms[name] = (doc, labels, bounds, children)
        return children

    def collect(self) -> Iterator[Metric]:
        for name, (doc, labels, children) in self._counters.items():
            family = CounterMetricFamily(name, doc, labels=labels)
            for key, child in list(children.items()):
                family.add_metric(key, child.value)
            yield family
        for name, (doc, labels, bounds, children) in self._histograms.items():
            family = HistogramMetricFamily(name, doc, labels=labels)
            for key, child in list(children.items()):
                counts, total = list(child.counts), child.sum
                cumulative, buckets = 0, []
                for bound, count in zip([*bounds, float("inf")], counts):
                    cumulative += count
                    buckets.append((floatToGoString(bound), cumulative))
                family.add_metric(key, buckets, total)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        lat, sizes = _LATENCY_BUCKETS, _BATCH_BUCKETS
        self.requests = Counter(
            "forecast_requests", "RPCs finished (a stream counts once)", ["rpc", "code", "protocol"], registry=r
        )
        # Updated by the event loop thread only (see the module docstring).
        hot = _LoopFamilies()
        self._messages = hot.counter(
            "forecast_stream_messages", "Stream messages answered (StreamForecast, ModelStreamInfer)", ("protocol",)
        )
        self._observations = hot.counter("forecast_observations", "Steps forecast", ("rpc", "protocol"))
        self._latency = hot.histogram(
            "forecast_latency_seconds", "Server time per unary call or per stream message", ("rpc", "protocol"), lat
        )
        for protocol in STREAMING_PROTOCOLS:  # exposed from the start, at 0
            self.messages(protocol)
        r.register(hot)
        self.batch_size = Histogram("forecast_batch_size", "Rows per step ORT call", buckets=sizes, registry=r)
        self.step_batches = Counter(
            "forecast_step_batches",
            "Step ORT calls by what their rows were: streams' series, sequences, or both in one call",
            ["held"],
            registry=r,
        )
        self._held = {held: self.step_batches.labels(held) for held in BATCH_HOLDERS}  # exposed at 0
        self.ort_seconds = Histogram("forecast_ort_step_seconds", "Seconds per step ORT call", buckets=lat, registry=r)
        self.expired = Counter("forecast_series_expired", "Series freed by the idle timeout", registry=r)
        self.limit_refusals = Counter(
            "forecast_limit_refusals", "Requests refused by a configured limit", ["limit"], registry=r
        )
        for limit in LIMITS:
            self.limit_refusals.labels(limit)
        self.unauthenticated = Counter(
            "forecast_unauthenticated", "RPCs refused for a missing or wrong bearer token", registry=r
        )
        self.swaps = Counter("forecast_model_swaps", "Model versions installed after start-up", registry=r)
        self.refused = Counter(
            "forecast_model_refused", "Model versions refused for good: contract or warm-up failed", registry=r
        )
        self.watch_failures = Counter(
            "forecast_model_watch_failures",
            "Alias checks that could not reach the registry or download a version (retried with backoff)",
            registry=r,
        )
        self.model_info = Gauge(
            "forecast_model_info",
            "The serving model version (value 1)",
            ["name", "version", "provider"],
            registry=r,
        )
        self.live_series = Gauge("forecast_live_series", "Series with state held", registry=r)
        self.state_bytes = Gauge("forecast_state_bytes", "Bytes of preallocated series state", registry=r)
        self.streams = Gauge("forecast_active_streams", "Open streams (StreamForecast, ModelStreamInfer)", registry=r)
        self.live_sequences = Gauge(
            "forecast_live_sequences", "Server-wide sequences with state held (part of the live series)", registry=r
        )
        self.loaded_versions = Gauge("forecast_loaded_versions", "Model versions in memory", registry=r)

    def messages(self, protocol: str) -> LoopCounter:
        return _child(self._messages, (protocol,), LoopCounter)

    def observations(self, rpc: str, protocol: str) -> LoopCounter:
        return _child(self._observations, (rpc, protocol), LoopCounter)

    def latency(self, rpc: str, protocol: str) -> LoopHistogram:
        return _child(self._latency, (rpc, protocol), lambda: LoopHistogram(_LATENCY_BUCKETS))

    def finished(self, rpc: str, code: str, protocol: str) -> None:
        """One call finished (a stream counts once), with its status code's name."""
        self.requests.labels(rpc, code, protocol).inc()

    def observe_batch(self, rows: int, seconds: float, held: str) -> None:
        self.batch_size.observe(rows)
        self.ort_seconds.observe(seconds)
        self._held[held].inc()

    def set_model(self, name: str, version: str, provider: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, provider).set(1)

    def track(self, live_series: Callable[[], int], state_bytes: Callable[[], int], streams: Callable[[], int],
              loaded_versions: Callable[[], int], live_sequences: Callable[[], int]) -> None:  # fmt: skip
        self.live_series.set_function(live_series)
        self.state_bytes.set_function(state_bytes)
        self.streams.set_function(streams)
        self.loaded_versions.set_function(loaded_versions)
        self.live_sequences.set_function(live_sequences)

    def serve(self, host: str, port: int) -> tuple[Any, int]:
        """Start the /metrics HTTP endpoint on a daemon thread; returns (server, bound port)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_port


def _child(children: dict, key: tuple, make: Callable[[], Any]) -> Any:
    """The labelled child for key, created on first use (setdefault would build one every call)."""
    child = children.get(key)
    if child is None:
        child = children[key] = make()
    return child
