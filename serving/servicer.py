"""The forecast.v1.Forecaster gRPC servicer: protobuf <-> domain types, and nothing else.

Responses of Forecast and StreamForecast are written with serving.wire straight to protobuf wire
bytes (the method handlers below use an identity serializer); requests are parsed by the
generated classes, and bytes that are not a valid request are the client's error
(INVALID_ARGUMENT), not a bug. Every error leaves through `_abort`, which maps it once
(serving.errors).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from serving.dataplane import DataPlane
from serving.domain import History, Observations
from serving.errors import InvalidInput, ServingError, grpc_status
from serving.metrics import Metrics
from serving.proto import SERVICE_NAME, pb
from serving.sessions import StreamSession
from serving.wire import ForecastEncoder

log = logging.getLogger(__name__)

# From a stream's first request this large on, its next requests are read ahead (see StreamForecast).
PIPELINE_MIN_OBSERVATIONS = 32
PIPELINE_DEPTH = 2  # requests of one stream queued behind the one being answered
DRAINING_MESSAGE = "server is shutting down; reconnect (series state on this server is gone)"


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
        self._draining = False
        self._idle: set[asyncio.Task] = set()  # stream handlers with no request in flight

    async def _abort(self, context: grpc.aio.ServicerContext, rpc: str, exc: Exception) -> None:
        ref = uuid.uuid4().hex[:12]
        code, message = grpc_status(exc, ref)
        if code == grpc.StatusCode.INTERNAL:
            log.error("event=rpc_failed rpc=%s ref=%s error=%r", rpc, ref, str(exc), exc_info=exc)
        else:
            log.info("event=rpc_refused rpc=%s code=%s message=%r", rpc, code.name, message)
        if isinstance(exc, ServingError) and exc.limit is not None:
            self._metrics.limit_refusals.labels(exc.limit).inc()
        self._metrics.requests.labels(rpc, code.name).inc()
        await context.abort(code, message)

    async def Forecast(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        try:
            request = parse_forecast_request(data)
            groups = await self._plane.forecast(histories_from(request), request.model)
        except Exception as exc:
            await self._abort(context, "Forecast", exc)
        self._metrics.latency("Forecast").observe(time.perf_counter() - started)
        self._metrics.observations("Forecast").inc(len(request.series))
        self._metrics.requests.labels("Forecast", "OK").inc()
        return self._encoder.encode_groups(groups, len(request.series))

    async def StreamForecast(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Answer each request in order.

        A stream starts serial -- read a request, queue its steps, answer, read the next -- which
        costs the least per message for small requests. From its first request of
        PIPELINE_MIN_OBSERVATIONS or more, a reader task reads ahead instead: the next request is
        parsed and its steps queued while the current one runs in ORT and the previous answer is
        encoded (the session keeps each series' steps in order).
        """
        try:
            session = self._plane.open_stream()
        except Exception as exc:  # --max-streams
            await self._abort(context, "StreamForecast", exc)
        handler = asyncio.current_task()
        incoming = aiter(requests)
        inflight: asyncio.Queue | None = None  # set once the stream reads ahead
        reader: asyncio.Task | None = None
        latency = self._metrics.latency("StreamForecast")
        observed = self._metrics.observations("StreamForecast")
        messages = self._metrics.messages()
        try:
            while True:
                if inflight is None:
                    self._idle.add(handler)  # nothing in flight: drain may end the stream here
                    try:
                        request = await anext(incoming)
                    except StopAsyncIteration:
                        break
                    finally:
                        self._idle.discard(handler)
                    item = self._submit(session, request)
                    if item[2] >= PIPELINE_MIN_OBSERVATIONS:
                        inflight = asyncio.Queue(PIPELINE_DEPTH)
                        reader = asyncio.create_task(self._read(incoming, session, inflight))
                else:
                    if inflight.empty():
                        self._idle.add(handler)
                    item = await inflight.get()
                    self._idle.discard(handler)
                    if item is None:
                        break
                step, started, n = item
                answer = self._encoder.encode_groups(await step, n)
                latency.observe(time.perf_counter() - started)
                observed.inc(n)
                messages.inc()
                yield answer
                if self._draining:  # the message in flight is answered; now let the client go
                    break
        except asyncio.CancelledError:
            if not self._draining:
                raise  # the client went away
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._abort(context, "StreamForecast", exc)
        finally:
            self._idle.discard(handler)
            if reader is not None:
                reader.cancel()
            while inflight is not None and not inflight.empty():  # queued behind a failure or a drain
                item = inflight.get_nowait()
                if item is None:
                    continue
                if item[0].done():
                    item[0].cancelled() or item[0].exception()  # retrieved: no "never retrieved" log
                else:
                    item[0].cancel()
            self._plane.close_stream(session)
        if self._draining:
            self._metrics.requests.labels("StreamForecast", "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        self._metrics.requests.labels("StreamForecast", "OK").inc()

    @staticmethod
    def _submit(session: StreamSession, request: pb.StreamRequest) -> tuple[asyncio.Future, float, int]:
        """Parse a request and queue its steps: (answer future, arrival time, observations).
        A request refused before anything was queued gets a failed future, answered in order."""
        started = time.perf_counter()
        obs = observations_from(request)
        try:
            step = session.submit(obs, request.model)
        except Exception as exc:
            step = asyncio.get_running_loop().create_future()
            step.set_exception(exc)
        return step, started, len(obs)

    async def _read(
        self, requests: AsyncIterator[pb.StreamRequest], session: StreamSession, inflight: asyncio.Queue
    ) -> None:
        """Read ahead: parse requests and queue their steps as they arrive; None marks the end
        of the client's stream. The next request's ORT call can then start the moment the
        current one ends, while the handler encodes answers."""
        try:
            async for request in requests:
                await inflight.put(self._submit(session, request))
        except Exception as exc:  # reading failed: hand the error to the handler, in order
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            await inflight.put((failed, time.perf_counter(), 0))
            return
        await inflight.put(None)

    def drain(self) -> None:
        """Server shutdown: streams end after the message they are working on, idle ones now."""
        self._draining = True
        for task in list(self._idle):
            task.cancel()

    async def GetModelInfo(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            d = self._plane.describe(parse_model_info_request(data).model)
        except Exception as exc:
            await self._abort(context, "GetModelInfo", exc)
        self._metrics.requests.labels("GetModelInfo", "OK").inc()
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
