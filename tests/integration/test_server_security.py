"""TLS, mutual TLS and bearer tokens on a real server, with certificates made for the test: who
is refused (plaintext clients, clients trusting another CA, clients without or with a stranger's
certificate, calls without a good token) and who is served; health stays open; the client
library and CLI speak all of it."""

import os
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.client import ForecastClient, observation
from serving.config import SecurityConfig
from serving.errors import CredentialsError
from serving.proto import pb, pb_grpc
from serving.security import UNAUTHENTICATED_MESSAGE
from tests.serving_support import SERVING, START_MS, RunningServer, health_status, server_config
from tests.tls_support import make_pki

ROOT = Path(__file__).resolve().parents[2]
TOKENS = ("tok-ingest-7f3a", "tok-dashboard-91c2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    path.write_text(f"# ingest\n{TOKENS[0]}\n\n# dashboard\n{TOKENS[1]}\n")
    return path


@pytest.fixture(scope="module")
def tls_server(model_dir, pki):
    """TLS without client certificates or tokens."""
    security = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)
    with RunningServer(replace(server_config(str(model_dir)), security=security)) as s:
        yield s


@pytest.fixture(scope="module")
def mtls_server(model_dir, pki, token_file):
    """Mutual TLS and tokens."""
    security = SecurityConfig(pki.server_cert, pki.server_key, tls_client_ca=pki.ca, auth_token_file=token_file)
    with RunningServer(replace(server_config(str(model_dir)), security=security)) as s:
        yield s


def tls_channel(server, pki, ca=None, cert=None, key=None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(ca or pki.ca).read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(server.target, credentials)


def client_channel(server, pki) -> grpc.Channel:
    """Trusts the right CA and shows the right client certificate."""
    return tls_channel(server, pki, cert=pki.client_cert, key=pki.client_key)


def one_step(channel: grpc.Channel, metadata=None, series="s") -> int:
    request = pb.StreamRequest(observations=[pb.Observation(series_id=series, timestamp_ms=START_MS, value=1.0)])
    stub = pb_grpc.ForecasterStub(channel)
    (response,) = stub.StreamForecast(iter([request]), metadata=metadata, timeout=10)
    return response.forecasts[0].steps_seen


def refused_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server):
    with grpc.insecure_channel(tls_server.target) as channel:
        assert refused_code(lambda: health_status(channel)) == grpc.StatusCode.UNAVAILABLE
        assert refused_code(lambda: one_step(channel)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_is_refused(tls_server, pki):
    with tls_channel(tls_server, pki, ca=pki.other_ca) as channel:
        assert refused_code(lambda: health_status(channel)) == grpc.StatusCode.UNAVAILABLE


def test_a_tls_server_serves_a_client_trusting_its_ca(tls_server, pki):
    with tls_channel(tls_server, pki) as channel:
        assert health_status(channel) == SERVING
        assert one_step(channel) == 1
    with ForecastClient(tls_server.target, tls_ca=pki.ca) as client:  # the library, by file names
        assert client.info().name == "forecaster"


@pytest.mark.parametrize("who", ["no certificate", "a stranger's certificate"])
def test_mutual_tls_refuses_clients_without_a_certificate_from_its_ca(mtls_server, pki, who):
    cert, key = (None, None) if who == "no certificate" else (pki.stranger_cert, pki.stranger_key)
    with tls_channel(mtls_server, pki, cert=cert, key=key) as channel:
        assert refused_code(lambda: health_status(channel)) == grpc.StatusCode.UNAVAILABLE
        assert refused_code(lambda: one_step(channel, [("authorization", f"Bearer {TOKENS[0]}")])) == (
            grpc.StatusCode.UNAVAILABLE
        )


BAD_HEADERS = {
    "missing": None,
    "empty": [("authorization", "")],
    "no scheme": [("authorization", TOKENS[0])],
    "another scheme": [("authorization", f"Basic {TOKENS[0]}")],
    "no token": [("authorization", "Bearer")],
    "wrong token": [("authorization", "Bearer tok-ingest-7f3b")],
    "a token's prefix": [("authorization", f"Bearer {TOKENS[0][:-1]}")],
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_without_a_good_token_every_rpc_but_health_is_unauthenticated_alike(mtls_server, pki, case):
    metadata = BAD_HEADERS[case]
    before = mtls_server.metric("forecast_unauthenticated_total")
    with client_channel(mtls_server, pki) as channel:
        stub = pb_grpc.ForecasterStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        calls = {
            "StreamForecast": lambda: one_step(channel, metadata),
            "Forecast": lambda: stub.Forecast(pb.ForecastRequest(), metadata=metadata, timeout=10),
            "GetModelInfo": lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10),
            "reflection": lambda: list(
                reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=10
                )
            ),
            "a method that does not exist": lambda: channel.unary_unary("/forecast.v1.Forecaster/Nope")(
                b"", metadata=metadata, timeout=10
            ),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            # One status and one message whatever was wrong: nothing to probe with.
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                UNAUTHENTICATED_MESSAGE,
            ), name
        assert health_status(channel) == SERVING  # health needs no token (probes, load balancers)
        assert health_status(channel, "") == SERVING
    assert mtls_server.metric("forecast_unauthenticated_total") == before + len(calls)


@pytest.mark.parametrize("token", TOKENS)
def test_each_configured_token_is_served(mtls_server, pki, token):
    with client_channel(mtls_server, pki) as channel:
        assert one_step(channel, [("authorization", f"Bearer {token}")], series=token) == 1
        # gRPC's standard token credentials send the same header
        call_credentials = grpc.access_token_call_credentials(token)
        stub = pb_grpc.ForecasterStub(channel)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), credentials=call_credentials, timeout=10)
        assert info.name == "forecaster"
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), credentials=call_credentials, timeout=10
        )
        assert "forecast.v1.Forecaster" in [s.name for s in answer.list_services_response.service]


def test_the_client_library_speaks_mtls_with_a_token(mtls_server, pki):
    with ForecastClient(
        mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key, token=TOKENS[1]
    ) as client:
        client.wait_ready(timeout_s=10)
        answers = list(client.stream([[observation("lib", START_MS, 2.0)], [observation("lib", START_MS + 1, 3.0)]]))
        assert [a[0].steps_seen for a in answers] == [1, 2]
    with ForecastClient(mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as client:
        assert refused_code(client.info) == grpc.StatusCode.UNAUTHENTICATED


def run_client(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.client", "info", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_the_client_cli_takes_tls_files_and_a_token_from_a_file_or_the_environment(mtls_server, pki, token_file):
    tls = ["--target", mtls_server.target, "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]  # fmt: skip
    out = run_client(*tls, "--token-file", str(token_file))  # the file's first token
    assert out.returncode == 0, out.stderr
    assert 'name: "forecaster"' in out.stdout
    out = run_client(*tls, env={"FORECAST_TOKEN": "not-a-token"})
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}"


def test_metrics_can_listen_on_another_address_than_grpc(model_dir):
    # gRPC on 127.0.0.1, metrics on 127.0.0.2 (also loopback on Linux): each only where asked.
    config = replace(server_config(str(model_dir)), metrics_host="127.0.0.2")
    with RunningServer(config, wait_ready=False) as server:
        port = server.server.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=5) as r:
            assert b"forecast_limit_refusals_total" in r.read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


@pytest.mark.parametrize(
    ("security", "message"),
    [
        (
            lambda pki, tmp: SecurityConfig(auth_token_file=tmp / "empty"),
            r"--auth-token-file .*empty: the file is empty",
        ),
        (
            lambda pki, tmp: SecurityConfig(auth_token_file=tmp / "absent"),
            r"--auth-token-file .*absent: cannot read it",
        ),
        (
            lambda pki, tmp: SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.client_key),
            r"--tls-cert .*server\.pem with --tls-key .*client\.key: not a PEM certificate with its own",
        ),
    ],
)
def test_a_server_with_unusable_security_files_does_not_start(model_dir, pki, tmp_path, security, message):
    (tmp_path / "empty").write_text("")
    config = replace(server_config(str(model_dir)), security=security(pki, tmp_path))
    with pytest.raises(CredentialsError, match=message):
        RunningServer(config).__enter__()


def test_promote_live_reads_the_evidence_over_mutual_tls_with_a_token(mtls_server, pki, token_file, tmp_path):
    """`promote --live` against a secured server: with the CA, its certificate and a token the call
    goes through (this server runs no shadow, which is what it then says); without TLS, or with a
    token the server does not know, it fails with the transport's reason."""
    from training.live_promote import read_evidence
    from training.registry import RegistryError

    tls = {"tls_ca": pki.ca, "tls_cert": pki.client_cert, "tls_key": pki.client_key}
    with pytest.raises(RegistryError, match="runs no shadow version"):
        read_evidence(mtls_server.target, token_file, timeout_s=10, **tls)
    stranger = tmp_path / "stranger.txt"
    stranger.write_text("not-a-token\n")
    with pytest.raises(RegistryError, match="UNAUTHENTICATED"):
        read_evidence(mtls_server.target, stranger, timeout_s=10, **tls)
    with pytest.raises(RegistryError, match="UNAVAILABLE"):
        read_evidence(mtls_server.target, token_file, timeout_s=10)  # plaintext to a TLS server
    with pytest.raises(RegistryError, match=r"--tls-ca .*cannot read it"):
        read_evidence(mtls_server.target, token_file, timeout_s=10, tls_ca=tmp_path / "missing.pem")
