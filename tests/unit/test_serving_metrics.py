"""The lock-free hot-path metrics expose exactly what prometheus_client's own would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import _LATENCY_BUCKETS, Metrics


def samples(registry: CollectorRegistry, name: str) -> dict:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_loop_metrics_match_prometheus_client():
    values = [0.0001, 0.0002, 0.00020001, 0.003, 0.05, 1.0, 5.0, 7.5, 0.0005]  # on, below and above bounds
    ours = Metrics()
    reference = CollectorRegistry()
    labels = ["rpc", "protocol"]
    ref_latency = Histogram("forecast_latency_seconds", "x", labels, buckets=_LATENCY_BUCKETS, registry=reference)
    ref_observations = Counter("forecast_observations", "x", labels, registry=reference)
    ref_messages = Counter("forecast_stream_messages", "x", ["protocol"], registry=reference)
    ref_messages.labels("oip-grpc")
    for v in values:
        ours.latency("StreamForecast", "forecast.v1").observe(v)
        ref_latency.labels("StreamForecast", "forecast.v1").observe(v)
        ours.observations("StreamForecast", "forecast.v1").inc(3)
        ref_observations.labels("StreamForecast", "forecast.v1").inc(3)
        ours.messages("forecast.v1").inc()
        ref_messages.labels("forecast.v1").inc()
    ours.latency("ModelInfer", "oip-http").observe(0.01)
    ref_latency.labels("ModelInfer", "oip-http").observe(0.01)
    for name in ("forecast_latency_seconds", "forecast_observations", "forecast_stream_messages"):
        got, want = samples(ours.registry, name), samples(reference, name)
        assert got == want, name
    assert (
        samples(ours.registry, "forecast_latency_seconds")[
            (
                "forecast_latency_seconds_bucket",
                (("le", "0.0002"), ("protocol", "forecast.v1"), ("rpc", "StreamForecast")),
            )
        ]
        == 2
    )  # a value equal to a bound counts in that bucket


def test_messages_counter_is_exposed_before_any_message():
    assert samples(Metrics().registry, "forecast_stream_messages") == {
        ("forecast_stream_messages_total", (("protocol", protocol),)): 0.0 for protocol in ("forecast.v1", "oip-grpc")
    }
