"""Transport security of the server: TLS credentials from PEM files, and bearer tokens.

`server_credentials` turns --tls-cert/--tls-key (and --tls-client-ca for mutual TLS) into gRPC
server credentials, after checking the files with the standard library's TLS so a wrong path, a
file that is not PEM or a key that is not the certificate's stops the start with a message that
names the flag and the file (gRPC itself would only fail later, at the first handshake).

`TokenAuthInterceptor` requires `authorization: Bearer TOKEN` on every RPC except the standard
health service (probes and load balancers carry no secrets). It is a server interceptor, so it
covers every service on the server -- forecast.v1, reflection, and whatever is added later --
without any of them knowing. The token is checked before the method is even looked up, so a
client without one learns nothing about which methods exist, and the refusal is one fixed
message whether the header was missing, malformed or wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from serving.config import SecurityConfig
from serving.errors import CredentialsError, Unauthenticated, grpc_status

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = (
    "unauthenticated: this server needs a valid bearer token (metadata 'authorization: Bearer TOKEN')"
)


def _read(path: Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from exc
    if not data.strip():
        raise CredentialsError(f"{flag} {path}: the file is empty")
    return data


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """gRPC server credentials for the configured TLS mode; None for plaintext.

    Raises CredentialsError naming the flag and file for an unreadable or empty file, a file
    that is not PEM, or a key that does not belong to the certificate.
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert = _read(config.tls_cert, "--tls-cert")
    key = _read(config.tls_key, "--tls-key")
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key would make OpenSSL prompt on the terminal; gRPC cannot use one anyway.
        check.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise CredentialsError(
            f"--tls-cert {config.tls_cert} with --tls-key {config.tls_key}: not a PEM certificate with its "
            f"own unencrypted private key ({exc.reason or exc})"
        ) from exc
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read(config.tls_client_ca, "--tls-client-ca")
        try:
            check.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as exc:
            raise CredentialsError(
                f"--tls-client-ca {config.tls_client_ca}: not a PEM CA certificate bundle ({exc.reason or exc})"
            ) from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def server_ssl_context(config: SecurityConfig) -> ssl.SSLContext | None:
    """The same TLS mode for the HTTP binding, from the same files (checked by
    `server_credentials` first): the certificate, and client certificates with a client CA."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(config.tls_cert, config.tls_key, password=lambda: b"")
    if config.tls_client_ca is not None:
        context.load_verify_locations(cafile=config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def read_tokens(path: Path, flag: str = "--auth-token-file") -> list[str]:
    """The tokens in a token file: one a line; blank lines and lines starting with # are skipped.

    Raises CredentialsError when the file cannot be read or holds no token: a server that was
    asked to require tokens must not start open.
    """
    text = _read(path, flag).decode("utf-8", errors="replace")
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise CredentialsError(f"{flag} {path}: no token in it (one a line; # starts a comment)")
    bad = [i for i, t in enumerate(tokens) if any(c.isspace() for c in t) or not t.isascii()]
    if bad:
        raise CredentialsError(
            f"{flag} {path}: token {bad[0] + 1} has spaces or non-ASCII characters, which a gRPC header cannot carry"
        )
    return tokens


def _digest(token: bytes) -> bytes:
    # Comparing fixed-size digests keeps the comparison's time independent of the tokens' lengths.
    return hashlib.sha256(token).digest()


class TokenChecker:
    """Checks an `authorization` header value against every configured token in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("at least one token is needed")
        self._digests = [_digest(t.encode()) for t in tokens]

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        """True when the first `authorization` entry is `Bearer TOKEN` with a configured token.

        Every call compares against all tokens, whatever the header held (or if there was
        none), so timing tells neither which token matched nor what was wrong.
        """
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, credentials = header.strip().partition(" ")
        bearer = scheme.lower() == "bearer"  # the auth scheme is case-insensitive (RFC 9110 11.1)
        presented = _digest(credentials.strip().encode("utf-8", "surrogateescape"))
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return bearer and bool(credentials.strip()) and matched


def _refusal(method: str) -> grpc.RpcMethodHandler:
    """The handler of a refused call: a stream-stream one, so it fits any method and answers at
    once, without waiting for (or reading) a request."""

    async def refuse(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        log.info("event=rpc_unauthenticated method=%r peer=%s", method[:200], context.peer())
        code, message = grpc_status(Unauthenticated(UNAUTHENTICATED_MESSAGE), ref="-")
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(refuse)


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health needs `authorization: Bearer TOKEN` with one of the tokens."""

    def __init__(self, checker: TokenChecker, on_refused: Callable[[], object] | None = None) -> None:
        self._checker = checker
        self._on_refused = on_refused

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method.startswith(HEALTH_METHOD_PREFIX) or self._checker.accepts(handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        if self._on_refused is not None:
            self._on_refused()
        return _refusal(method)
