"""The forecast.v1.Forecaster gRPC servicer: protobuf <-> domain types, and nothing else.

Responses of Forecast and StreamForecast are written with serving.wire straight to protobuf wire
bytes (the method handlers below use an identity serializer); requests are parsed by the
generated classes, and bytes that are not a valid request are the client's error
(INVALID_ARGUMENT), not a bug. A stream's flow control, ordering and draining are the data
plane's (serving.streams); an error ends the stream. Every error leaves through `_abort`, which
maps it once (serving.errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from serving.dataplane import DataPlane
from serving.domain import History, Observations, Request
from serving.errors import InvalidInput, ServingError, grpc_status
from serving.metrics import Metrics
from serving.proto import SERVICE_NAME, pb
from serving.wire import ForecastEncoder

log = logging.getLogger(__name__)

PROTOCOL = "forecast.v1"  # the metrics' protocol label


def parser(cls: type[Message]) -> Callable[[bytes], Message]:
    """Request bytes -> `cls`, or InvalidInput saying they are not one (a malformed message,
    invalid UTF-8 in a string). grpcio answers a deserializer's exception with UNKNOWN or, inside
    a stream, hands it to the handler, so the handlers parse with this themselves."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message:
        try:
            return cls.FromString(data)
        except DecodeError:
            raise InvalidInput(
                f"cannot parse the request as {name} ({len(data)} bytes): not protobuf wire format of that "
                "message, or a string field that is not valid UTF-8"
            ) from None

    return parse


parse_forecast_request = parser(pb.ForecastRequest)
parse_model_info_request = parser(pb.GetModelInfoRequest)


def observations_from(request: pb.StreamRequest) -> Observations:
    # One pass over the messages: field access is the per-observation cost that matters here.
    # The repeated covariates stay protobuf containers until the batch is assembled.
    observations = request.observations
    if len(observations) == 1:  # one observation per message: no zip and unpacking
        o = observations[0]
        return Observations((o.series_id,), (o.timestamp_ms,), (o.value,), (o.covariates,), (o.reset,), (o.end,))
    fields = [(o.series_id, o.timestamp_ms, o.value, o.covariates, o.reset, o.end) for o in observations]
    if not fields:
        return Observations([], [], [], [], [], [])
    ids, ts, values, covariates, reset, end = zip(*fields)
    return Observations(ids, ts, values, covariates, reset, end)


def stream_request(request: pb.StreamRequest) -> Request:
    return Request(observations_from(request), request.model)


def histories_from(request: pb.ForecastRequest) -> list[History]:
    return [
        History(
            series_id=s.series_id,
            timestamps_ms=np.array(s.timestamps_ms, np.int64),
            values=np.array(s.values, np.float32),
            covariates=np.array(s.covariates, np.float32),
        )
        for s in request.series
    ]


class ForecasterServicer:
    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self._plane = plane
        self._metrics = metrics
        self._encoder = ForecastEncoder()

    async def _abort(self, context: grpc.aio.ServicerContext, rpc: str, exc: Exception) -> None:
        ref = uuid.uuid4().hex[:12]
        code, message = grpc_status(exc, ref)
        if code == grpc.StatusCode.INTERNAL:
            log.error("event=rpc_failed rpc=%s ref=%s error=%r", rpc, ref, str(exc), exc_info=exc)
        else:
            log.info("event=rpc_refused rpc=%s code=%s message=%r", rpc, code.name, message)
        if isinstance(exc, ServingError) and exc.limit is not None:
            self._metrics.limit_refusals.labels(exc.limit).inc()
        self._metrics.finished(rpc, code.name, PROTOCOL)
        await context.abort(code, message)

    async def Forecast(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        try:
            request = parse_forecast_request(data)
            groups = await self._plane.forecast(histories_from(request), request.model)
        except Exception as exc:
            await self._abort(context, "Forecast", exc)
        self._metrics.latency("Forecast", PROTOCOL).observe(time.perf_counter() - started)
        self._metrics.observations("Forecast", PROTOCOL).inc(len(request.series))
        self._metrics.finished("Forecast", "OK", PROTOCOL)
        return self._encoder.encode_groups(groups, len(request.series))

    async def StreamForecast(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Answer each request in order; the first refused request ends the stream."""
        try:
            stream = self._plane.open_stream()
        except Exception as exc:  # --max-streams
            await self._abort(context, "StreamForecast", exc)
        latency = self._metrics.latency("StreamForecast", PROTOCOL)
        observed = self._metrics.observations("StreamForecast", PROTOCOL)
        messages = self._metrics.messages(PROTOCOL)
        encode = self._encoder.encode_groups
        try:
            async with contextlib.aclosing(stream.answers(requests, stream_request)) as answers:
                async for answer in answers:
                    if answer.error is not None:
                        raise answer.error
                    data = encode(answer.groups, answer.size)
                    latency.observe(time.perf_counter() - answer.started)
                    observed.inc(answer.size)
                    messages.inc()
                    yield data
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise  # the client went away, or the call was already ended
        except Exception as exc:  # a refused request, draining (UNAVAILABLE), a failed read
            await self._abort(context, "StreamForecast", exc)
        finally:
            stream.close()
        self._metrics.finished("StreamForecast", "OK", PROTOCOL)

    async def GetModelInfo(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            d = self._plane.describe(parse_model_info_request(data).model)
        except Exception as exc:
            await self._abort(context, "GetModelInfo", exc)
        self._metrics.finished("GetModelInfo", "OK", PROTOCOL)
        s = d.spec
        return pb.ModelInfo(
            name=d.name, version=d.version, cell=s.cell, horizon=s.horizon, quantiles=s.quantiles,
            freq_ms=s.freq_ms, covariates=s.covariates, execution_provider=d.execution_provider,
            num_layers=s.num_layers, hidden_size=s.hidden_size, target=s.target,
            mlflow_run_id=s.mlflow_run_id, state=s.state_names, point_quantile=s.point_quantile,
            season=s.season or 0, lags=s.lags, state_bytes_per_series=d.state_bytes_per_series,
        )  # fmt: skip


def _identity(data: bytes) -> bytes:
    return data


def forecaster_handler(servicer: ForecasterServicer) -> grpc.GenericRpcHandler:
    """The service's method handlers; Forecast/StreamForecast answers are pre-encoded bytes.

    Unary requests reach their handlers as bytes, parsed there (an exception in a unary
    deserializer never reaches the handler: grpcio answers UNKNOWN). A stream's requests are
    parsed as they are read, inside the handler, where a failure is a client error like any other.
    """
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Forecast": grpc.unary_unary_rpc_method_handler(servicer.Forecast, _identity, _identity),
            "StreamForecast": grpc.stream_stream_rpc_method_handler(
                servicer.StreamForecast, parser(pb.StreamRequest), _identity
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                servicer.GetModelInfo, _identity, pb.ModelInfo.SerializeToString
            ),
        },
    )
