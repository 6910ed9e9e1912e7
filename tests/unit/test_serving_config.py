"""Config dataclasses refuse bad values at construction, saying what to write instead."""

from pathlib import Path

import pytest

from serving.cli import config_from, parser
from serving.config import BatchConfig, LimitsConfig, RuntimeConfig, SecurityConfig, ServerConfig, StateConfig
from serving.model_store import ModelRef


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RuntimeConfig(device="gpu"), "device must be one of"),
        (lambda: BatchConfig(max_batch_size=0), "max_batch_size must be >= 1"),
        (lambda: StateConfig(idle_timeout_s=0), "idle_timeout_s must be > 0"),
        (lambda: ServerConfig(port=70000), "port must be in 0..65535"),
    ],
)
def test_bad_values_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_cli_flags_and_environment_become_the_config(tmp_path):
    args = parser().parse_args(
        ["--model-uri", "models:/m@candidate", "--port", "0", "--metrics-port", "-1", "--max-series", "10"]
    )
    cfg = config_from(args, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert cfg.port == 0 and cfg.metrics_port is None and cfg.state.max_series == 10
    assert cfg.source.tracking_uri == "http://mlflow:5000"
    assert config_from(args, {}).source.tracking_uri == "sqlite:///mlflow.db"


def test_model_uris(tmp_path):
    assert ModelRef.parse("models:/forecaster@production").alias == "production"
    assert ModelRef.parse("models:/forecaster/7").version == "7"
    assert ModelRef.parse(str(tmp_path)).local_dir == tmp_path.resolve()
    with pytest.raises(ValueError, match="expected models:/NAME@ALIAS"):
        ModelRef.parse("models:/forecaster")
    with pytest.raises(ValueError, match="neither models:/"):
        ModelRef.parse(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: LimitsConfig(max_series_id_bytes=0), "max_series_id_bytes must be >= 1"),
        (lambda: LimitsConfig(max_streams=0), "max_streams must be >= 1"),
        (lambda: SecurityConfig(tls_cert=Path("c.pem")), "give both --tls-cert and --tls-key"),
        (lambda: SecurityConfig(tls_key=Path("k.pem")), "give both --tls-cert and --tls-key"),
        (lambda: SecurityConfig(tls_client_ca=Path("ca.pem")), "--tls-client-ca\\) needs TLS"),
    ],
)
def test_bad_limits_and_security_combinations_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_limit_and_security_flags_become_the_config():
    defaults = config_from(parser().parse_args([]), {})
    assert defaults.host == "127.0.0.1" and defaults.metrics_bind_host == "127.0.0.1"
    assert defaults.security.mode == "plaintext" and defaults.security.auth_token_file is None
    assert defaults.limits == LimitsConfig(
        max_series_id_bytes=256, max_series_per_stream=100_000, max_streams=10_000, max_observations_per_request=100_000
    )
    args = parser().parse_args(
        ["--host", "0.0.0.0", "--metrics-host", "10.1.2.3", "--tls-cert", "s.pem", "--tls-key", "s.key",
         "--tls-client-ca", "ca.pem", "--auth-token-file", "tokens", "--max-series-id-bytes", "64",
         "--max-series-per-stream", "7", "--max-streams", "8", "--max-observations-per-request", "9"]
    )  # fmt: skip
    cfg = config_from(args, {})
    assert cfg.metrics_bind_host == "10.1.2.3"
    assert cfg.security == SecurityConfig(Path("s.pem"), Path("s.key"), Path("ca.pem"), Path("tokens"))
    assert cfg.security.mode == "mtls"
    assert cfg.limits == LimitsConfig(64, 7, 8, 9)


def test_the_http_binding_is_off_unless_asked_for():
    assert config_from(parser().parse_args([]), {}).http_port is None
    assert config_from(parser().parse_args(["--http-port", "0"]), {}).http_port == 0
    assert config_from(parser().parse_args(["--http-port", "8000"]), {}).http_port == 8000
    with pytest.raises(ValueError, match=r"http_port must be in 0\.\.65535"):
        ServerConfig(http_port=70000)


def test_the_server_version_is_the_projects():
    import tomllib

    import serving

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert serving.__version__ == project["version"]  # what ServerMetadata reports
