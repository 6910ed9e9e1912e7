"""The Grafana dashboard (deploy/grafana/dashboards/forecast.json) queries only metrics, and
labels, that a real server exports: scraped from /metrics after stream and unary traffic."""

import json
import re

import grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.proto import pb, pb_grpc
from tests.deploy_support import ROOT
from tests.serving_support import FREQ_MS, START_MS, Stream

DASHBOARD = ROOT / "deploy/grafana/dashboards/forecast.json"
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series


def exported(server) -> dict[str, set[str]]:
    """Sample name -> label names, as the server's /metrics shows them after some traffic."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        stream = Stream(stub)
        for t in range(3):
            stream.send({"series_id": "dash", "timestamp_ms": START_MS + t * FREQ_MS, "value": 1.0 + t})
        stream.close()
        history = pb.SeriesHistory(series_id="h", timestamps_ms=[START_MS, START_MS + FREQ_MS], values=[1.0, 2.0])
        stub.Forecast(pb.ForecastRequest(series=[history]), timeout=30)
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(server.metrics_text()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def queries() -> list[tuple[str, str, str]]:
    """(panel title, PromQL expression, legend format) of every target."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in dashboard["panels"] for t in p["targets"]]


def labels_used(expr: str, legend: str) -> set[str]:
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return used


def test_every_metric_and_label_the_dashboard_queries_is_exported(server):
    samples = exported(server)
    names_seen = set()
    for title, expr, legend in queries():
        names = set(re.findall(r"\bforecast_\w+", expr))
        assert names, f"{title}: {expr} queries no forecast_* metric"
        missing = names - set(samples)
        assert not missing, f"{title}: {sorted(missing)} not exported (exported: {sorted(samples)})"
        labels = set().union(*(samples[n] for n in names)) | SCRAPE_LABELS
        assert labels_used(expr, legend) <= labels, f"{title}: {expr} / {legend!r} uses labels the metrics lack"
        names_seen |= names
    # What the dashboard is for: throughput, latency, live series, batching, errors, model version.
    assert {
        "forecast_observations_total",
        "forecast_latency_seconds_bucket",
        "forecast_live_series",
        "forecast_batch_size_bucket",
        "forecast_requests_total",
        "forecast_model_info",
    } <= names_seen


def test_dashboard_check_catches_a_wrong_name(server):
    samples = exported(server)
    assert "forecast_observations_total" in samples
    assert "forecast_observations" not in samples  # a counter is exported with _total only
    assert not labels_used('sum by (model) (rate(forecast_requests_total{code!="OK"}[1m]))', "") <= (
        samples["forecast_requests_total"] | SCRAPE_LABELS
    )
