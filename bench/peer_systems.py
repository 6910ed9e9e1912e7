"""The systems bench/peers.py compares: how each is started on loopback, fed and read.

Each system is a real server in its own process (tree): this project's server, MLflow's scoring
server, MLServer and NVIDIA Triton. A system is a process tree (for CPU and memory) plus a
protocol: how one observation (stateful systems) or one window ending at an observation
(stateless systems) becomes request bytes, and how the answer's forecast [horizon, Q] is read
back. Requests are built with each protocol's own message classes (tritonclient's for the Open
Inference Protocol, the same bytes tritonclient sends), and sent by one raw-bytes client for all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import InferInput
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc._utils import _get_inference_request

from serving.proto import pb

ROOT = Path(__file__).resolve().parents[1]
MODEL = "forecaster"  # the registered model's name, which every system serves under
V1_STREAM = "/forecast.v1.Forecaster/StreamForecast"
OIP_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
OIP_LIVE = "/inference.GRPCInferenceService/ServerLive"


class Unavailable(RuntimeError):
    """A system cannot be installed or started here; the message says why (it goes in the table)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes ----------------------------------------------------------------------------------------


class Proc:
    """A server process in its own session (so stopping it stops its workers and stubs too), its
    output in a log file. CPU and memory are those of its whole process tree."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log_dir / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip

    def wait_for(self, ready: Callable[[], bool | re.Match], timeout_s: float = 180) -> bool | re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"{self.name} exited with {self.proc.returncode} while starting: {self.tail()}")
            if found := ready():
                return found
            time.sleep(0.2)
        raise Unavailable(f"{self.name} not ready in {timeout_s:.0f} s: {self.tail()}")

    def wait_for_line(self, pattern: str, timeout_s: float = 180) -> re.Match:
        return self.wait_for(lambda: re.search(pattern, self.log.read_text(errors="replace")), timeout_s)

    def tail(self, lines: int = 8) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])

    def pids(self) -> list[int]:
        """This process and every descendant (python-backend stubs, MLServer and uvicorn workers)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid, rest = stat.read_text().split(" ", 1)
                ppid = int(rest.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # a process that ended meanwhile
            children.setdefault(ppid, []).append(int(pid))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU of the live process tree, all threads."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        """Resident memory of the process tree, MiB (shared pages counted once per process)."""
        total = 0
        for pid in self.pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            if m := re.search(r"^VmRSS:\s+(\d+)", status, re.M):
                total += int(m.group(1))
        return total / 1024

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stubs or workers left behind by the leader
        self._out.close()
        return self.proc.returncode


# -- the data every system is fed ------------------------------------------------------------------------

START_MS, FREQ_MS = 1_388_534_400_000, 1_800_000  # 2014-01-01 00:00 UTC, half-hours


def series_values(k: int, start: int, stop: int) -> np.ndarray:
    """float32 [stop - start]: steps start..stop-1 of series k, demand-like (GW): a daily cycle,
    a weekend dip, each series its own phase and level; deterministic, so any step can be rebuilt."""
    i = np.arange(start, stop, dtype=np.float64)
    weekend = ((i // 48 + 2) % 7) >= 5  # 2014-01-01 was a Wednesday
    level = 4.5 + 0.25 * np.sin(k * 0.7)
    wiggle = 0.05 * np.sin(i * 1.7 + k * 3.1) * np.cos(i * 0.31 + k)
    return (level + 0.8 * np.sin(2 * np.pi * (i + 7 * k) / 48) - 0.3 * weekend + wiggle).astype(np.float32)


def series_timestamps(start: int, stop: int) -> np.ndarray:
    return START_MS + np.arange(start, stop, dtype=np.int64) * FREQ_MS


# -- protocols ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """How a system is spoken to. Stateful: ``encode(k, i, sid, start, end)`` is observation i of
    series k (sequence or series id ``sid``); stateless: the window of ``window`` steps ending at i.
    ``decode(answer)`` -> float32 [horizon, Q]. ``transport``: "stream" (one gRPC stream per
    series, ping-pong), "unary" (one gRPC call per request) or "http" (one POST per request)."""

    stateful: bool
    transport: str
    path: str
    encode: Callable[..., bytes]
    decode: Callable[[bytes], np.ndarray]


def _quantile_order(quantiles: list[float]) -> list[float]:
    return sorted(quantiles)


def v1_protocol() -> Protocol:
    def encode(k: int, i: int, sid, start: bool = False, end: bool = False) -> bytes:
        obs = pb.Observation(series_id=str(sid), timestamp_ms=int(series_timestamps(i, i + 1)[0]),
                             value=float(series_values(k, i, i + 1)[0]), end=end)  # fmt: skip
        return pb.StreamRequest(observations=[obs]).SerializeToString()

    def decode(answer: bytes) -> np.ndarray:
        f = pb.StreamResponse.FromString(answer).forecasts[0]
        return np.array([list(q.values) for q in sorted(f.quantiles, key=lambda q: q.quantile)], np.float32).T

    return Protocol(True, "stream", V1_STREAM, encode, decode)


def _oip_request(arrays: dict[str, np.ndarray], **sequence) -> bytes:
    """A ModelInferRequest built by tritonclient's own request code (raw input contents)."""
    inputs = []
    for name, arr in arrays.items():
        inp = InferInput(name, list(arr.shape), "FP32" if arr.dtype == np.float32 else "INT64")
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    request = _get_inference_request(
        model_name=MODEL, inputs=inputs, model_version="", request_id="", outputs=None,
        sequence_id=sequence.get("sequence_id", 0), sequence_start=sequence.get("sequence_start", False),
        sequence_end=sequence.get("sequence_end", False), priority=0, timeout=None, parameters=None,
    )  # fmt: skip
    return request.SerializeToString()


def decode_oip(answer: bytes, horizon: int, q: int) -> np.ndarray:
    """The `forecast` output of a ModelInferResponse (or of a ModelStreamInferResponse's
    infer_response): raw FP32 [1, horizon, Q]."""
    response = oip.ModelInferResponse.FromString(answer)
    for j, out in enumerate(response.outputs):
        if out.name == "forecast":
            raw = response.raw_output_contents[j] if response.raw_output_contents else None
            data = np.frombuffer(raw, np.float32) if raw is not None else np.asarray(out.contents.fp32_contents)
            return data.reshape(horizon, q).astype(np.float32)
    raise ValueError(f"no 'forecast' output in the answer ({[o.name for o in response.outputs]})")


def decode_oip_stream(answer: bytes, horizon: int, q: int) -> np.ndarray:
    message = oip.ModelStreamInferResponse.FromString(answer)
    if message.error_message:
        raise RuntimeError(f"ModelStreamInfer error: {message.error_message}")
    return decode_oip(message.infer_response.SerializeToString(), horizon, q)


def oip_sequence_protocol(horizon: int, q: int) -> Protocol:
    """ModelStreamInfer, one step per request, sequence id and start/end parameters (as
    tritonclient's async_stream_infer sends them): this server's OIP and Triton alike."""

    def encode(k: int, i: int, sid, start: bool = False, end: bool = False) -> bytes:
        arrays = {
            "values": series_values(k, i, i + 1).reshape(1, 1),
            "timestamps_ms": series_timestamps(i, i + 1).reshape(1, 1),
        }
        return _oip_request(arrays, sequence_id=int(sid), sequence_start=start, sequence_end=end)

    return Protocol(True, "stream", OIP_STREAM, encode, lambda a: decode_oip_stream(a, horizon, q))


def oip_window_protocol(horizon: int, q: int, window: int) -> Protocol:
    def encode(k: int, i: int, sid=None, start: bool = False, end: bool = False) -> bytes:
        lo = i + 1 - window
        arrays = {"values": series_values(k, lo, i + 1)[None], "timestamps_ms": series_timestamps(lo, i + 1)[None]}
        return _oip_request(arrays)

    return Protocol(False, "unary", OIP_INFER, encode, lambda a: decode_oip(a, horizon, q))


def _iso(ts_ms: np.ndarray) -> list[str]:
    return [str(t) for t in ts_ms.astype("datetime64[ms]").astype("datetime64[s]")]


def mlflow_protocol(columns: dict[str, str], quantile_cols: list[str], window: int) -> Protocol:
    """`mlflow models serve` on the forecasting pyfunc: dataframe_split JSON, one series' window."""

    def encode(k: int, i: int, sid=None, start: bool = False, end: bool = False) -> bytes:
        lo = i + 1 - window
        values = series_values(k, lo, i + 1).tolist()
        rows = [[f"s{k}", t, v] for t, v in zip(_iso(series_timestamps(lo, i + 1)), values)]
        cols = [columns["series"], columns["timestamp"], columns["value"]]
        return json.dumps({"dataframe_split": {"columns": cols, "data": rows}}).encode()

    def decode(answer: bytes) -> np.ndarray:
        records = json.loads(answer)["predictions"]
        return np.array([[r[c] for c in quantile_cols] for r in records], np.float32)

    return Protocol(False, "http", "/invocations", encode, decode)


def mlserver_protocol(columns: dict[str, str], quantile_cols: list[str], window: int) -> Protocol:
    """MLServer's V2 gRPC ModelInfer on its MLflow runtime: one column per input tensor, decoded
    by MLServer into the pyfunc's DataFrame (content types as its signature-derived metadata says)."""

    def encode(k: int, i: int, sid=None, start: bool = False, end: bool = False) -> bytes:
        lo = i + 1 - window
        request = oip.ModelInferRequest(model_name=MODEL)
        request.parameters["content_type"].string_param = "pd"
        sid_in = request.inputs.add(name=columns["series"], datatype="BYTES", shape=[window, 1])
        sid_in.parameters["content_type"].string_param = "str"
        sid_in.contents.bytes_contents.extend([f"s{k}".encode()] * window)
        ts_in = request.inputs.add(name=columns["timestamp"], datatype="BYTES", shape=[window, 1])
        ts_in.parameters["content_type"].string_param = "datetime"
        ts_in.contents.bytes_contents.extend(t.encode() for t in _iso(series_timestamps(lo, i + 1)))
        v_in = request.inputs.add(name=columns["value"], datatype="FP64", shape=[window, 1])
        v_in.contents.fp64_contents.extend(series_values(k, lo, i + 1).astype(np.float64).tolist())
        return request.SerializeToString()

    def decode(answer: bytes) -> np.ndarray:
        response = oip.ModelInferResponse.FromString(answer)
        cols = {}
        for j, out in enumerate(response.outputs):
            if out.name in quantile_cols:
                if response.raw_output_contents:
                    dtype = np.float32 if out.datatype == "FP32" else np.float64
                    cols[out.name] = np.frombuffer(response.raw_output_contents[j], dtype)
                else:
                    cols[out.name] = np.asarray(out.contents.fp32_contents or out.contents.fp64_contents)
        return np.stack([cols[c] for c in quantile_cols], axis=1).astype(np.float32)

    return Protocol(False, "unary", OIP_INFER, encode, decode)


# -- the systems ----------------------------------------------------------------------------------------------


@dataclass
class System:
    name: str
    protocol: Protocol | None
    target: str = ""  # host:port (gRPC) or http://host:port
    procs: list[Proc] = field(default_factory=list)
    note: str = ""
    unavailable: str = ""  # why it could not run here (then protocol is None)
    # Starts the server again after it died (peers only: a crash of this project's server is
    # reported, never papered over); each death is noted in `crashes` for the table.
    restart: Callable[[], tuple[Proc, str]] | None = None
    crashes: list[str] = field(default_factory=list)

    def ensure_running(self) -> bool:
        """True if every process is alive, after restarting a dead peer if it can be restarted."""
        dead = [p for p in self.procs if p.proc.poll() is not None]
        if not dead:
            return True
        signal_line = re.findall(r"^.*(?:Signal \(\d+\)|Error|error).*$", dead[0].log.read_text(errors="replace"), re.M)
        self.crashes.append(f"{dead[0].name} exited with {dead[0].proc.returncode}"
                            + (f" ({signal_line[0].strip()[:120]})" if signal_line else ""))  # fmt: skip
        if self.restart is None:
            return False
        for p in self.procs:
            p.stop()
        dead[0].log.rename(dead[0].log.with_suffix(f".crash{len(self.crashes)}.log"))  # kept for the reader
        proc, self.target = self.restart()
        self.procs = [proc]
        return True

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)

    def rss_mib(self) -> float:
        return sum(p.rss_mib() for p in self.procs)


def oip_served(target: str) -> bool:
    """Does the server at target serve inference.GRPCInferenceService (the Open Inference Protocol)?"""
    with grpc.insecure_channel(target) as channel:
        live = channel.unary_unary(OIP_LIVE, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            live(oip.ServerLiveRequest().SerializeToString(), timeout=10)
            return True
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return False
            raise


def start_this_server(model_uri: str, tracking_uri: str, log_dir: Path) -> tuple[Proc, str]:
    proc = Proc(
        "forecast server",
        [sys.executable, "-m", "serving", "--model-uri", model_uri, "--tracking-uri", tracking_uri, "--port", "0",
         "--metrics-port", "-1", "--device", "cpu", "--watch-interval-s", "0"],
        log_dir,
    )  # fmt: skip
    return proc, proc.wait_for_line(r"listening on ([\d.]+:\d+)").group(1)


def _wait_model_ready(target: str) -> Callable[[], bool]:
    """A readiness probe for V2 servers: ModelReady for the model, over gRPC."""

    def ready() -> bool:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelReady",
                request_serializer=lambda b: b, response_deserializer=oip.ModelReadyResponse.FromString,
            )  # fmt: skip
            try:
                return call(oip.ModelReadyRequest(name=MODEL).SerializeToString(), timeout=5).ready
            except grpc.RpcError:
                return False

    return ready


def _env(python: Path) -> dict[str, str]:
    # The peers' environment first on PATH: mlflow models serve execs `uvicorn`, MLServer its workers.
    return {"PATH": f"{python.parent}:{os.environ['PATH']}", "GIT_PYTHON_REFRESH": "quiet"}


def start_mlflow_serve(python: Path, forecasting_uri: str, tracking_uri: str, log_dir: Path) -> tuple[Proc, str]:
    port = free_port()
    mlflow = python.parent / "mlflow"
    proc = Proc(
        "mlflow models serve",
        [str(mlflow), "models", "serve", "-m", forecasting_uri, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)],
        log_dir, env={"MLFLOW_TRACKING_URI": tracking_uri, **_env(python)},
    )  # fmt: skip

    def ping() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    proc.wait_for(ping)
    return proc, f"http://127.0.0.1:{port}"


def start_mlserver(python: Path, forecasting_dir: Path, work: Path, log_dir: Path) -> tuple[Proc, str]:
    """MLServer with its MLflow runtime on a local copy of the forecasting pyfunc, server defaults
    otherwise (one parallel inference worker), REST and metrics on free loopback ports too.

    The copy's loader module is bench/mlserver_adapter.py (the same forecast, its datetime and
    string columns as strings), because MLServer's pandas codec cannot encode them."""
    home = Path(tempfile.mkdtemp(prefix="mlserver-", dir=work))  # a fresh one for each (re)start
    adapted = home / "pyfunc"
    shutil.copytree(forecasting_dir, adapted)
    shutil.copy(Path(__file__).with_name("mlserver_adapter.py"), adapted / "code" / "mlserver_adapter.py")
    mlmodel = adapted / "MLmodel"
    text = mlmodel.read_text()
    if "loader_module: forecasting_pyfunc" not in text:
        raise Unavailable(f"unexpected pyfunc layout, no forecasting_pyfunc loader in {mlmodel}")
    mlmodel.write_text(text.replace("loader_module: forecasting_pyfunc", "loader_module: mlserver_adapter"))
    grpc_port = free_port()
    settings = {"host": "127.0.0.1", "http_port": free_port(), "grpc_port": grpc_port, "metrics_port": free_port(),
                "debug": False}  # fmt: skip
    (home / "settings.json").write_text(json.dumps(settings))
    model = {
        "name": MODEL,
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": str(adapted)},
    }
    (home / "model-settings.json").write_text(json.dumps(model))
    proc = Proc("MLServer", [str(python.parent / "mlserver"), "start", str(home)], log_dir, env=_env(python))
    target = f"127.0.0.1:{grpc_port}"
    proc.wait_for(_wait_model_ready(target))
    return proc, target


TRITON_CONFIG = """name: "{model}"
backend: "python"
max_batch_size: {max_batch}
input [
  {{ name: "values" data_type: TYPE_FP32 dims: [ 1 ] }},
  {{ name: "timestamps_ms" data_type: TYPE_INT64 dims: [ 1 ] }}
]
output [ {{ name: "forecast" data_type: TYPE_FP32 dims: [ {horizon}, {q} ] }} ]
sequence_batching {{
  max_sequence_idle_microseconds: 600000000
  oldest {{ max_candidate_sequences: {capacity} max_queue_delay_microseconds: 0 }}
  control_input [
    {{ name: "START" control [ {{ kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "END" control [ {{ kind: CONTROL_SEQUENCE_END fp32_false_true: [ 0, 1 ] }} ] }},
    {{ name: "CORRID" control [ {{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }} ] }}
  ]
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
"""


def start_triton(python: Path, step_graph: Path, horizon: int, q: int, work: Path, log_dir: Path) -> tuple[Proc, str]:
    """The nvidia-pytriton wheel's tritonserver, CPU only, with the python backend (its 3.11 stub
    copied in) and one model: bench/triton_model.py over the registered step graph, behind the
    sequence batcher (Oldest strategy: steps of different sequences batched together, each
    sequence's steps in order). gRPC on a free loopback port; HTTP and metrics off."""
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    bundled = site / "pytriton" / "tritonserver"
    binary = bundled / "bin" / "tritonserver"
    stub = (
        bundled
        / "python_backend_stubs"
        / f"{sys.version_info.major}.{sys.version_info.minor}"
        / "triton_python_backend_stub"
    )
    if not binary.exists() or not stub.exists():
        raise Unavailable(
            f"the nvidia-pytriton wheel has no tritonserver or no python {sys.version_info[:2]} stub ({bundled})"
        )
    work = Path(tempfile.mkdtemp(prefix="triton-", dir=work))  # a fresh one for each (re)start
    backends = work / "triton-backends" / "python"
    backends.mkdir(parents=True)
    for f in (bundled / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy(f, backends / f.name)
    shutil.copy(stub, backends / stub.name)
    repo = work / "triton-models" / MODEL / "1"
    repo.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("triton_model.py"), repo / "model.py")
    shutil.copy(step_graph, repo / "model.onnx")
    (repo.parent / "config.pbtxt").write_text(
        TRITON_CONFIG.format(model=MODEL, max_batch=1024, horizon=horizon, q=q, capacity=4096)
    )
    port = free_port()
    # The stub embeds this interpreter's libpython; the wheel's own shared libraries sit beside it.
    libs = [
        str(Path(sys.base_prefix) / "lib"),
        str(site / "nvidia_pytriton.libs"),
        os.environ.get("LD_LIBRARY_PATH", ""),
    ]
    env = {"LD_LIBRARY_PATH": ":".join(p for p in libs if p), "PATH": f"{python.parent}:{os.environ['PATH']}",
           "VIRTUAL_ENV": str(python.parent.parent)}  # fmt: skip
    proc = Proc(
        "tritonserver",
        [str(binary), "--model-repository", str(work / "triton-models"), "--backend-directory", str(backends.parent),
         "--grpc-address", "127.0.0.1", "--grpc-port", str(port), "--allow-http", "false", "--allow-metrics", "false",
         "--exit-timeout-secs", "5", "--log-verbose", "0",
         # the stub's shared memory made big enough up front (default 1 MiB, grown while serving)
         "--backend-config", "python,shm-default-byte-size=67108864"],
        log_dir, env=env,
    )  # fmt: skip
    target = f"127.0.0.1:{port}"
    proc.wait_for(_wait_model_ready(target))
    return proc, target
