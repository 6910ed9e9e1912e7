"""Side by side with what users would pick instead: the same model, data and machine, one run.

    python -m bench.peers [--quick] [--rounds N] [--seconds S] [--model-dir DIR]   (make bench-peers)

Systems, each started here on loopback and stopped at the end:
  - this server, forecast.v1 StreamForecast: state on the server, one step per observation;
  - this server, Open Inference Protocol ModelStreamInfer with sequences (one step per request);
  - this server, OIP ModelInfer, the whole window per request (stateless);
  - MLflow's scoring server (`mlflow models serve`) on the registered version's forecasting pyfunc,
    REST, the whole window per request;
  - MLServer 1.7 with its MLflow runtime on the same pyfunc, V2 gRPC, the whole window per request;
  - NVIDIA Triton (the nvidia-pytriton wheel's tritonserver 2.51, CPU only) with its sequence
    batcher, the same step graph in a python-backend model (bench/triton_model.py) that keeps
    each sequence's state by correlation id; ModelStreamInfer, one step per request.
The peers run from their own virtual environments (bench/peers_env.py); a peer that cannot be
installed or started is reported with the reason.

The model is the default config's network (LSTM 2x64, horizon 48, quantiles 0.1/0.5/0.9, lags of
a day and a week), registered in a temporary MLflow store (sqlite); every system serves that
version: the step graph (this server, Triton) or its forecasting pyfunc (MLflow, MLServer).
Untrained weights unless --model-dir: they cost the same to run.

Workload: K series (K = 1, 64, 512), one client each, ping-pong: send the series' next
observation (stateful systems) or the window of its last 336 observations (stateless ones), wait
for the forecast, repeat, for --seconds per cell. Per system and K: observations/s, p50 and p99
latency per observation, server CPU seconds per 1,000 observations (the server's whole process
tree: workers, stubs), server memory (RSS of the tree). Systems alternate within each round, and
the round with the median throughput is kept.

Same forecasts: before timing, C series of exactly 336 observations go through every system;
stateful systems step them from their first observation, stateless ones get the 336 steps as one
window, so all see the same history from zero state, and each answer must match the sequence
graph run in-process within 1e-3 (|a - b| / (1 + |b|)). (A stateful system that has stepped a
series for longer than the window has seen more history than a window request carries, so the
timed phase is not compared.)

Floors for this server, as CPU per observation (steadier than throughput on a shared machine):
ONNX Runtime alone stepping the same graph at batch 256 in-process, against this server with
256 series per message on one stream; and a bare gRPC server answering the same bytes
(bench/echo_server.py) under the same 64 one-observation streams.

Prints the table and the targets, writes bench/results/peers.json and the charts
docs/img/peers-throughput.png and docs/img/peers-latency-cdf.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from bench import peer_systems as ps
from bench import peers_env
from bench.common import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
LOGS = ROOT / "bench" / "results" / "peers-logs"
WINDOW = 336
KS = (1, 64, 512)
CHECK_SERIES = 4
TOLERANCE = 1e-3
THIS = "this server, forecast.v1 StreamForecast"
OIP_SEQ = "this server, OIP ModelStreamInfer (sequences)"
OIP_WIN = "this server, OIP ModelInfer (whole window)"
MLFLOW = "mlflow models serve (REST, whole window)"
MLSERVER = "MLServer 1.7 + MLflow runtime (V2 gRPC, whole window)"
TRITON = "Triton 2.51 sequence batcher (python backend, one step per request)"
ECHO = "bare gRPC echo, same bytes (floor)"
NOTES = {
    TRITON: "the model step runs behind the python backend's extra hop (tritonserver <-> stub process over shared memory)",
    MLFLOW: "server defaults (one uvicorn worker)",
    MLSERVER: "server defaults (one parallel inference worker); the pyfunc behind a 10-line adapter "
    "(bench/mlserver_adapter.py): MLServer's pandas codec cannot encode its datetime and string columns",
}


def _identity(b: bytes) -> bytes:
    return b


# -- the registered model --------------------------------------------------------------------------------


@dataclass
class Registered:
    tracking_uri: str
    model_uri: str  # models:/forecaster/1
    forecasting_uri: str  # runs:/RUN/forecasting (the version's tag forecasting_model_uri)
    forecasting_dir: Path  # a local copy of that pyfunc
    step_graph: Path  # the version's model.onnx, downloaded
    sequence_graph: Path
    horizon: int
    quantiles: list[float]
    columns: dict[str, str]


def register(model_dir: Path, work: Path) -> Registered:
    """Register model_dir's graphs as version 1 of `forecaster` in a fresh sqlite store under work,
    as `fit` does (both graphs, the forecasting pyfunc beside them), and download what the peers load."""
    import mlflow
    import onnx

    from training import forecasting_pyfunc as fp
    from training.export import example_inputs
    from training.model import Forecaster, ModelConfig
    from training.registry import FORECASTING_TAG, log_and_register

    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    experiment = mlflow.create_experiment("peers", artifact_location=(work / "artifacts").as_uri())
    meta = {p.key: p.value for p in onnx.load(str(model_dir / "model.onnx")).metadata_props}
    model = Forecaster(ModelConfig(**json.loads(meta["model_config"])))
    example = example_inputs(model, 2, None, np.random.default_rng(0), state="zero")
    with mlflow.start_run(experiment_id=experiment):
        version = log_and_register(model_dir, ps.MODEL, {"backtest_mase": "1.0", "data_fingerprint": "bench"}, example)
    forecasting_uri = version.tags[FORECASTING_TAG]
    forecasting_dir = Path(mlflow.artifacts.download_artifacts(forecasting_uri, dst_path=str(work / "forecasting")))
    model_uri = f"models:/{ps.MODEL}/{version.version}"
    graphs = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(work / "version")))
    cols = fp.Columns.from_metadata(meta)
    return Registered(
        tracking_uri=uri, model_uri=model_uri, forecasting_uri=forecasting_uri, forecasting_dir=forecasting_dir,
        step_graph=graphs / "model.onnx", sequence_graph=next(graphs.rglob("sequence.onnx")),
        horizon=int(meta["horizon"]), quantiles=[float(q) for q in meta["quantiles"].split(",")],
        columns={"series": cols.series, "timestamp": cols.timestamp, "value": cols.value},
    )  # fmt: skip


# -- pure helpers (tested) -----------------------------------------------------------------------------------


def max_rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / (1 + |b|): the project's parity measure (absolute near 0, relative for large values)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return math.inf
    return float(np.max(np.abs(a - b) / (1.0 + np.abs(b))))


def agreement(answers: dict[str, np.ndarray], reference: np.ndarray, tolerance: float = TOLERANCE) -> dict[str, dict]:
    """Each system's forecasts [C, horizon, Q] against the reference: {system: {max_error, agrees}}."""
    out = {}
    for name, got in answers.items():
        err = max_rel_error(got, reference)
        out[name] = {"max_error": err, "agrees": bool(err <= tolerance)}
    return out


def summarize(latencies_s: list[float], observations: int, seconds: float, cpu_s: float, rss_mib: float) -> dict:
    lat = np.asarray(latencies_s, np.float64) * 1e3
    return {
        "observations": observations,
        "obs_per_s": observations / seconds if seconds > 0 else 0.0,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else math.nan,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else math.nan,
        "cpu_s_per_1k_obs": cpu_s / observations * 1e3 if observations else math.nan,
        "rss_mib": rss_mib,
    }


def median_round(rounds: list[dict]) -> dict:
    """The round with the median throughput (the upper of two middles), with every round's figure."""
    ordered = sorted(rounds, key=lambda r: r["obs_per_s"])
    return {**ordered[len(ordered) // 2], "round_obs_per_s": [r["obs_per_s"] for r in rounds]}


def build_rows(
    cells: dict[str, dict[int, dict]],
    unavailable: dict[str, str],
    checks: dict[str, dict],
    crashes: dict[str, list[str]] | None = None,
) -> list[dict]:
    """The table: one row per (system, K) measured, one per system that could not run; a system
    that crashed during the run (and was started again) says so on each of its rows."""
    rows = []
    for name, by_k in cells.items():
        died = (crashes or {}).get(name)
        crashed = f"crashed {len(died)}x during the run, restarted: {died[0]}; " if died else ""
        check = checks.get(name)
        same = (
            ""
            if check is None
            else (f"yes ({check['max_error']:.1e})" if check["agrees"] else f"NO ({check['max_error']:.1e})")
        )
        for k in sorted(by_k):
            c = by_k[k]
            if "error" in c:
                rows.append({"system": name, "K": k, "note": f"{crashed}failed: {c['error']}"})
                continue
            note = crashed + NOTES.get(name, "")
            if c.get("failed_rounds"):
                note = f"{len(c['failed_rounds'])} round(s) failed, median of the others ({c['failed_rounds'][0][:200]}); {note}"
            rows.append({"system": name, "K": k, "obs/s": c["obs_per_s"], "p50 ms": c["p50_ms"], "p99 ms": c["p99_ms"],
                         "CPU s/1k obs": c["cpu_s_per_1k_obs"], "RSS MiB": c["rss_mib"], "same forecasts": same,
                         "note": note})  # fmt: skip
    for name, why in unavailable.items():
        rows.append({"system": name, "note": f"could not run here: {why}"})
    return rows


def _cell(cells: dict, name: str, k: int) -> dict | None:
    c = cells.get(name, {}).get(k)
    return None if c is None or "error" in c else c


def targets(cells: dict[str, dict[int, dict]], floors: dict, k: int = 64) -> list[dict]:
    """The issue's targets, each with the measured ratio and whether it is met (None: not measurable)."""
    ours = _cell(cells, THIS, k)
    out = []

    def add(what: str, ratio: float | None, goal: float, higher_is_better: bool) -> None:
        met = None if ratio is None else (ratio >= goal if higher_is_better else ratio <= goal)
        out.append({"target": what, "measured": ratio, "goal": goal, "met": met})

    for peer, speed, p50 in ((MLFLOW, 20, 0.1), (MLSERVER, 10, 0.1)):
        theirs = _cell(cells, peer, k)
        add(f"K={k}: obs/s vs {peer}", ours and theirs and ours["obs_per_s"] / theirs["obs_per_s"], speed, True)
        add(f"K={k}: p50 latency vs {peer}", ours and theirs and ours["p50_ms"] / theirs["p50_ms"], p50, False)
    triton = _cell(cells, TRITON, k)
    add(f"K={k}: obs/s vs Triton", ours and triton and ours["obs_per_s"] / triton["obs_per_s"], 1.5, True)
    add(
        f"K={k}: CPU per obs vs Triton",
        ours and triton and ours["cpu_s_per_1k_obs"] / triton["cpu_s_per_1k_obs"],
        2 / 3,
        False,
    )
    batched = floors.get("batched")
    add("CPU per obs, 256 series per message, vs ONNX Runtime alone at batch 256",
        batched and batched["server_cpu_us_per_obs"] / batched["ort_cpu_us_per_obs"], 2.0, False)  # fmt: skip
    echo = _cell(cells, ECHO, k)
    add(f"K={k}: CPU per obs, one observation per message, vs the echo server",
        ours and echo and ours["cpu_s_per_1k_obs"] / echo["cpu_s_per_1k_obs"], 1.4, False)  # fmt: skip
    return out


# -- driving a system ---------------------------------------------------------------------------------------------


class Client:
    """One series' client: its own gRPC stream (stateful systems) or its own requests."""

    def __init__(self, system: ps.System, channel, http, k: int, sid: int) -> None:
        self.system, self.protocol, self.k, self.sid = system, system.protocol, k, sid
        self.call = None
        if self.protocol.transport == "stream":
            self.call = channel.stream_stream(self.protocol.path, _identity, _identity)()
        elif self.protocol.transport == "unary":
            self.unary = channel.unary_unary(self.protocol.path, _identity, _identity)
        else:
            self.http, self.url = http, system.target + self.protocol.path

    async def send(self, message: bytes) -> bytes:
        if self.call is not None:
            await self.call.write(message)
            return await self.call.read()
        if self.protocol.transport == "unary":
            return await self.unary(message)
        import aiohttp

        for attempt in (1, 2):
            try:
                async with self.http.post(self.url, data=message, headers={"Content-Type": "application/json"}) as r:
                    body = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {body[:300]!r}")
                    return body
            except (aiohttp.ClientConnectionResetError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # A pooled keep-alive connection the server closed while this client waited (uvicorn
                # closes idle ones after 5 s; at K=512 a client waits longer than that for its turn):
                # sent again once on a new connection, as HTTP clients do for idempotent requests.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def close(self, end_message: bytes | None) -> None:
        if self.call is not None:
            if end_message is not None:  # sequences: free the server's state for this sequence
                await self.send(end_message)
            await self.call.done_writing()
            await self.call.read()


async def _with_transport(system: ps.System, body):
    """Run body(channel, http) with one gRPC channel or HTTP session for all of a cell's clients."""
    if system.protocol.transport == "http":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            return await body(None, http)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(system.target, options=options) as channel:
        return await body(channel, None)


async def run_cell(system: ps.System, k_series: int, seconds: float, max_obs: int, sid_base: int) -> dict:
    """K clients, ping-pong, for `seconds` (or max_obs observations in all) after a warm-up."""
    proto = system.protocol
    warm = 3 if proto.stateful else 1
    per_client = max(1, math.ceil(max_obs / k_series))
    first = 0 if proto.stateful else WINDOW - 1  # a stateless request needs a whole window behind it
    plans = None
    if proto.stateful:  # small messages at high rates: built before any clock starts
        plans = [[proto.encode(k, i, sid_base + k, start=(i == 0)) for i in range(first, first + warm + per_client)]
                 for k in range(k_series)]  # fmt: skip
    latencies: list[float] = []
    done = [0]

    def message(k: int, j: int) -> bytes:
        return plans[k][j] if plans is not None else proto.encode(k, first + j, sid_base + k)

    async def body(channel, http):
        clients = [Client(system, channel, http, k, sid_base + k) for k in range(k_series)]

        async def warm_up(c: Client) -> None:
            for j in range(warm):
                await c.send(message(c.k, j))

        async def timed(c: Client, deadline: float) -> None:
            j = warm
            while j < warm + per_client and time.perf_counter() < deadline:
                m = message(c.k, j)
                t = time.perf_counter()
                await c.send(m)
                latencies.append(time.perf_counter() - t)
                done[0] += 1
                j += 1
            c.next_step = first + j  # the first step not sent

        await asyncio.gather(*(warm_up(c) for c in clients))
        cpu0, started = system.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(timed(c, started + seconds) for c in clients))
        elapsed, cpu = time.perf_counter() - started, system.cpu_seconds() - cpu0
        rss = system.rss_mib()  # while every series is still live
        ends = [
            proto.encode(c.k, c.next_step, c.sid, end=True) if proto.path == ps.OIP_STREAM else None for c in clients
        ]
        await asyncio.gather(*(c.close(e) for c, e in zip(clients, ends)))
        return summarize(latencies, done[0], elapsed, cpu, rss), latencies

    return await _with_transport(system, body)


async def forecasts_of(system: ps.System, series: int, sid_base: int) -> np.ndarray:
    """[series, horizon, Q]: each series' forecast after exactly WINDOW observations from its start."""
    proto = system.protocol

    async def body(channel, http):
        async def one(k: int) -> np.ndarray:
            c = Client(system, channel, http, k, sid_base + k)
            if proto.stateful:
                for i in range(WINDOW):
                    answer = await c.send(proto.encode(k, i, c.sid, start=(i == 0), end=(i == WINDOW - 1)))
            else:
                answer = await c.send(proto.encode(k, WINDOW - 1))
            if c.call is not None:
                await c.close(None)
            return proto.decode(answer)

        return np.stack(await asyncio.gather(*(one(k) for k in range(series))))

    return await _with_transport(system, body)


def reference_forecasts(sequence_graph: Path, series: int) -> np.ndarray:
    """The sequence graph in-process over each check series' first WINDOW steps from zero state."""
    session = ort.InferenceSession(str(sequence_graph), providers=["CPUExecutionProvider"])
    names = session.get_modelmeta().custom_metadata_map["state"].split(",")
    inputs = {i.name: i for i in session.get_inputs()}
    feeds = {
        "values": np.stack([ps.series_values(k, 0, WINDOW) for k in range(series)]),
        "timestamps_ms": np.stack([ps.series_timestamps(0, WINDOW)] * series),
    }
    for n in names:
        shape = [d if isinstance(d, int) else series for d in inputs[n].shape]
        feeds[n] = np.zeros(shape, np.float32 if inputs[n].type == "tensor(float)" else np.int64)
    return session.run(["forecast"], feeds)[0]


# -- the floors ------------------------------------------------------------------------------------------------


def batched_floor(this: ps.System, step_graph_dir: Path, rounds: int, scale: float) -> dict:
    """This server with 256 series per message on one stream vs ONNX Runtime alone at batch 256,
    CPU per observation, rounds alternating (bench/stream.py's (a), on this run's server)."""
    from bench import stream

    rng = np.random.default_rng(0)
    series = [f"b{i}" for i in range(256)]
    messages = [stream.request(series, i, stream.level(i, 256, rng)) for i in range(int(300 * scale) + 20)]
    out = []
    for _ in range(rounds):
        _, ort_cpu_us = stream.raw_ort(step_graph_dir, 256, seconds=1.5 * scale)
        cpu = this.cpu_seconds()
        obs_per_s = asyncio.run(stream.one_stream(this.target, messages, warmup=20))
        out.append({"server_obs_per_s": obs_per_s, "ort_cpu_us_per_obs": ort_cpu_us,
                    "server_cpu_us_per_obs": (this.cpu_seconds() - cpu) / (len(messages) * 256) * 1e6})  # fmt: skip
    for r in out:
        r["ratio"] = r["server_cpu_us_per_obs"] / r["ort_cpu_us_per_obs"]
    ordered = sorted(out, key=lambda r: r["ratio"])
    return {**ordered[len(ordered) // 2], "round_ratios": [r["ratio"] for r in out]}


# -- the run ---------------------------------------------------------------------------------------------------


def start_all(
    systems: list[ps.System], reg: Registered, work: Path, log_dir: Path, only: list[str] | None = None
) -> dict[str, str]:
    """Start every system that can start here (those named by `only`, and this server), appending each
    to `systems` as it starts (so the caller stops them even if a later one fails); -> why the others
    cannot."""
    unavailable: dict[str, str] = {}
    q = len(reg.quantiles)
    qcols = [__import__("training.forecasting_pyfunc", fromlist=["x"]).quantile_column(x) for x in reg.quantiles]
    proc, target = ps.start_this_server(reg.model_uri, reg.tracking_uri, log_dir)
    systems.append(ps.System(THIS, ps.v1_protocol(), target, [proc]))
    if ps.oip_served(target):
        systems.append(ps.System(OIP_SEQ, ps.oip_sequence_protocol(reg.horizon, q), target, [proc]))
        systems.append(ps.System(OIP_WIN, ps.oip_window_protocol(reg.horizon, q, WINDOW), target, [proc]))
    else:
        why = "not available in this build (the server does not serve inference.GRPCInferenceService)"
        unavailable |= {OIP_SEQ: why, OIP_WIN: why}
    try:
        python = peers_env.serving_python()
    except peers_env.EnvError as exc:
        print(f"the peers' environment could not be built: {exc}", file=sys.stderr)
        return unavailable | {n: f"its environment could not be built: {exc}" for n in (MLFLOW, MLSERVER, TRITON)}
    starters = {
        MLFLOW: lambda: (ps.start_mlflow_serve(python, reg.forecasting_uri, reg.tracking_uri, log_dir),
                         ps.mlflow_protocol(reg.columns, qcols, WINDOW)),
        MLSERVER: lambda: (ps.start_mlserver(python, reg.forecasting_dir, work, log_dir),
                           ps.mlserver_protocol(reg.columns, qcols, WINDOW)),
        TRITON: lambda: (ps.start_triton(python, reg.step_graph, reg.horizon, q, work, log_dir),
                         ps.oip_sequence_protocol(reg.horizon, q)),
    }  # fmt: skip
    for name, start in starters.items():
        if only and not any(w.lower() in name.lower() for w in only):
            continue
        print(f"starting {name} ...", flush=True)
        try:
            (proc, target), protocol = start()
        except (ps.Unavailable, OSError) as exc:  # OSError: e.g. its executable is missing
            print(f"  {name} could not start: {exc}", file=sys.stderr)
            unavailable[name] = str(exc)[:400]
            continue
        systems.append(ps.System(name, protocol, target, [proc], restart=lambda start=start: start()[0]))
    return unavailable


def start_echo(this: ps.System, log_dir: Path, work: Path) -> ps.System:
    """bench/echo_server.py answering every message with a real one-observation answer of this server."""
    probe = ps.v1_protocol().encode(0, 0, "echo-probe", start=True)

    async def first() -> bytes:
        async with grpc.aio.insecure_channel(this.target) as channel:
            call = channel.stream_stream(ps.V1_STREAM, _identity, _identity)()
            await call.write(probe)
            answer = await call.read()
            await call.done_writing()
            return answer

    payload = work / "echo-payload.bin"
    payload.write_bytes(asyncio.run(first()))
    proc = ps.Proc("echo", [sys.executable, "-m", "bench.echo_server", "--payload", str(payload)], log_dir)
    port = proc.wait_for_line(r"port (\d+)").group(1)
    return ps.System(ECHO, ps.v1_protocol(), f"127.0.0.1:{port}", [proc])


def failure(system: ps.System, exc: Exception) -> str:
    """Why a cell failed, for its row: the client's error, and the server's last log lines if it died."""
    why = f"{type(exc).__name__}: {getattr(exc, 'details', lambda: None)() or str(exc)[:300]}"
    for proc in system.procs:
        if proc.proc.poll() is not None:
            why += f"; {proc.name} exited with {proc.proc.returncode}: {proc.tail(4)[:400]} (log: {proc.log})"
    return why


def measure(systems: list[ps.System], echo: ps.System | None, args, scale: float) -> tuple[dict, dict]:
    """cells[system][K] (median round of those that ran) and the K=64 latencies of that round, per
    system. A round that fails is noted in its cell, and a peer that died is started again for the
    next round (its crashes are noted on the system)."""
    cells: dict[str, dict[int, dict]] = {s.name: {} for s in systems}
    cdf: dict[str, list[float]] = {}
    sid = 1
    for k in args.ks:
        rounds: dict[str, list] = {}
        failed: dict[str, list[str]] = {}
        for r in range(args.rounds):
            for s in systems + ([echo] if echo is not None and k == 64 else []):
                try:
                    running = s.ensure_running()
                except ps.Unavailable as exc:
                    running, s.restart = False, None
                    s.crashes.append(f"could not restart: {str(exc)[:200]}")
                if not running:
                    failed.setdefault(s.name, []).append(f"not running: {s.crashes[-1]}")
                    continue
                try:
                    summary, lat = asyncio.run(run_cell(s, k, args.seconds, int(args.max_obs * scale), sid))
                except Exception as exc:  # a peer that fails under load: its row says so, the others go on
                    traceback.print_exc()
                    failed.setdefault(s.name, []).append(failure(s, exc))
                    continue
                finally:
                    sid += k + 1
                rounds.setdefault(s.name, []).append((summary, lat))
                print(f"  K={k:<4} round {r + 1}: {s.name}: {summary['obs_per_s']:,.0f} obs/s, p50 "
                      f"{summary['p50_ms']:.2f} ms, {summary['cpu_s_per_1k_obs']:.3f} CPU s/1k obs", flush=True)  # fmt: skip
        for name in {*rounds, *failed}:
            if name not in rounds:
                cells.setdefault(name, {})[k] = {"error": failed[name][0], "failed_rounds": failed[name]}
                continue
            rs = rounds[name]
            best = median_round([s for s, _ in rs])
            cells.setdefault(name, {})[k] = {**best, "failed_rounds": failed.get(name, [])}
            if k == 64:
                cdf[name] = next(lat for s, lat in rs if s["obs_per_s"] == best["obs_per_s"])
    return cells, cdf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 2 s per cell (a smoke run)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per K, systems alternating (median kept)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed seconds per system, K and round")
    p.add_argument("--max-obs", type=int, default=100_000, help="cap on observations per cell")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="numbers of series")
    p.add_argument(
        "--model-dir", type=Path, default=None, help="graphs to register (default: the default config, untrained)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="WORD",
        help="run only the peers whose name holds one of these words (this server always runs)",
    )
    p.add_argument("--no-charts", action="store_true")
    args = p.parse_args(argv)
    # SIGTERM (a timeout, Ctrl-C's cousin) unwinds like an exception, so the finally below stops
    # every server this run started: they run in sessions of their own and would outlive it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scale = 1.0
    if args.quick:
        args.rounds, args.seconds, scale = 1, 2.0, 0.25
    from bench.stream import default_model_dir

    model_dir = args.model_dir or default_model_dir()
    started = time.time()
    systems: list[ps.System] = []
    echo = None
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        work = Path(tmp)
        log_dir = LOGS  # kept after the run: a system that failed is explained there
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True)
        try:
            print("registering the model in a temporary MLflow store ...", flush=True)
            reg = register(model_dir, work)
            unavailable = start_all(systems, reg, work, log_dir, args.only)
            echo = start_echo(systems[0], log_dir, work)
            print(f"checking that every system gives the same forecasts ({CHECK_SERIES} series x {WINDOW} steps) ...")
            reference = reference_forecasts(reg.sequence_graph, CHECK_SERIES)
            answers = {}
            for s in systems:
                try:
                    answers[s.name] = asyncio.run(forecasts_of(s, CHECK_SERIES, 900_000))
                except Exception as exc:
                    traceback.print_exc()
                    answers[s.name] = np.full_like(reference, np.nan)
                    print(f"  {s.name}: could not be checked: {exc}", file=sys.stderr)
            checks = agreement(answers, reference)
            for name, c in checks.items():
                print(f"  {name}: max error {c['max_error']:.2e} -> {'same' if c['agrees'] else 'DIFFERENT'}")
            cells, cdf = measure(systems, echo, args, scale)
            print("floor: ONNX Runtime alone at batch 256 vs this server at 256 series per message ...", flush=True)
            floors = {
                "batched": batched_floor(systems[0], reg.step_graph.parent, args.rounds, 0.25 if args.quick else 1.0)
            }
        finally:
            for s in [*systems, *([echo] if echo else [])]:
                for proc in s.procs:
                    proc.stop()
    unavailable_rows = unavailable
    crashes = {s.name: s.crashes for s in systems if s.crashes}
    rows = build_rows(cells, unavailable_rows, checks, crashes)
    goals = targets(cells, floors)
    results = {
        "setup": {"onnxruntime": ort.__version__, "grpcio": grpc.__version__, "window": WINDOW, "ks": args.ks,
                  "rounds": args.rounds, "seconds_per_cell": args.seconds, "model_dir": str(model_dir),
                  "quick": args.quick, "minutes": (time.time() - started) / 60},
        "rows": rows, "cells": cells, "agreement": checks, "floors": floors, "targets": goals,
        "unavailable": unavailable_rows, "crashes": crashes, "notes": NOTES,
    }  # fmt: skip
    print_report(results)
    print(f"\nwrote {write_results('peers', results)}")
    if not args.no_charts:
        from bench.peers_charts import latency_cdf, throughput_chart

        print(f"wrote {throughput_chart(cells, IMG / 'peers-throughput.png')}")
        print(f"wrote {latency_cdf({n: cdf[n] for n in cells if n in cdf}, IMG / 'peers-latency-cdf.png')}")
    return 0


def print_report(r: dict) -> None:
    from bench.common import print_table

    m = machine()
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['date']}; everything on CPU")
    columns = ["system", "K", "obs/s", "p50 ms", "p99 ms", "CPU s/1k obs", "RSS MiB", "same forecasts", "note"]
    print_table(r["rows"], columns, "per system and number of series K (median round)")
    f = r["floors"]["batched"]
    print(f"\nfloor, 256 series per message: this server {f['server_cpu_us_per_obs']:.2f} µs of CPU per observation, "
          f"ONNX Runtime alone {f['ort_cpu_us_per_obs']:.2f} µs (x{f['ratio']:.2f}; rounds "
          f"{', '.join(f'{x:.2f}' for x in f['round_ratios'])})")  # fmt: skip
    print("\ntargets")
    for t in r["targets"]:
        verdict = "n/a (a system did not run)" if t["met"] is None else ("met" if t["met"] else "MISSED")
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        print(f"  {t['target']}: {measured} (goal {t['goal']:.3g}) {verdict}")


if __name__ == "__main__":
    sys.exit(main())
