"""The Open Inference Protocol against forecast.v1, on one server, in the same run.

One observation per message over N concurrent streams, ping-pong (as bench/stream.py (b)):
forecast.v1 StreamForecast with one series per stream, against ModelStreamInfer with one sequence
per stream (sequence_id, sequence_start on the first message, raw FP32/INT64 inputs of shape
[1, 1] and a request id, as tritonclient sends them). Both go to the same `python -m serving`
process; rounds alternate the two protocols back to back (the machine's speed drifts), and the
round with the median ratio is reported with every round's ratio. Server CPU per message is the
server process' CPU time (all threads) over the messages. Target: ModelStreamInfer at 64 streams
reaches at least 0.8 of StreamForecast's observations per second.

Requests are built before any clock starts, as raw bytes; the clients are grpc.aio with identity
serializers, so the figures are the server's, not a client library's.

    python -m bench.oip [--model-uri URI_OR_DIR] [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
import onnxruntime as ort

from bench.common import machine, write_results
from bench.stream import FREQ_MS, METHOD, START_MS, _median, default_model_dir, level, measured, start_server
from serving.proto import oip

OIP_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
STREAMS = (1, 16, 64, 256)
TARGET_STREAMS, TARGET_RATIO = 64, 0.8


def sequence_step(stream: int, step: int, rng: np.random.Generator) -> bytes:
    """A ModelInferRequest of one observation: step `step` of sequence seq{stream}."""
    request = oip.ModelInferRequest(model_name="forecaster", id=f"{stream}-{step}")
    request.parameters["sequence_id"].string_param = f"seq{stream}"
    request.parameters["sequence_start"].bool_param = step == 0
    request.parameters["sequence_end"].bool_param = False
    request.inputs.add(name="values", datatype="FP32", shape=[1, 1])
    request.inputs.add(name="timestamps_ms", datatype="INT64", shape=[1, 1])
    value = np.asarray(level(step, 1, rng), np.float32)
    request.raw_input_contents.extend([value.tobytes(), np.int64(START_MS + step * FREQ_MS).tobytes()])
    return request.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-uri", default=None, help="a model directory or models:/... (default: the default config)")
    p.add_argument("--quick", action="store_true", help="fewer messages (a smoke run)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per stream count (median kept)")
    args = p.parse_args(argv)
    total = int(3000 * (0.2 if args.quick else 1.0))
    model = args.model_uri or str(default_model_dir())
    server, target = start_server(model)
    rows = []
    try:
        for n in STREAMS:
            rounds = []
            for _ in range(args.rounds):
                v1 = measured(server, target, n, total, method_path=METHOD)
                seq = measured(server, target, n, total, method_path=OIP_METHOD, make=sequence_step)
                rounds.append({
                    "streams": n, "ratio": seq["messages_per_s"] / v1["messages_per_s"],
                    **{f"oip_{k}": v for k, v in seq.items() if k != "streams"},
                    **{f"v1_{k}": v for k, v in v1.items() if k != "streams"},
                })  # fmt: skip
            rows.append({**_median(rounds), "round_ratios": [r["ratio"] for r in rounds]})
    finally:
        exit_code = server.stop()
    results = {
        "setup": {"onnxruntime": ort.__version__, "grpcio": grpc.__version__, "device": "cpu",
                  "note": "client and server share the machine's cores (and, here, other users' jobs)"},
        "model": model, "one_observation_per_message": rows, "server_exit_code": exit_code,
    }  # fmt: skip
    print_table(results)
    print(f"\nwrote {write_results('oip', results)}")
    return 0


def print_table(r: dict) -> None:
    m = machine()
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}; onnxruntime {ort.__version__} on CPU")
    print("\none observation per message, ping-pong    ModelStreamInfer (sequences)    StreamForecast (series)")
    print("    streams      obs/s   p50 ms   p99 ms  cpu µs      obs/s   p50 ms   p99 ms  cpu µs   ratio")
    for b in r["one_observation_per_message"]:
        seq = f"{b['oip_messages_per_s']:>10,.0f} {b['oip_p50_ms']:>8.2f} {b['oip_p99_ms']:>8.2f}"
        v1 = f"{b['v1_messages_per_s']:>10,.0f} {b['v1_p50_ms']:>8.2f} {b['v1_p99_ms']:>8.2f}"
        rounds = ", ".join(f"{x:.2f}" for x in b["round_ratios"])
        cpu = f"{b['oip_server_cpu_us_per_msg']:>7.0f}", f"{b['v1_server_cpu_us_per_msg']:>7.0f}"
        print(f"    {b['streams']:>7} {seq} {cpu[0]} {v1} {cpu[1]}   {b['ratio']:.2f}  ({rounds})")
    print("    (cpu µs: server process CPU time per message, all threads; ratio: ModelStreamInfer / StreamForecast)")
    print(f"    (target: ratio >= {TARGET_RATIO} at {TARGET_STREAMS} streams)")


if __name__ == "__main__":
    sys.exit(main())
