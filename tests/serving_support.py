"""Helpers for the serving tests: a real server on port 0 in a background event loop, a client
built from server reflection alone, and offline ONNX Runtime references to compare against."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from serving.config import ModelSourceConfig, RuntimeConfig, ServerConfig, StateConfig
from serving.server import ForecastServer, create_server

ROOT = Path(__file__).resolve().parents[1]
START_MS = 1_388_534_400_000
FREQ_MS = 1_800_000


def server_config(
    model_uri: str, tracking_uri: str | None = None, watch_interval_s: float = 0, **state: Any
) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        grace_s=2.0,
        source=ModelSourceConfig(model_uri=model_uri, tracking_uri=tracking_uri, watch_interval_s=watch_interval_s),
        runtime=RuntimeConfig(device="cpu"),
        state=replace(StateConfig(), **state),
    )


class RunningServer:
    """`with RunningServer(config) as s:` serves on s.port from its own thread and event loop."""

    def __init__(self, config: ServerConfig, wait_ready: bool = True) -> None:
        self.config = config
        self._wait_ready = wait_ready
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: ForecastServer | None = None
        self.port = 0

    def __enter__(self) -> RunningServer:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise self._error
        if self._wait_ready:
            self.call(self.server.ready)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server, self.port = await create_server(self.config)
        except BaseException as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.server.stop()

    def call(self, fn: Callable[[], Coroutine], timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def metrics_text(self) -> str:
        return metrics_text(self.metrics_url)

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_url, name, **labels)


def metrics_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def metric(url: str, name: str, **labels: str) -> float:
    """The first sample called name (with these labels, when given) at a /metrics URL."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text(url)):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(f"{name} {labels}")


class ServerProcess:
    """`python -m serving ARGS` as a user runs it; its output lines are collected as they come."""

    def __init__(self, *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving", *args],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: str, timeout: float = 90) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def health_status(channel: grpc.Channel, service: str = "forecast.v1.Forecaster") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ReflectionClient:
    """forecast.v1 messages and calls built only from what the server's reflection says."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = self.pool.FindServiceByName("forecast.v1.Forecaster")
        self.messages: dict[str, type] = {}
        self.calls: dict[str, Any] = {}
        for method in service.methods:
            req = message_factory.GetMessageClass(method.input_type)
            resp = message_factory.GetMessageClass(method.output_type)
            self.messages[method.input_type.name] = req
            self.messages[method.output_type.name] = resp
            kind = {
                (False, False): channel.unary_unary,
                (True, True): channel.stream_stream,
            }[(method.client_streaming, method.server_streaming)]
            self.calls[method.name] = kind(
                f"/{service.full_name}/{method.name}",
                request_serializer=req.SerializeToString,
                response_deserializer=resp.FromString,
            )
        for name in ("Observation", "SeriesHistory"):
            self.messages[name] = message_factory.GetMessageClass(
                self.pool.FindMessageTypeByName(f"forecast.v1.{name}")
            )

    def request(self, observations: list[dict]) -> Any:
        obs_cls = self.messages["Observation"]
        return self.messages["StreamRequest"](observations=[obs_cls(**o) for o in observations])


class OfflineModel:
    """The exported graphs run directly with ONNX Runtime: what the server must reproduce."""

    def __init__(self, model_dir: Path) -> None:
        self.step = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        self.sequence = ort.InferenceSession(str(model_dir / "sequence.onnx"), providers=["CPUExecutionProvider"])
        meta = self.step.get_modelmeta().custom_metadata_map
        self.state_names = meta["state"].split(",")
        inputs = {i.name: i for i in self.step.get_inputs()}
        # Each state tensor's shape with its one dynamic (batch) axis as None.
        self.state_shapes = [[d if isinstance(d, int) else None for d in inputs[n].shape] for n in self.state_names]
        self.num_cov = len([c for c in meta["covariates"].split(",") if c])
        self.quantiles = [float(q) for q in meta["quantiles"].split(",")]
        self.point_index = self.quantiles.index(float(meta["point_quantile"]))
        self.states: dict[str, list[np.ndarray]] = {}

    def zero(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros([batch if d is None else d for d in shape], np.float32) for shape in self.state_shapes]

    def step_one(self, series_id: str, ts: int, value: float, cov=()) -> np.ndarray:
        """Advance one series by one step (its own state); returns forecast [horizon, Q]."""
        feeds = {"values": np.array([value], np.float32), "timestamps_ms": np.array([ts], np.int64)}
        if self.num_cov:
            feeds["covariates"] = np.array([cov], np.float32)
        feeds.update(zip(self.state_names, self.states.get(series_id) or self.zero()))
        out = self.step.run(None, feeds)
        self.states[series_id] = out[1:]
        return out[0][0]

    def run_sequence(self, ts: list[int], values: list[float], cov=()) -> np.ndarray:
        feeds = {"values": np.array([values], np.float32), "timestamps_ms": np.array([ts], np.int64)}
        if self.num_cov:
            feeds["covariates"] = np.array(cov, np.float32).reshape(1, len(values), self.num_cov)
        feeds.update(zip(self.state_names, self.zero()))
        return self.sequence.run(["forecast"], feeds)[0][0]


class Stream:
    """One open StreamForecast call (generated stubs) driven message by message."""

    def __init__(self, stub: Any) -> None:
        from serving.proto import pb

        self._pb = pb
        self.requests: queue.Queue = queue.Queue()
        self.responses = stub.StreamForecast(iter(self.requests.get, None), timeout=120)

    def send(self, *observations: dict) -> list:
        pb = self._pb
        self.requests.put(pb.StreamRequest(observations=[pb.Observation(**o) for o in observations]))
        return list(next(self.responses).forecasts)

    def close(self) -> None:
        self.requests.put(None)
        list(self.responses)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)
