"""The Open Inference Protocol's HTTP/REST binding (KServe v2), on the server's own event loop.

aiohttp serves it next to gRPC in the same process and loop, over the same data plane (so
`--http-port` adds a listener, not a server). Routes, as Triton's (`/versions/VERSION` optional
after a model name; VERSION must be the served one):

    GET  /v2/health/live               200 {"live": true}
    GET  /v2/health/ready              200 {"ready": true}, 400 {"ready": false} (loading, draining)
    GET  /v2                           server metadata: name, version, extensions
    GET  /v2/models/NAME               model metadata: versions, platform, inputs, outputs
    GET  /v2/models/NAME/ready         200 / 400 {"name": NAME, "ready": ...}
    GET  /v2/models/NAME/config        the model configuration (as ModelConfig over gRPC)
    POST /v2/models/NAME/infer         JSON tensors in, JSON tensors out

Inference bodies are JSON: {"id": ..., "parameters": {...}, "inputs": [{"name", "shape",
"datatype", "data"}], "outputs": [{"name"}]}, data flat (or nested) in row-major order; the answer
is {"model_name", "model_version", "id", "outputs": [{"name": "forecast", "datatype": "FP32",
"shape": [B, horizon, Q], "data": [...]}]}. Without a sequence_id parameter a request is
stateless; with one it continues that server-wide sequence, as over gRPC. The binary tensor
extension is not served (a request using it is refused and told to send JSON).

Errors are {"error": MESSAGE} with the HTTP status of the one error map (serving.errors). With
--auth-token-file every route but /v2/health/* needs `Authorization: Bearer TOKEN` (the same
check as gRPC's); with --tls-cert the binding serves HTTPS with the same certificate.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from serving import oip
from serving.dataplane import DataPlane
from serving.domain import SequenceSteps
from serving.errors import InvalidInput, ServingError, Unauthenticated, Unsupported, http_status
from serving.metrics import Metrics
from serving.oip_servicer import SERVER_NAME, model_config
from serving.security import UNAUTHENTICATED_MESSAGE, TokenChecker

log = logging.getLogger(__name__)

PROTOCOL = "oip-http"  # the metrics' protocol label
HEALTH_PREFIX = "/v2/health/"
_MODEL = "/v2/models/{name}"
_VERSIONED = "/v2/models/{name}/versions/{version}"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RPC = web.RequestKey("rpc", str)  # the route's method name, for the requests metric of a refusal


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _tensor(entry: Any, index: int) -> oip.Tensor:
    """An input of a JSON request: {"name", "shape", "datatype", "data"}."""
    if not isinstance(entry, dict):
        raise InvalidInput(f"inputs[{index}] is not an object with name, shape, datatype and data")
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in entry]
    if missing:
        raise InvalidInput(f"inputs[{index}] lacks {', '.join(missing)}")
    name, shape, datatype = entry["name"], entry["shape"], entry["datatype"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers, got {shape!r}")
    if (entry.get("parameters") or {}).get("binary_data_size") is not None:
        raise Unsupported(f"input {name!r}: the binary tensor extension is not supported; send the data as JSON")
    dtype = oip.NUMPY_TYPES.get(datatype)
    if dtype is None:  # the datatype's own check names what the model takes
        return oip.Tensor(name, str(datatype), shape, [])
    try:
        data = np.asarray(entry["data"], dtype).ravel()  # nested lists are row-major too
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r}: data is not a (nested) list of {datatype} numbers ({exc})") from None
    return oip.Tensor(name, datatype, shape, data)


def _outputs(body: dict) -> list[str]:
    names = []
    for i, entry in enumerate(body.get("outputs") or []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise InvalidInput(f"outputs[{i}] is not an object with a name")
        parameters = entry.get("parameters") or {}
        if parameters.get("binary_data"):
            raise Unsupported(
                f"output {entry['name']!r}: the binary tensor extension is not supported; "
                'ask for JSON ("binary_data": false)'
            )
        oip.refuse_output_parameters(entry["name"], parameters)
        names.append(entry["name"])
    return names


class OipHttp:
    """The HTTP listener: routes over the data plane, started and stopped with the server."""

    def __init__(
        self,
        plane: DataPlane,
        metrics: Metrics,
        server_version: str,
        tokens: TokenChecker | None = None,
        max_body_bytes: int = 4 << 20,
    ) -> None:
        self._plane, self._metrics, self._version, self._tokens = plane, metrics, server_version, tokens
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=max_body_bytes)
        get = [
            ("/v2/health/live", self.live), ("/v2/health/ready", self.ready), ("/v2", self.server_metadata),
            (_MODEL, self.model_metadata), (_VERSIONED, self.model_metadata),
            (_MODEL + "/ready", self.model_ready), (_VERSIONED + "/ready", self.model_ready),
            (_MODEL + "/config", self.model_config), (_VERSIONED + "/config", self.model_config),
        ]  # fmt: skip
        for path, handler in get:
            app.router.add_get(path, handler, allow_head=False)
        app.router.add_post(_MODEL + "/infer", self.infer)
        app.router.add_post(_VERSIONED + "/infer", self.infer)
        self._runner = web.AppRunner(app, access_log=None)  # one log line per refusal, as for gRPC
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None, grace_s: float) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port. OSError when taken."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, shutdown_timeout=grace_s)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(f"cannot serve HTTP on {host}:{port}: {exc}") from exc
        self.port = self._runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stop listening; requests in flight get the grace given to start()."""
        await self._runner.cleanup()

    # -- middlewares ----------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every route but health needs a good bearer token when tokens are configured; checked
        before the route is looked at, with one message whatever was wrong (as over gRPC)."""
        if self._tokens is None or request.path.startswith(HEALTH_PREFIX):
            return await handler(request)
        if self._tokens.accepts([("authorization", request.headers.get("Authorization", ""))]):
            return await handler(request)
        self._metrics.unauthenticated.inc()
        log.info("event=http_unauthenticated path=%r peer=%s", request.path[:200], request.remote)
        raise Unauthenticated(UNAUTHENTICATED_MESSAGE)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every refusal as {"error": MESSAGE} with the status of the one error map."""
        try:
            return await handler(request)
        except web.HTTPException as exc:  # no such route or method, body too large
            if exc.status < 400:
                raise
            return _json({"error": f"{exc.reason}: {request.method} {request.path[:200]}"}, exc.status)
        except Exception as exc:
            ref = uuid.uuid4().hex[:12]
            status, code, message = http_status(exc, ref)
            if status >= 500 and not isinstance(exc, ServingError):
                log.error("event=http_failed path=%r ref=%s error=%r", request.path[:200], ref, str(exc), exc_info=exc)
            else:
                log.info("event=http_refused path=%r status=%d message=%r", request.path[:200], status, message)
            if isinstance(exc, ServingError) and exc.limit is not None:
                self._metrics.limit_refusals.labels(exc.limit).inc()
            self._metrics.finished(request.get(RPC, "http"), code.name, PROTOCOL)
            return _json({"error": message}, status)

    # -- routes ---------------------------------------------------------------------------------

    def _ok(self, request: web.Request, rpc: str) -> None:
        request[RPC] = rpc
        self._metrics.finished(rpc, "OK", PROTOCOL)

    async def live(self, request: web.Request) -> web.Response:
        self._ok(request, "ServerLive")
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        self._ok(request, "ServerReady")
        ready = self._plane.ready()
        return _json({"ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: web.Request) -> web.Response:
        self._ok(request, "ServerMetadata")
        return _json({"name": SERVER_NAME, "version": self._version, "extensions": list(oip.EXTENSIONS)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        request[RPC] = "ModelMetadata"
        d = self._plane.describe(request.match_info["name"], request.match_info.get("version", ""))
        self._ok(request, "ModelMetadata")
        tensors = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in oip.inputs_of(d.spec)]
        outputs = [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in oip.outputs_of(d.spec)]
        body = {"name": d.name, "versions": [d.version], "platform": oip.PLATFORM, "inputs": tensors}
        return _json(body | {"outputs": outputs})

    async def model_ready(self, request: web.Request) -> web.Response:
        self._ok(request, "ModelReady")
        name = request.match_info["name"]
        ready = self._plane.ready(name, request.match_info.get("version", ""))
        return _json({"name": name, "ready": ready}, 200 if ready else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        request[RPC] = "ModelConfig"
        d = self._plane.describe(request.match_info["name"], request.match_info.get("version", ""))
        config = model_config(d, self._plane.admission.idle_timeout_s)
        self._ok(request, "ModelConfig")
        return _json(json_format.MessageToDict(config, preserving_proto_field_name=True))

    async def infer(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        request[RPC] = "ModelInfer"
        if "Inference-Header-Content-Length" in request.headers:
            raise Unsupported("the binary tensor extension is not supported; send the request as JSON")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the request body is not JSON ({exc})") from None
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise InvalidInput('the request body must be a JSON object with "inputs": a list of tensors')
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput('"parameters" must be an object')
        request_id = body.get("id", "")
        name, version = request.match_info["name"], request.match_info.get("version", "")
        tensors = [_tensor(entry, i) for i, entry in enumerate(body["inputs"])]
        sequence = oip.sequence_parameters(*(parameters.get(k) for k in oip.SEQUENCE_PARAMETERS))
        work = oip.work_from(tensors, sequence, _outputs(body), self._plane.spec)
        if isinstance(work, SequenceSteps):
            groups = await self._plane.step_sequence(work, name, version)
        else:
            groups = await self._plane.forecast(work, name, version)
        model_version, forecast = oip.forecast_of(groups)
        output = {"name": oip.FORECAST, "datatype": "FP32", "shape": list(forecast.shape)}
        answer = {"model_name": name, "model_version": model_version}
        if request_id:
            answer["id"] = request_id
        answer["outputs"] = [output | {"data": forecast.ravel().tolist()}]
        self._metrics.latency("ModelInfer", PROTOCOL).observe(time.perf_counter() - started)
        self._metrics.observations("ModelInfer", PROTOCOL).inc(len(work))
        self._ok(request, "ModelInfer")
        return _json(answer)
