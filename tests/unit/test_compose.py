"""docker-compose.yml (and its GPU override), checked without a container engine: the Compose
Specification's JSON schema, then that everything it names exists and fits together: build
stages, mounted files, volumes, dependencies, the commands each service runs, and the wiring of
MLflow, the server, Prometheus and Grafana."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from serving.cli import parser
from tests.deploy_support import ROOT, dockerfile_stages, requirement_names

COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
SCHEMA = json.loads((ROOT / "tests/data/compose/compose-spec.json").read_text())
STAGES = dockerfile_stages()
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def volume_mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    return [tuple(v.split(":")[:2]) for v in service.get("volumes", [])]


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_validate_against_the_compose_specification(name):
    doc = yaml.safe_load((ROOT / name).read_text())
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(doc)]
    assert errors == []


def test_schema_check_catches_a_misspelt_key():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    doc["services"]["serving"]["depend_on"] = ["mlflow"]
    assert list(jsonschema.Draft7Validator(SCHEMA).iter_errors(doc))


def test_gpu_override_only_touches_defined_services_and_serves_on_cuda():
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]
    assert set(gpu) <= set(SERVICES)
    entrypoint = STAGES["serving"].last("ENTRYPOINT").exec_form()[3:]
    assert parser().parse_args(entrypoint + gpu["serving"]["command"]).device == "cuda"
    (device,) = gpu["serving"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


def test_builds_use_dockerfile_stages_and_the_image_names_make_docker_tags():
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    built = {name: s for name, s in SERVICES.items() if "build" in s}
    assert {s["build"]["target"] for s in built.values()} == {"serving", "training", "tracking"}
    for name, service in built.items():
        assert (ROOT / service["build"]["context"] / "Dockerfile").is_file()
        assert service["build"]["target"] in STAGES, name
        assert service["image"] == f"streamcast-{service['build']['target']}:{version}"
    for name, service in SERVICES.items():
        if "build" not in service:  # third-party images: pinned to a release, never a moving tag
            assert re.search(r":v?\d+\.\d+", service["image"]), f"{name}: {service['image']} is not pinned"


def test_mounted_files_exist_and_named_volumes_are_declared():
    for name, service in SERVICES.items():
        for source, target in volume_mounts(service):
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in COMPOSE["volumes"], f"{name}: volume {source} is not declared"
            assert target.startswith("/")


def test_dependencies_are_defined_and_serving_waits_for_the_trained_model():
    for name, service in SERVICES.items():
        depends = service.get("depends_on", [])
        assert set(depends) <= set(SERVICES) - {name}
    assert SERVICES["serving"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert SERVICES["trainer"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert SERVICES["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert SERVICES["trainer"]["restart"] == "no"  # one-shot


def test_tracking_server_stores_runs_in_postgres_and_serves_artifacts_from_a_volume():
    argv = SERVICES["mlflow"]["command"]
    assert "--serve-artifacts" in argv
    artifacts = option(argv, "--artifacts-destination")
    assert dict((t, s) for s, t in volume_mounts(SERVICES["mlflow"]))[artifacts] in COMPOSE["volumes"]
    store = option(argv, "--backend-store-uri")
    env = SERVICES["postgres"]["environment"]
    assert store == f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    assert "psycopg2-binary" in requirement_names(ROOT / "requirements/tracking.txt")
    assert "mlflow:5000" in option(argv, "--allowed-hosts").split(",")  # the Host the other services send


def test_trainer_and_server_run_commands_their_clis_accept_against_the_tracking_server():
    from training.__main__ import _parser

    port = option(SERVICES["mlflow"]["command"], "--port")
    tracking = f"http://mlflow:{port}"
    trainer = SERVICES["trainer"]
    assert _parser().parse_args(trainer["command"]).command == "ensure-production"
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == tracking

    serving = SERVICES["serving"]
    args = parser().parse_args(STAGES["serving"].last("ENTRYPOINT").exec_form()[3:] + serving["command"])
    assert args.model_uri == "models:/forecaster@production"
    assert serving["environment"]["MLFLOW_TRACKING_URI"] == tracking
    published = {p.rsplit(":", 1)[1] for p in serving["ports"]}
    assert published == {str(args.port), str(args.metrics_port)}


def test_prometheus_scrapes_the_servers_metrics_port():
    prometheus = SERVICES["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    source = dict((t, s) for s, t in volume_mounts(prometheus))[config_path]
    config = yaml.safe_load((ROOT / source).read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    metrics_port = parser().parse_args(STAGES["serving"].last("ENTRYPOINT").exec_form()[3:]).metrics_port
    assert targets == [f"serving:{metrics_port}"]


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard():
    grafana = SERVICES["grafana"]
    mounts = dict((t, ROOT / s) for s, t in volume_mounts(grafana))
    (datasource,) = yaml.safe_load((mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((mounts["/etc/grafana/provisioning/dashboards"] / "streamcast.yml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    assert dashboards == ROOT / "deploy/grafana/dashboards"
    home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    dashboard = json.loads((dashboards / home.relative_to(provider["options"]["path"])).read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}


def test_prometheus_loads_the_live_accuracy_alerts_on_metrics_the_server_exports():
    from serving.metrics import _LiveAccuracy

    prometheus = SERVICES["prometheus"]
    mounts = dict((t, s) for s, t in volume_mounts(prometheus))
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load((ROOT / mounts[config_path]).read_text())
    exported = {"forecast_live_drift_ratio", *(f"forecast_live_{name}" for name, _ in _LiveAccuracy.FIGURES)}
    alerts = []
    for rule_file in config["rule_files"]:
        mounted = str(Path(config_path).parent / rule_file)  # relative to the config file
        for group in yaml.safe_load((ROOT / mounts[mounted]).read_text())["groups"]:
            alerts += group["rules"]
    assert {a["alert"] for a in alerts} >= {"ForecastLiveDrift"}
    for alert in alerts:
        assert set(re.findall(r"forecast_\w+", alert["expr"])) <= exported, alert["expr"]
        assert alert["annotations"]["summary"] and alert["for"]
