"""inference.GRPCInferenceService (the Open Inference Protocol over gRPC): protobuf <-> domain.

Requests are parsed by the generated classes into `oip.Tensor`s and parameter values, which
serving.oip turns into the data plane's work; ModelInfer and ModelStreamInfer answers are written
as wire bytes by serving.oip_wire (their handlers use an identity serializer). A stream's flow
control, ordering and draining are the data plane's (serving.streams), as for forecast.v1, and
its sequences are the data plane's server-wide ones: a unary ModelInfer naming a sequence
continues it too. Inside ModelStreamInfer a refused request is answered in its place with
`error_message` (naming the request id) and the stream goes on; draining and read failures end
it with a status. Unary errors get the status of the one error map (serving.errors), as
forecast.v1's do. Triton's other RPCs answer UNIMPLEMENTED, saying what is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from serving import oip
from serving.dataplane import DataPlane
from serving.domain import Answer, Request, SequenceSteps
from serving.errors import InvalidInput, ServingError, Unsupported, grpc_status
from serving.metrics import Metrics
from serving.oip_wire import infer_response, stream_error
from serving.proto import OIP_SERVICE_NAME, oip_config
from serving.proto import oip as pb

log = logging.getLogger(__name__)

PROTOCOL = "oip-grpc"  # the metrics' protocol label
SERVER_NAME = "streamcast"
# Typed contents field for each datatype the inputs may have (any other is refused by its name).
_CONTENTS = {"FP32": "fp32_contents", "INT64": "int64_contents"}
_CONFIG_TYPES = {"FP32": oip_config.TYPE_FP32, "INT64": oip_config.TYPE_INT64}


_NO_SEQUENCE = (None, False, False)


def _parameter(p: pb.InferParameter | None) -> Any:
    if p is None:
        return None
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which is not None else None


def _flag(p: pb.InferParameter | None) -> Any:
    """A boolean parameter's value (any other kind of value as is, for the refusal's message)."""
    if p is None:
        return None
    return p.bool_param if p.HasField("bool_param") else _parameter(p)


def request_from(m: pb.ModelInferRequest, spec: Any = None) -> Request:
    """The domain request of a ModelInferRequest; a request that cannot be converted carries
    the error that refused it (answered in its place). The tag is (request id, model name).

    Field access on the generated classes is the cost here (a ModelStreamInfer message of one
    observation pays it every time), so the usual request -- raw contents, one per input -- reads
    each field once and nothing it does not need.
    """
    try:
        sequence = _NO_SEQUENCE
        params = m.parameters
        if params:  # only these parameters mean anything here; others (priority, timeout) are ignored
            get = params.get
            sequence = oip.sequence_parameters(
                _parameter(get("sequence_id")), _flag(get("sequence_start")), _flag(get("sequence_end"))
            )
        raw, inputs = m.raw_input_contents, m.inputs
        if raw and len(raw) == len(inputs):
            tensors = [oip.Tensor(x.name, x.datatype, x.shape, data) for x, data in zip(inputs, raw)]
        else:
            tensors = _typed_tensors(inputs, raw)
        outputs = []
        for o in m.outputs:
            oip.refuse_output_parameters(o.name, o.parameters)
            outputs.append(o.name)
        work = oip.work_from(tensors, sequence, outputs, spec)
    except ServingError as exc:
        work = exc
    return Request(work, m.model_name, m.model_version, (m.id, m.model_name))


def _typed_tensors(inputs: Any, raw: Any) -> list[oip.Tensor]:
    """Inputs whose data is in their typed `contents` (no raw_input_contents)."""
    for x in inputs:
        if x.parameters:
            oip.refuse_output_parameters(x.name, x.parameters)  # e.g. shared memory for an input
    if raw:
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(inputs)} inputs; give one per input")
    return [
        oip.Tensor(x.name, x.datatype, x.shape, getattr(x.contents, _CONTENTS.get(x.datatype, "bytes_contents")))
        for x in inputs
    ]


class InferenceServicer:
    def __init__(self, plane: DataPlane, metrics: Metrics, server_version: str) -> None:
        self._plane = plane
        self._metrics = metrics
        self._server_version = server_version

    def _parse(self, m: pb.ModelInferRequest) -> Request:
        return request_from(m, self._plane.spec)

    def _log_refusal(self, rpc: str, exc: Exception) -> tuple[grpc.StatusCode, str]:
        ref = uuid.uuid4().hex[:12]
        code, message = grpc_status(exc, ref)
        if code == grpc.StatusCode.INTERNAL:
            log.error("event=rpc_failed rpc=%s ref=%s error=%r", rpc, ref, str(exc), exc_info=exc)
        else:
            log.info("event=rpc_refused rpc=%s code=%s message=%r", rpc, code.name, message)
        if isinstance(exc, ServingError) and exc.limit is not None:
            self._metrics.limit_refusals.labels(exc.limit).inc()
        return code, message

    async def _abort(self, context: grpc.aio.ServicerContext, rpc: str, exc: Exception) -> None:
        code, message = self._log_refusal(rpc, exc)
        self._metrics.finished(rpc, code.name, PROTOCOL)
        await context.abort(code, message)

    def _answer(self, answer: Answer, stream: bool = False) -> bytes:
        """The ModelInferResponse bytes of an answered request (in a ModelStreamInferResponse)."""
        request_id, model_name = answer.tag
        version, forecast = oip.forecast_of(answer.groups)
        return infer_response(
            model_name or self._plane.models.get().name, version, request_id, oip.FORECAST, "FP32",
            forecast.shape, forecast.tobytes(), stream,
        )  # fmt: skip

    # -- health and metadata ------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        self._metrics.finished("ServerLive", "OK", PROTOCOL)
        return pb.ServerLiveResponse(live=True)  # it answers, so it is live

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        self._metrics.finished("ServerReady", "OK", PROTOCOL)
        return pb.ServerReadyResponse(ready=self._plane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        self._metrics.finished("ModelReady", "OK", PROTOCOL)
        return pb.ModelReadyResponse(ready=self._plane.ready(request.name, request.version))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        self._metrics.finished("ServerMetadata", "OK", PROTOCOL)
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._server_version, extensions=oip.EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        try:
            d = self._plane.describe(request.name, request.version)
        except Exception as exc:
            await self._abort(context, "ModelMetadata", exc)
        self._metrics.finished("ModelMetadata", "OK", PROTOCOL)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=d.name, versions=[d.version], platform=oip.PLATFORM,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in oip.inputs_of(d.spec)],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in oip.outputs_of(d.spec)],
        )  # fmt: skip

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        try:
            d = self._plane.describe(request.name, request.version)
        except Exception as exc:
            await self._abort(context, "ModelConfig", exc)
        self._metrics.finished("ModelConfig", "OK", PROTOCOL)
        return pb.ModelConfigResponse(config=model_config(d, self._plane.admission.idle_timeout_s))

    # -- inference ----------------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        parsed = self._parse(request)
        work = parsed.work
        try:
            if isinstance(work, Exception):
                raise work
            if isinstance(work, SequenceSteps):
                groups = await self._plane.step_sequence(work, parsed.model, parsed.version)
            else:
                groups = await self._plane.forecast(work, parsed.model, parsed.version)
        except Exception as exc:
            await self._abort(context, "ModelInfer", exc)
        data = self._answer(Answer(groups, None, len(work), started, parsed.tag))
        self._metrics.latency("ModelInfer", PROTOCOL).observe(time.perf_counter() - started)
        self._metrics.observations("ModelInfer", PROTOCOL).inc(len(work))
        self._metrics.finished("ModelInfer", "OK", PROTOCOL)
        return data

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Answer each request in order; a refused one gets error_message, and the stream goes on."""
        try:
            stream = self._plane.open_stream()
        except Exception as exc:  # --max-streams
            await self._abort(context, "ModelStreamInfer", exc)
        latency = self._metrics.latency("ModelStreamInfer", PROTOCOL)
        observed = self._metrics.observations("ModelStreamInfer", PROTOCOL)
        messages = self._metrics.messages(PROTOCOL)
        try:
            async with contextlib.aclosing(stream.answers(requests, self._parse)) as answers:
                async for answer in answers:
                    if answer.error is None:
                        data = self._answer(answer, stream=True)
                        observed.inc(answer.size)
                    else:
                        data = self._stream_error(answer)
                    latency.observe(time.perf_counter() - answer.started)
                    messages.inc()
                    yield data
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise  # the client went away, or the call was already ended
        except Exception as exc:  # draining (UNAVAILABLE), a failed read
            await self._abort(context, "ModelStreamInfer", exc)
        finally:
            stream.close()
        self._metrics.finished("ModelStreamInfer", "OK", PROTOCOL)

    def _stream_error(self, answer: Answer) -> bytes:
        request_id, model_name = answer.tag if answer.tag is not None else ("", "")
        _, message = self._log_refusal("ModelStreamInfer", answer.error)
        if request_id:
            message = f"request {request_id!r}: {message}"
        current = self._plane.models.current
        return stream_error(message, model_name or (current.name if current else ""), "", request_id)


def model_config(d: Any, idle_timeout_s: float) -> oip_config.ModelConfig:
    """The ModelConfig clients of Triton expect: the inputs and output without their batch
    dimension (max_batch_size > 0), and a sequence_batching section with the idle timeout and the
    recurrent state tensors the server keeps per sequence."""
    state = [
        oip_config.ModelSequenceBatching.State(
            input_name=t.name, output_name=f"{t.name}_out", data_type=oip_config.TYPE_FP32,
            dims=[dim for axis, dim in enumerate(t.shape) if axis != t.batch_axis],
        )
        for t in d.state
    ]  # fmt: skip
    return oip_config.ModelConfig(
        name=d.name, platform=oip.PLATFORM, backend=oip.BACKEND, max_batch_size=d.max_batch_size,
        input=[
            oip_config.ModelInput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:])
            for t in oip.inputs_of(d.spec)
        ],
        output=[
            oip_config.ModelOutput(name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.shape[1:])
            for t in oip.outputs_of(d.spec)
        ],
        sequence_batching=oip_config.ModelSequenceBatching(
            max_sequence_idle_microseconds=oip.idle_microseconds(idle_timeout_s), state=state
        ),
    )  # fmt: skip


def _identity(data: bytes) -> bytes:
    return data


class InferenceHandler(grpc.GenericRpcHandler):
    """The service's method handlers; any other method of the service answers UNIMPLEMENTED,
    naming the methods that are served (Triton's statistics, repository, shared memory...)."""

    def __init__(self, servicer: InferenceServicer) -> None:
        s = servicer
        unary: dict[str, tuple[Callable, Any, Any]] = {
            "ServerLive": (s.ServerLive, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (s.ServerReady, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (s.ModelReady, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (s.ServerMetadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (s.ModelMetadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelConfig": (s.ModelConfig, pb.ModelConfigRequest, pb.ModelConfigResponse),
        }
        self._handlers = {
            name: grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)
            for name, (fn, req, resp) in unary.items()
        }
        self._handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
            s.ModelInfer, pb.ModelInferRequest.FromString, _identity
        )
        self._handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            s.ModelStreamInfer, pb.ModelInferRequest.FromString, _identity
        )
        self._prefix = f"/{OIP_SERVICE_NAME}/"
        self._metrics = servicer._metrics

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(self._prefix):
            return None
        name = method[len(self._prefix) :]
        return self._handlers.get(name) or self._unimplemented(name)

    def _unimplemented(self, name: str) -> grpc.RpcMethodHandler:
        served = ", ".join(self._handlers)
        refusal = Unsupported(f"{OIP_SERVICE_NAME}/{name[:100]} is not implemented by this server; it serves {served}")

        async def refuse(requests: object, context: grpc.aio.ServicerContext) -> None:
            code, message = grpc_status(refusal, ref="-")
            log.info("event=rpc_refused rpc=%s code=%s", name[:100], code.name)
            self._metrics.finished("unimplemented", code.name, PROTOCOL)
            await context.abort(code, message)

        return grpc.stream_stream_rpc_method_handler(refuse)  # fits any method; reads no request
