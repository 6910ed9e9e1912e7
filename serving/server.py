"""Assemble and run the server: forecast.v1 and the Open Inference Protocol (gRPC, and HTTP on
--http-port) over one data plane; health, reflection, metrics, security, draining.

`create_server(config)` returns `(server, port)` with the port bound and RPCs accepted at once
(health NOT_SERVING); the model loads in the background and `await server.ready()` waits for it.
`serve(config)` is what `python -m serving` runs: it adds signal handling and the final
"listening on HOST:PORT" line once the model is warmed up and health says SERVING.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving import __version__
from serving.config import ServerConfig
from serving.dataplane import DataPlane
from serving.errors import ServingError
from serving.metrics import Metrics
from serving.model_store import LoadedModel, ModelStore
from serving.oip_servicer import InferenceHandler, InferenceServicer
from serving.proto import OIP_SERVICE_NAME, SERVICE_NAME, oip, pb, reflection_pool
from serving.security import (
    TokenAuthInterceptor,
    TokenChecker,
    read_tokens,
    server_credentials,
    server_ssl_context,
)
from serving.servicer import ForecasterServicer, forecaster_handler

log = logging.getLogger(__name__)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICES = ("", SERVICE_NAME, OIP_SERVICE_NAME)


class ForecastServer:
    """One running server: gRPC transport, data plane, model store, background tasks."""

    def __init__(self, config: ServerConfig) -> None:
        """Raises CredentialsError when the TLS or token files cannot be used."""
        self.config = config
        self.metrics = Metrics()
        # Read the security files first: a server asked for TLS or tokens must not start without.
        self.credentials = server_credentials(config.security)
        self.ssl_context = server_ssl_context(config.security)  # the HTTP binding's, from the same files
        interceptors = []
        self.tokens = 0
        checker = None
        if config.security.auth_token_file is not None:
            checker = TokenChecker(read_tokens(config.security.auth_token_file))
            self.tokens = len(checker)
            interceptors.append(TokenAuthInterceptor(checker, on_refused=self.metrics.unauthenticated.inc))
        self.models = ModelStore(
            config.source, config.runtime, config.batch, config.state,
            observe_batch=self.metrics.observe_batch, on_change=self._model_changed,
            on_refused=lambda version: self.metrics.refused.inc(), on_watch_failure=self.metrics.watch_failures.inc,
        )  # fmt: skip
        self.plane = DataPlane(self.models, config.state, self.metrics, config.limits)
        self.servicer = ForecasterServicer(self.plane, self.metrics)
        self.inference = InferenceServicer(self.plane, self.metrics, __version__)
        self.http = None
        if config.http_port is not None:
            from serving.oip_http import OipHttp  # aiohttp costs ~13 MiB of RSS: only when asked for

            self.http = OipHttp(self.plane, self.metrics, __version__, checker, config.max_receive_message_bytes)
        self.health = health.aio.HealthServicer()
        self.grpc = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            ],
        )
        self.grpc.add_generic_rpc_handlers((forecaster_handler(self.servicer), InferenceHandler(self.inference)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        services = (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        files = (pb.DESCRIPTOR, oip.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        reflection.enable_server_reflection(services, self.grpc, pool=reflection_pool(*files))
        self.port = 0
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._loading: asyncio.Task | None = None
        self._background: list[asyncio.Task] = []
        self._loads = 0

    def _model_changed(self, model: LoadedModel) -> None:
        self.metrics.set_model(model.name, model.version, model.provider)
        self._loads += 1
        if self._loads > 1:
            self.metrics.swaps.inc()

    async def start(self) -> int:
        """Bind the ports and accept RPCs (health NOT_SERVING); the model loads in the background.

        Raises OSError, with the address, when a port cannot be bound.
        """
        cfg = self.config
        if cfg.metrics_port is not None:
            host = cfg.metrics_bind_host
            try:
                self._metrics_http, self.metrics_port = self.metrics.serve(host, cfg.metrics_port)
            except OSError as exc:
                raise OSError(f"cannot serve metrics on {host}:{cfg.metrics_port}: {exc}") from exc
        address = f"{cfg.host}:{cfg.port}"
        try:
            if self.credentials is None:
                self.port = self.grpc.add_insecure_port(address)
            else:
                self.port = self.grpc.add_secure_port(address, self.credentials)
        except RuntimeError as exc:  # grpc reports a taken port this way
            self.port = 0
            cause = exc
        else:
            cause = None
        if self.port == 0:
            self._stop_metrics()
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port} (in use?)") from cause
        if self.http is not None:
            try:
                self.http_port = await self.http.start(cfg.host, cfg.http_port or 0, self.ssl_context, cfg.grace_s)
            except OSError:
                self._stop_metrics()
                raise
        for name in HEALTH_SERVICES:
            await self.health.set(name, NOT_SERVING)
        await self.grpc.start()
        self._loading = asyncio.get_running_loop().create_task(self._load())
        return self.port

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def _load(self) -> None:
        model = await self.models.start()
        for name in HEALTH_SERVICES:
            await self.health.set(name, SERVING)
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self.plane.run_sweeper(), name="idle-sweeper"))
        if self.models.watching:
            self._background.append(loop.create_task(self.models.watch(), name="alias-watcher"))
        log.info(
            "event=ready name=%s version=%s provider=%s watch_interval_s=%s",
            model.name, model.version, model.provider,
            self.config.source.watch_interval_s if self.models.watching else 0,
        )  # fmt: skip

    @property
    def security_summary(self) -> str:
        """The transport and token mode, for the start-up line: `security=plaintext|tls|mtls tokens=on|off`."""
        return f"security={self.config.security.mode} tokens={'on' if self.tokens else 'off'}"

    async def ready(self) -> None:
        """Wait until the model is loaded and warmed up; raises what loading raised."""
        assert self._loading is not None, "start() first"
        await asyncio.shield(self._loading)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, let in-flight ones finish (up to grace), clean up."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        self.plane.drain()
        await asyncio.gather(self.grpc.stop(grace), *([self.http.stop()] if self.http is not None else []))
        for task in [*self._background, self._loading]:
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in [*self._background, self._loading] if t), return_exceptions=True)
        await self.models.close()
        self._stop_metrics()


def _how_to_connect(config: ServerConfig, port: int, tokens: bool) -> str:
    """For the person at the terminal: the client command line that reaches this server."""
    sec = config.security
    flags = ["--tls-ca SERVER_CA.pem"] if sec.tls_cert else []
    flags += ["--tls-cert CLIENT.pem --tls-key CLIENT.key"] if sec.tls_client_ca else []
    flags += ["--token-file TOKEN_FILE"] if tokens else []
    command = f"python -m serving.client stream --target {config.host}:{port} --demo"
    command += f" {' '.join(flags)}" if flags else "   (or: make client)"
    return f"Serving forecasts on {config.host}:{port}. Stream to it with:\n  {command}\nCtrl-C stops it."


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def create_server(config: ServerConfig) -> tuple[ForecastServer, int]:
    """Build and start a server; returns it and its bound port (config.port 0 picks one)."""
    server = ForecastServer(config)
    port = await server.start()
    return server, port


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server, port = await create_server(config)
    except (OSError, ServingError) as exc:  # a port taken, unusable TLS or token files
        log.error("event=startup_failed error=%r", str(exc))
        return 1
    stopping = loop.create_task(stop.wait())
    ready = loop.create_task(server.ready())
    await asyncio.wait({stopping, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        exc = ready.exception()
        log.error("event=startup_failed error=%r", str(exc), exc_info=not isinstance(exc, ServingError))
        stopping.cancel()
        await server.stop(0)
        return 1
    if not stop.is_set():
        metrics = (
            "off" if server.metrics_port is None else f"http://{config.metrics_bind_host}:{server.metrics_port}/metrics"
        )
        scheme = "https" if server.ssl_context is not None else "http"
        http = "off" if server.http_port is None else f"{scheme}://{config.host}:{server.http_port}/v2"
        log.info(
            'event=listening msg="listening on %s:%d" %s metrics=%s oip_http=%s',
            config.host, port, server.security_summary, metrics, http,
        )  # fmt: skip
        if server.tokens and server.credentials is None and not _is_loopback(config.host):
            log.warning(
                "event=insecure_tokens host=%s msg=%r", config.host,
                "bearer tokens over plaintext on a non-loopback address travel in the clear; serve TLS",
            )  # fmt: skip
        print(_how_to_connect(config, port, server.tokens > 0), flush=True)  # logs go to stderr
        await stop.wait()
    ready.cancel()
    log.info("event=draining grace_s=%s", config.grace_s)
    await server.stop()
    log.info("event=stopped")
    return 0
