"""Streaming benchmark of the forecast server (the real `python -m serving` in a subprocess).

(a) one stream, 256 series per message: observations/s, against raw in-process ONNX Runtime
    stepping the same step graph at batch 256 (target ratio >= 0.5);
(b) one observation per message over 1, 16, 64, 256 concurrent streams: messages/s and p50/p99
    latency, against a bare gRPC server answering the same bytes (target ratio >= 0.7 at 64);
(c) 100,000 live series: server RSS (target < 1 GiB).

Client and servers share the machine, whose speed drifts with other tenants' load: each ratio is
measured in --rounds rounds (default 5) that alternate the server and its baseline back to
back, and the median round is reported with every round's ratio. Prints a table and writes
bench/results/stream.json.

    python -m bench.stream [--model-uri URI_OR_DIR] [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort

from bench.common import RESULTS, machine, write_results
from serving.config import RuntimeConfig
from serving.proto import pb
from serving.runtime import session_options

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/forecast.v1.Forecaster/StreamForecast"
START_MS, FREQ_MS = 1_388_534_400_000, 1_800_000


def _identity(data: bytes) -> bytes:
    return data


# -- the model and the processes -------------------------------------------------------------------


def default_model_dir() -> Path:
    """The default config's network (LSTM, 2 layers, hidden 64, horizon 48, lags of one day and one
    week of half-hours: a 336-value lag buffer per series), exported once.

    Untrained weights run exactly as fast as trained ones; pass --model-uri to bench a real one.
    """
    out = RESULTS / "default-model-lags"
    if not (out / "sequence.onnx").exists():
        import torch

        from training.export import export_model
        from training.model import Forecaster, ModelConfig

        torch.manual_seed(0)
        model = Forecaster(ModelConfig(lags=(48, 336)))
        export_model(model, out, metadata={"target": "Demand", "mlflow_run_id": "bench"})
    return out


class Process:
    """A Python subprocess, ready once a line of its output matches `ready`; its output keeps being
    read after that (the last 200 lines kept), so a chatty process never blocks on a full pipe."""

    def __init__(self, args: list[str], ready: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{args} exited: " + "".join(list(self.output)[-20:]))
            self.output.append(line)
            if m := re.search(ready, line):
                self.match = m
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise RuntimeError(f"{args} not ready in time")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)

    def rss_mib(self) -> tuple[float, float]:
        """(current, peak) resident set size in MiB, from /proc."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = {k: int(v.split()[0]) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(.+)$", status, re.M)}
        return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far, all threads."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


def start_server(model: str, *extra: str) -> tuple[Process, str]:
    p = Process(
        [
            "-m",
            "serving",
            "--model-uri",
            model,
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--device",
            "cpu",
            *extra,
        ],
        r"listening on ([\d.]+:\d+)",
    )
    return p, p.match.group(1)


# -- request bytes, built before any clock starts --------------------------------------------------


def request(series: list[str], step: int, values: np.ndarray) -> bytes:
    ts = START_MS + step * FREQ_MS
    obs = [pb.Observation(series_id=s, timestamp_ms=ts, value=float(v)) for s, v in zip(series, values)]
    return pb.StreamRequest(observations=obs).SerializeToString()


def level(step: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return 4.0 + np.sin(2 * np.pi * step / 48) + 0.1 * rng.standard_normal(n)


# -- (a) one stream, many series per message ------------------------------------------------------


def raw_ort(model_dir: Path, batch: int, seconds: float) -> tuple[float, float]:
    """Observations/s of the step graph alone, state carried between calls, same SessionOptions;
    and CPU µs per observation."""
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"),
        session_options(RuntimeConfig(device="cpu")),
        providers=["CPUExecutionProvider"],
    )
    # Every state tensor the metadata lists (h, c, the lag buffer...), zero, its dynamic axis = batch.
    names = session.get_modelmeta().custom_metadata_map["state"].split(",")
    inputs = {i.name: i for i in session.get_inputs()}
    states = {n: np.zeros([d if isinstance(d, int) else batch for d in inputs[n].shape], np.float32) for n in names}
    rng = np.random.default_rng(0)
    steps, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds or steps < 20:
        feeds = {"values": level(steps, batch, rng).astype(np.float32),
                 "timestamps_ms": np.full(batch, START_MS + steps * FREQ_MS, np.int64), **states}  # fmt: skip
        out = session.run(None, feeds)
        states = dict(zip(states, out[1:]))
        steps += 1
    observations = steps * batch
    return observations / (time.perf_counter() - started), (time.process_time() - cpu) / observations * 1e6


async def one_stream(target: str, messages: list[bytes], warmup: int, window: int = 2) -> float:
    """Observations/s over one stream, `window` messages in flight (the client pipelines)."""
    per_message = len(pb.StreamRequest.FromString(messages[0]).observations)
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        credit = asyncio.Semaphore(window)
        started = 0.0

        async def write() -> None:
            for m in messages:
                await credit.acquire()
                await call.write(m)
            await call.done_writing()

        writer = asyncio.create_task(write())
        for i in range(len(messages)):
            await call.read()
            credit.release()
            if i + 1 == warmup:
                started = time.perf_counter()
        await writer
    return (len(messages) - warmup) * per_message / (time.perf_counter() - started)


# -- (b) many streams, one observation per message -----------------------------------------------


def one_observation(stream: int, step: int, rng: np.random.Generator) -> bytes:
    """A StreamRequest of one observation: step `step` of series st{stream}."""
    return request([f"st{stream}"], step, level(step, 1, rng))


async def many_streams(
    target: str, streams: int, per_stream: int, method_path: str = METHOD, make: Callable = one_observation
) -> dict:
    """Ping-pong on `streams` concurrent streams of `method_path`, the messages made by
    make(stream, step, rng); messages/s and per-message latency."""
    rng = np.random.default_rng(streams)
    plans = [[make(k, i, rng) for i in range(per_stream)] for k in range(streams)]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        method = channel.stream_stream(method_path, request_serializer=_identity, response_deserializer=_identity)
        calls = [method() for _ in plans]  # the same calls from warm-up to the end: no set-up cost timed

        async def run(call, plan: list[bytes]) -> None:
            for m in plan:
                t = time.perf_counter()
                await call.write(m)
                await call.read()
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(run(c, p[:3]) for c, p in zip(calls, plans)))  # connect, warm up
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(run(c, p[3:]) for c, p in zip(calls, plans)))
        seconds = time.perf_counter() - started
        for call in calls:
            await call.done_writing()
            await call.read()  # end of stream
    lat = np.array(latencies) * 1e3
    return {"streams": streams, "messages_per_s": len(lat) / seconds,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}  # fmt: skip


STREAMS = (1, 16, 64, 256)


def measured(process: Process, target: str, streams: int, total_messages: int, **how: Any) -> dict:
    """many_streams (`how`: its method_path and make), plus the server process' CPU time per
    message (all its threads)."""
    per_stream = max(20, total_messages // streams)
    cpu = process.cpu_seconds()
    result = asyncio.run(many_streams(target, streams, per_stream, **how))
    result["server_cpu_us_per_msg"] = (process.cpu_seconds() - cpu) / (streams * per_stream) * 1e6
    return result


async def first_response(target: str) -> bytes:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        await call.write(request(["probe"], 0, np.ones(1)))
        answer = await call.read()
        await call.done_writing()
        return answer


# -- (c) many live series ---------------------------------------------------------------------------


async def live_series(target: str, total: int, streams: int, per_message: int, measure) -> tuple[float, object]:
    """Start `total` series (one step each) over `streams` open streams; returns (seconds, measure()).

    `measure` runs while the streams are still open, i.e. while every series is live.
    """
    per_stream = total // streams
    rng = np.random.default_rng(1)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        method = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)
        calls = [method() for _ in range(streams)]

        async def fill(k: int) -> None:
            for start in range(0, per_stream, per_message):
                ids = [f"live{k}-{i}" for i in range(start, min(start + per_message, per_stream))]
                await calls[k].write(request(ids, 0, level(0, len(ids), rng)))
                await calls[k].read()

        started = time.perf_counter()
        await asyncio.gather(*(fill(k) for k in range(streams)))
        seconds = time.perf_counter() - started
        measured = measure()
        for call in calls:
            await call.done_writing()
    return seconds, measured


# -- the run -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-uri", default=None, help="a model directory or models:/... (default: the default config)")
    p.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    p.add_argument("--rounds", type=int, default=5, help="alternating server/baseline rounds per ratio (median kept)")
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"], help="which measurements")
    args = p.parse_args(argv)
    scale = 0.2 if args.quick else 1.0
    model_dir = default_model_dir() if args.model_uri is None else None
    model = args.model_uri or str(model_dir)
    results: dict = {
        "setup": {"onnxruntime": ort.__version__, "grpcio": grpc.__version__, "device": "cpu (no GPU here)",
                  "note": "client and servers share the machine's cores (and, here, other users' jobs)"},
        "model": model,
    }  # fmt: skip

    # The machine's speed drifts (other tenants), so each ratio is taken over rounds that
    # alternate the server and its baseline back to back; the round with the median ratio is
    # reported, with every round's ratio beside it.
    if model_dir is None:
        raise SystemExit("(a) compares against the graph file: pass a directory to --model-uri")
    rng = np.random.default_rng(0)
    series = [f"s{i}" for i in range(256)]
    messages = [request(series, i, level(i, 256, rng)) for i in range(int(300 * scale) + 20)]
    totals = int(3000 * scale)
    server, target = start_server(model)
    echo = None
    try:
        # (a) one stream of 256 series per message against raw ORT at batch 256, alternating
        rounds_a = []
        for _ in range(args.rounds if "a" in args.parts else 0):
            raw, raw_cpu_us = raw_ort(model_dir, 256, seconds=1.5 * scale)
            cpu = server.cpu_seconds()
            served = asyncio.run(one_stream(target, messages, warmup=20))
            server_cpu_us = (server.cpu_seconds() - cpu) / (len(messages) * 256) * 1e6
            rounds_a.append({"server_obs_per_s": served, "raw_ort_obs_per_s": raw, "ratio": served / raw,
                             "server_cpu_us_per_obs": server_cpu_us, "raw_ort_cpu_us_per_obs": raw_cpu_us})  # fmt: skip
        if rounds_a:
            results["a_one_stream_256_series"] = {
                **_median(rounds_a),
                "round_ratios": [r["ratio"] for r in rounds_a],
                "rounds": rounds_a,
            }

        # (b) one observation per message, against the echo server, alternating per stream count
        rows_b = []
        if "b" in args.parts:
            rows_b, echo = part_b(server, target, totals, args.rounds)
            results["b_one_observation_per_message"] = rows_b

        # (c)
        if "c" in args.parts:
            rss_idle, _ = server.rss_mib()
            fill_s, (rss_live, rss_peak) = asyncio.run(live_series(target, 100_000, 4, 1000, server.rss_mib))
            results["c_live_series"] = {"series": 100_000, "fill_seconds": fill_s, "rss_idle_mib": rss_idle,
                                        "rss_live_mib": rss_live, "rss_peak_mib": rss_peak}  # fmt: skip
    finally:
        server_exit = server.stop()
        if echo is not None:
            echo.stop()
    results["server_exit_code"] = server_exit

    print_table(results)
    print(f"\nwrote {write_results('stream', results)}")
    return 0


def part_b(server: Process, target: str, totals: int, rounds: int) -> tuple[list[dict], Process]:
    """(b): one observation per message over 1..256 streams, rounds alternating with the echo server."""
    payload = asyncio.run(first_response(target))
    with tempfile.NamedTemporaryFile(suffix=".bin", delete=False) as f:
        f.write(payload)
    echo = Process(["-m", "bench.echo_server", "--payload", f.name], r"port (\d+)")
    os.unlink(f.name)
    echo_target = f"127.0.0.1:{echo.match.group(1)}"
    rows_b = []
    for n in STREAMS:
        rounds_b = []
        for _ in range(rounds):
            o = measured(server, target, n, totals)
            e = measured(echo, echo_target, n, totals)
            rounds_b.append({**o, "echo_messages_per_s": e["messages_per_s"], "echo_p50_ms": e["p50_ms"],
                             "echo_p99_ms": e["p99_ms"], "echo_cpu_us_per_msg": e["server_cpu_us_per_msg"],
                             "ratio": o["messages_per_s"] / e["messages_per_s"]})  # fmt: skip
        rows_b.append({**_median(rounds_b), "round_ratios": [r["ratio"] for r in rounds_b]})
    return rows_b, echo


def _median(rounds: list[dict]) -> dict:
    """The round with the median ratio (the upper one of two middles)."""
    return sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]


def print_table(r: dict) -> None:
    m = machine()
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}; onnxruntime {ort.__version__} on CPU (no GPU)")
    if "a_one_stream_256_series" in r:
        print_a(r["a_one_stream_256_series"])
    if "b_one_observation_per_message" in r:
        print_b(r["b_one_observation_per_message"])
    if "c_live_series" in r:
        c = r["c_live_series"]
        rss = f"server RSS {c['rss_live_mib']:.0f} MiB (peak {c['rss_peak_mib']:.0f}, idle {c['rss_idle_mib']:.0f})"
        print(f"\n(c) {c['series']:,} live series: {rss}; started in {c['fill_seconds']:.1f} s  (target < 1024 MiB)")


def print_a(a: dict) -> None:
    print("\n(a) one stream, 256 series per message            obs/s")
    print(f"    raw ONNX Runtime, batch 256, in-process   {a['raw_ort_obs_per_s']:>10,.0f}")
    print(f"    forecast server over gRPC                 {a['server_obs_per_s']:>10,.0f}", end="")
    print(f"   ratio {a['ratio']:.2f}  (target >= 0.5)")
    print(f"    ratio of each round (median shown): {', '.join(f'{x:.2f}' for x in a['round_ratios'])}")
    print(f"    CPU per observation: server {a['server_cpu_us_per_obs']:.2f} µs (all threads),"
          f" raw ONNX Runtime {a['raw_ort_cpu_us_per_obs']:.2f} µs")  # fmt: skip


def print_b(rows: list[dict]) -> None:
    print("\n(b) one observation per message      server                        bare gRPC (same bytes)")
    print("    streams      msg/s   p50 ms   p99 ms  cpu µs      msg/s   p50 ms   p99 ms  cpu µs   ratio")
    for b in rows:
        ours = (
            f"{b['messages_per_s']:>10,.0f} {b['p50_ms']:>8.2f} {b['p99_ms']:>8.2f} {b['server_cpu_us_per_msg']:>7.0f}"
        )
        bare = f"{b['echo_messages_per_s']:>10,.0f} {b['echo_p50_ms']:>8.2f} {b['echo_p99_ms']:>8.2f}"
        rounds = ", ".join(f"{x:.2f}" for x in b["round_ratios"])
        print(f"    {b['streams']:>7} {ours} {bare} {b['echo_cpu_us_per_msg']:>7.0f}   {b['ratio']:.2f}  ({rounds})")
    print("    (cpu µs: server process CPU time per message, all threads)")
    print("    (target: ratio >= 0.7 at 64 streams)")


if __name__ == "__main__":
    sys.exit(main())
