"""Security files and token checks, without sockets: token files are read as documented and
refused when useless, a token is accepted only as `Bearer TOKEN` with a configured token, and
TLS files that cannot work stop the start with a message naming the flag and the file."""

import re

import pytest

from serving.cli import config_from, parser
from serving.config import SecurityConfig
from serving.errors import CredentialsError
from serving.security import TokenChecker, read_tokens, server_credentials, state_secret
from tests.tls_support import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_token_file_one_a_line_with_comments_and_blank_lines(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# the ingest service\n  tok-ingest-1  \n\n# the dashboard\ntok-dash-2\n")
    assert read_tokens(path) == ["tok-ingest-1", "tok-dash-2"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "the file is empty"),
        ("\n  \n# only a comment\n", "no token in it"),
        ("good\nhas a space\n", "token 2 has spaces or non-ASCII characters"),
    ],
)
def test_a_token_file_without_usable_tokens_is_refused(tmp_path, content, message):
    path = tmp_path / "tokens"
    path.write_text(content)
    with pytest.raises(CredentialsError, match=f"--auth-token-file {path}: {message}"):
        read_tokens(path)


def test_an_unreadable_token_file_is_refused(tmp_path):
    with pytest.raises(CredentialsError, match=r"--auth-token-file .*missing: cannot read it"):
        read_tokens(tmp_path / "missing")
    with pytest.raises(CredentialsError, match="cannot read it"):
        read_tokens(tmp_path)  # a directory


CHECKER = TokenChecker(["tok-one", "tok-two-is-longer"])


@pytest.mark.parametrize("value", ["Bearer tok-one", "Bearer tok-two-is-longer", "bearer tok-one", "Bearer  tok-one "])
def test_a_configured_token_is_accepted(value):
    assert CHECKER.accepts([("user-agent", "x"), ("authorization", value)])
    assert CHECKER.accepts([("authorization", value.encode())])


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        [],
        [("user-agent", "x")],
        [("authorization", "")],
        [("authorization", "Bearer")],
        [("authorization", "Bearer ")],
        [("authorization", "tok-one")],  # no scheme
        [("authorization", "Basic tok-one")],  # another scheme
        [("authorization", "Bearer tok-on")],  # a prefix of a token
        [("authorization", "Bearer tok-one2")],  # a token as a prefix
        [("authorization", "Bearer tok-one tok-two-is-longer")],
        [("authorization", "Bearer wrong"), ("authorization", "Bearer tok-one")],  # only the first counts
    ],
)
def test_anything_else_is_refused(metadata):
    assert not CHECKER.accepts(metadata)


def test_plaintext_has_no_credentials_and_tls_files_are_checked(pki):
    assert server_credentials(SecurityConfig()) is None
    assert server_credentials(SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key)) is not None
    mtls = SecurityConfig(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)
    assert server_credentials(mtls) is not None


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("server_cert", "client_key", None), r"--tls-cert .*server\.pem with --tls-key .*client\.key: not a PEM"),
        (("server_key", "server_key", None), r"--tls-cert .*server\.key with --tls-key .*server\.key: not a PEM"),
        (("server_cert", "server_key", "server_key"), r"--tls-client-ca .*server\.key: not a PEM CA"),
        (("missing", "server_key", None), r"--tls-cert .*missing\.pem: cannot read it"),
        (("server_cert", "missing", None), r"--tls-key .*missing\.pem: cannot read it"),
        (("server_cert", "server_key", "missing"), r"--tls-client-ca .*missing\.pem: cannot read it"),
    ],
)
def test_unusable_tls_files_are_refused_naming_flag_and_file(pki, files, message):
    def path(name):
        return None if name is None else getattr(pki, name, pki.ca.parent / "missing.pem")

    cert, key, ca = (path(f) for f in files)
    with pytest.raises(CredentialsError, match=message):
        server_credentials(SecurityConfig(tls_cert=cert, tls_key=key, tls_client_ca=ca))


def test_the_state_secret_comes_from_its_file_or_the_environment_and_is_not_logged(tmp_path):
    path = tmp_path / "state"
    path.write_text("  file-secret-0123456789\n")
    args = parser().parse_args(["--state-secret-file", str(path)])
    assert state_secret(config_from(args, {}).security) == b"file-secret-0123456789"
    env = config_from(parser().parse_args([]), {"FORECAST_STATE_SECRET": "env-secret-0123456789"})
    assert state_secret(env.security) == b"env-secret-0123456789"
    assert "env-secret" not in repr(env)  # the resolved config is logged at start
    assert state_secret(config_from(parser().parse_args([]), {}).security) is None  # off
    with pytest.raises(ValueError, match="not both"):
        config_from(args, {"FORECAST_STATE_SECRET": "env-secret-0123456789"})


@pytest.mark.parametrize(
    ("content", "message"), [(None, "cannot read"), ("\n", "empty"), ("short\n", "5 bytes, at least 16")]
)
def test_an_unusable_state_secret_stops_the_start(tmp_path, content, message):
    path = tmp_path / "state"
    if content is not None:
        path.write_text(content)
    with pytest.raises(CredentialsError, match=rf"--state-secret-file {re.escape(str(path))}.*{message}"):
        state_secret(SecurityConfig(state_secret_file=path))
    with pytest.raises(CredentialsError, match=r"FORECAST_STATE_SECRET.*at least 16"):
        state_secret(SecurityConfig(state_secret=b""))
