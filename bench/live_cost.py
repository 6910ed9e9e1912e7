"""What live accuracy (issue #17) costs the server: CPU per observation and memory.

Two `python -m serving` processes from this tree, the default model, one with live accuracy off
(--monitor-fraction 0) and one with it on (the defaults: every series, at most 100,000 per
version, the forecasts of every 8th origin: the stride that fits --monitor-memory-mib 448 with the
default model), measured in alternating rounds (the machine's speed drifts with other tenants' load):

(a) one stream, 256 series per message (bench.stream's (a)): server CPU µs per observation;
(b) one observation per message over 1 and 64 streams (bench.stream's (b)): server CPU µs per message;
(c) 100,000 live series, each stepped --steps times (49: every monitored series' ring full):
    server RSS.

Besides the A/B, the "on" server reports the thread CPU it spent scoring
(forecast_live_scoring_cpu_seconds_total): per observation (message), over the "off" server's
CPU, that share is the direct, far less noisy, estimate of the overhead (it leaves out effects
on the rest of the server, such as the cache the forecast rings take).

Prints a table and writes bench/results/live_cost.json.

--stride K sets the "on" server's --monitor-origin-stride (1: every forecast scored), and
--max-monitored N its --monitor-max-series.

    python -m bench.live_cost [--rounds N] [--quick] [--parts a b c] [--steps N] [--stride K] [--max-monitored N]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import urllib.request

import grpc
import numpy as np

from bench.common import print_table, write_results
from bench.stream import (
    METHOD,
    _identity,
    default_model_dir,
    level,
    measured,
    one_stream,
    request,
    start_server,
)

OFF = ("--monitor-fraction", "0")
ON = ("--metrics-port", "0")


def scoring_cpu(proc) -> float:
    """The server's own count of CPU seconds spent scoring (forecast_live_scoring_cpu_seconds)."""
    url = next(m.group(1) for line in proc.output if (m := re.search(r"metrics=(http://\S+/metrics)", line)))
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("forecast_live_scoring_cpu_seconds_total"))  # fmt: skip


async def step_all(target: str, total: int, streams: int, per_message: int, steps: int) -> float:
    """Step `total` series `steps` times over `streams` open streams, then measure (RSS) while
    they are all live; returns the seconds it took."""
    per_stream = total // streams
    rng = np.random.default_rng(1)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        method = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)
        calls = [method() for _ in range(streams)]

        async def fill(k: int) -> None:
            for step in range(steps):
                for start in range(0, per_stream, per_message):
                    ids = [f"live{k}-{i}" for i in range(start, min(start + per_message, per_stream))]
                    await calls[k].write(request(ids, step, level(step, len(ids), rng)))
                    await calls[k].read()

        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(fill(k) for k in range(streams)))
        seconds = loop.time() - started
        return seconds, calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating off/on rounds (median kept)")
    p.add_argument("--quick", action="store_true", help="fewer messages")
    p.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    p.add_argument("--steps", type=int, default=49, help="(c): steps of each of the 100,000 series")
    p.add_argument("--stride", type=int, help="the 'on' server's --monitor-origin-stride (default: its default)")
    p.add_argument("--max-monitored", type=int, help="the 'on' server's --monitor-max-series (default: its default)")
    args = p.parse_args(argv)
    on = [*ON] if args.stride is None else [*ON, "--monitor-origin-stride", str(args.stride)]
    if args.max_monitored is not None:
        on += ["--monitor-max-series", str(args.max_monitored)]
    settings = {"off": OFF, "on": tuple(on)}
    scale = 0.3 if args.quick else 1.0
    model = str(default_model_dir())
    servers = {name: start_server(model, *flags) for name, flags in settings.items()}
    rng = np.random.default_rng(0)
    series = [f"s{i}" for i in range(256)]
    messages = [request(series, i, level(i, 256, rng)) for i in range(int(200 * scale) + 20)]
    results: dict = {"model": model, "settings": {k: list(v) for k, v in settings.items()}}
    rows = []
    try:
        if "a" in args.parts:
            per = {name: [] for name in [*servers, "scoring"]}
            for _ in range(args.rounds):
                for name, (proc, target) in servers.items():
                    cpu, scored = proc.cpu_seconds(), scoring_cpu(proc) if name == "on" else 0.0
                    asyncio.run(one_stream(target, messages, warmup=20))
                    per[name].append((proc.cpu_seconds() - cpu) / (len(messages) * 256) * 1e6)
                    if name == "on":
                        per["scoring"].append((scoring_cpu(proc) - scored) / (len(messages) * 256) * 1e6)
            rows.append(_row("(a) 256 series/message: CPU µs per obs", per))
        if "b" in args.parts:
            for streams in (1, 64):
                per = {name: [] for name in [*servers, "scoring"]}
                for _ in range(args.rounds):
                    for name, (proc, target) in servers.items():
                        scored = scoring_cpu(proc) if name == "on" else 0.0
                        r = measured(proc, target, streams, int(3000 * scale))
                        per[name].append(r["server_cpu_us_per_msg"])
                        if name == "on":
                            messages_sent = streams * max(20, int(3000 * scale) // streams)
                            per["scoring"].append((scoring_cpu(proc) - scored) / messages_sent * 1e6)
                rows.append(_row(f"(b) {streams} stream(s), 1 obs/message: CPU µs per msg", per))
        if "c" in args.parts:
            per = {}
            for name, (proc, target) in servers.items():

                async def fill_and_measure(target: str = target, proc=proc) -> tuple[float, tuple]:
                    seconds, calls = await step_all(target, 100_000, 4, 1000, args.steps)
                    rss = proc.rss_mib()
                    for call in calls:
                        await call.done_writing()
                    return seconds, rss

                seconds, (rss, peak) = asyncio.run(fill_and_measure())
                per[name] = {"rss_mib": rss, "peak_mib": peak, "fill_seconds": seconds}
            results["c_100k_series"] = per
            rows.append({"figure": f"(c) 100,000 series x {args.steps} steps: RSS MiB",
                         "off": per["off"]["rss_mib"], "on": per["on"]["rss_mib"],
                         "overhead": per["on"]["rss_mib"] / per["off"]["rss_mib"] - 1})  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.stop()
    results["rows"] = rows
    columns = [
        "figure",
        "off",
        "on",
        "overhead",
        "paired_overhead",
        "scoring",
        "scoring_share",
        "rounds_off",
        "rounds_on",
    ]
    print_table(
        rows, columns, "live accuracy: off vs on (overhead: of the medians; paired: median of the rounds' ratios)"
    )
    print(f"\nwrote {write_results('live_cost', results)}")
    return 0


def _row(figure: str, per: dict[str, list[float]]) -> dict:
    off, on = statistics.median(per["off"]), statistics.median(per["on"])
    # Rounds alternate off/on back to back, so each round's own ratio is the steadier figure.
    paired = statistics.median(b / a for a, b in zip(per["off"], per["on"])) - 1
    # The server's own count of scoring CPU, over the same server's CPU without live accuracy.
    scoring = statistics.median(per["scoring"]) if per.get("scoring") else None
    return {"figure": figure, "off": off, "on": on, "overhead": on / off - 1, "paired_overhead": paired,
            "scoring": scoring, "scoring_share": scoring / off if scoring is not None else None,
            "rounds_off": " ".join(f"{x:.1f}" for x in per["off"]),
            "rounds_on": " ".join(f"{x:.1f}" for x in per["on"])}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
