"""Soak test of the forecast server (`make soak`): many streams at a steady pace for minutes.

The real `python -m serving` in a subprocess on loopback (the default config's network, as in
bench/stream.py), and --streams concurrent StreamForecast calls from this process, each sending
a message of --series-per-stream observations every --interval-ms and waiting for its answer.
Every --lifetime steps a series ends (end=true) and a new id takes its place, so series state,
ids and the response encoder's caches churn the whole time. Bounded in count and time: a fixed
number of streams and series, --seconds of load.

It checks every answer (one forecast per observation, in order, steps_seen counting up from 1)
and reports errors (must be 0), the server's RSS after --warmup-s and at the end (growth must
stay under 5%), latency per observation (send to answer of the message that carries it: p50,
p99, max), throughput, and server CPU per observation. Prints a table, writes
bench/results/soak.json, exits 1 if errors > 0 or RSS grew by 5% or more.

    python -m bench.soak [--streams 200] [--seconds 300] [--warmup-s 30] [--model-uri DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import grpc
import numpy as np

from bench.common import machine, write_results
from bench.stream import FREQ_MS, METHOD, START_MS, default_model_dir, start_server
from serving.proto import pb

MAX_RSS_GROWTH = 0.05


def _identity(data: bytes) -> bytes:
    return data


class Stream:
    """One client stream: its series (replaced every `lifetime` steps) and what it measured."""

    def __init__(self, k: int, series: int, lifetime: int) -> None:
        self.k, self.lifetime, self.step = k, lifetime, 0
        self.ids = [f"soak{k}-{i}-0" for i in range(series)]
        self.age = [0] * series  # steps each slot's series has taken
        # The first series of each slot ends early by a different amount, so ends and starts are
        # spread over time, not all at one step.
        self.life = [lifetime - (k * series + i) % lifetime for i in range(series)]
        self.latencies: list[float] = []  # seconds per message
        self.observations = 0
        self.errors: list[str] = []

    def message(self) -> tuple[bytes, list[tuple[str, int]], list[int]]:
        """The next request, the (series id, steps_seen) its answer must hold, and the slots
        whose series end with it."""
        ts = START_MS + self.step * FREQ_MS
        value = 4.0 + np.sin(2 * np.pi * self.step / 48)
        ends = [i for i, (age, life) in enumerate(zip(self.age, self.life)) if age + 1 >= life]
        obs = [
            pb.Observation(series_id=sid, timestamp_ms=ts, value=float(value + 0.01 * i), end=i in ends)
            for i, sid in enumerate(self.ids)
        ]
        expected = [(sid, age + 1) for sid, age in zip(self.ids, self.age)]
        return pb.StreamRequest(observations=obs).SerializeToString(), expected, ends

    def advance(self, ends: list[int]) -> None:
        self.step += 1
        self.age = [age + 1 for age in self.age]
        for i in ends:  # a new id takes the ended series' slot
            self.ids[i], self.age[i], self.life[i] = f"soak{self.k}-{i}-{self.step}", 0, self.lifetime

    async def run(self, channel: grpc.aio.Channel, interval: float, stop_at: float, counting_from: float) -> None:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        next_send = time.perf_counter() + interval * (self.k % 97) / 97  # spread the streams over a tick
        try:
            while next_send < stop_at:
                await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                data, expected, ends = self.message()
                sent = time.perf_counter()
                await call.write(data)
                answer = pb.StreamResponse.FromString(await call.read())
                done = time.perf_counter()
                got = [(f.series_id, f.steps_seen) for f in answer.forecasts]
                if got != expected:
                    self.errors.append(f"stream {self.k} step {self.step}: answered {got} for {expected}")
                if sent >= counting_from:
                    self.latencies.append(done - sent)
                    self.observations += len(expected)
                self.advance(ends)
                # A steady pace: the next message one interval after this one was due, or at once
                # if the answer came later than that (no burst to catch up).
                next_send = max(next_send + interval, done)
            await call.done_writing()
            await call.read()  # the end of the stream, with its status
        except grpc.aio.AioRpcError as err:
            self.errors.append(f"stream {self.k} step {self.step}: {err.code().name}: {err.details()}")


async def soak(target: str, args: argparse.Namespace, server) -> dict:
    streams = [Stream(k, args.series_per_stream, args.lifetime) for k in range(args.streams)]
    channels = [grpc.aio.insecure_channel(target) for _ in range(args.channels)]
    started = time.perf_counter()
    warm_at, stop_at = started + args.warmup_s, started + args.seconds
    tasks = [
        asyncio.create_task(s.run(channels[s.k % len(channels)], args.interval_ms / 1e3, stop_at, warm_at))
        for s in streams
    ]
    rss, cpu_warm, rss_warm, client_warm = [], None, None, None
    while not all(t.done() for t in tasks):
        await asyncio.sleep(1.0)
        now = time.perf_counter() - started
        rss.append((round(now, 1), server.rss_mib()[0]))
        if rss_warm is None and now >= args.warmup_s:
            rss_warm, cpu_warm, client_warm = rss[-1][1], server.cpu_seconds(), time.process_time()
    await asyncio.gather(*tasks)
    cpu_end, rss_end, client_end = server.cpu_seconds(), server.rss_mib(), time.process_time()
    for channel in channels:
        await channel.close()
    measured_s = args.seconds - args.warmup_s
    latencies = np.concatenate([np.repeat(s.latencies, args.series_per_stream) for s in streams]) * 1e3  # ms
    observations = sum(s.observations for s in streams)
    errors = [e for s in streams for e in s.errors]
    return {
        "errors": len(errors),
        "error_examples": errors[:10],
        "observations": observations,
        "messages": sum(len(s.latencies) for s in streams),
        "observations_per_s": observations / measured_s,
        "target_observations_per_s": args.streams * args.series_per_stream / (args.interval_ms / 1e3),
        "latency_ms_per_observation": {
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
            "max": float(latencies.max()),
        },
        "rss_mib_after_warmup": rss_warm,
        "rss_mib_end": rss_end[0],
        "rss_mib_peak": rss_end[1],
        "rss_growth": (rss_end[0] - rss_warm) / rss_warm,
        "server_cpu_us_per_observation": (cpu_end - cpu_warm) / observations * 1e6,
        # The clients share the machine: what they take is not the server's.
        "client_cpu_us_per_observation": (client_end - client_warm) / observations * 1e6,
        "rss_mib_every_second": rss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--seconds", type=float, default=300.0, help="length of the load, warm-up included")
    p.add_argument("--warmup-s", type=float, default=30.0, help="not measured; RSS growth counts from here")
    p.add_argument("--series-per-stream", type=int, default=4)
    p.add_argument("--interval-ms", type=float, default=200.0, help="each stream sends a message this often")
    p.add_argument("--lifetime", type=int, default=200, help="steps before a series ends and a new id replaces it")
    p.add_argument("--channels", type=int, default=4, help="client connections the streams share")
    p.add_argument("--model-uri", default=None, help="a model directory (default: the default config's network)")
    args = p.parse_args(argv)
    if not 0 < args.warmup_s < args.seconds:
        p.error("--warmup-s must be above 0 and below --seconds")
    model = args.model_uri or str(default_model_dir())
    server, target = start_server(model)
    try:
        result = asyncio.run(soak(target, args, server))
    finally:
        server_exit = server.stop()
    result |= {"server_exit_code": server_exit, "model": model, "args": vars(args)}
    print_table(result, args)
    print(f"\nwrote {write_results('soak', result)}")
    ok = result["errors"] == 0 and result["rss_growth"] < MAX_RSS_GROWTH and server_exit == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def print_table(r: dict, args: argparse.Namespace) -> None:
    m, lat = machine(), r["latency_ms_per_observation"]
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}")
    print(f"{args.streams} streams x {args.series_per_stream} series, a message every {args.interval_ms:g} ms,")
    print(f"{args.seconds:g} s ({args.warmup_s:g} s warm-up), a series ends every {args.lifetime} steps")
    rows = [
        ("errors", f"{r['errors']}", "(must be 0)"),
        ("observations (after warm-up)", f"{r['observations']:,}", f"in {r['messages']:,} messages"),
        ("throughput, obs/s", f"{r['observations_per_s']:,.0f}", f"(paced at {r['target_observations_per_s']:,.0f})"),
        ("latency per observation, ms", f"p50 {lat['p50']:.2f}  p99 {lat['p99']:.2f}", f"max {lat['max']:.1f}"),
        ("server RSS after warm-up, MiB", f"{r['rss_mib_after_warmup']:.1f}", ""),
        ("server RSS at the end, MiB", f"{r['rss_mib_end']:.1f}", f"peak {r['rss_mib_peak']:.1f}"),
        ("RSS growth after warm-up", f"{r['rss_growth']:+.2%}", f"(must be < {MAX_RSS_GROWTH:.0%})"),
        ("server CPU per observation, µs", f"{r['server_cpu_us_per_observation']:.1f}", "all threads"),
        ("client CPU per observation, µs", f"{r['client_cpu_us_per_observation']:.1f}", "this process, same cores"),
    ]
    for name, value, note in rows:
        print(f"  {name:32s} {value:>24s}  {note}")
    for e in r["error_examples"]:
        print(f"  error: {e}")


if __name__ == "__main__":
    sys.exit(main())
