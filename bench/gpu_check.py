"""GPU check: where CUDA is really active, the server's CUDA path against its CPU path.

    python -m bench.gpu_check [--model-dir DIR] [--steps N]

1. Parity through the server path: the same streams (several series, changing batch composition,
   a series that ends and restarts) go to a server on `--device cuda` and one on `--device cpu`;
   every forecast must agree within 1e-4 (|a - b| / (1 + |b|)).
2. Speed: OrtModel.step (state gather, the ORT call, scatter; on CUDA the state stays on the
   device between steps) at batch 1, 256 and 4096: steps/s and series-steps/s, CUDA and CPU.

Where CUDA is not really active (no NVIDIA device, no CUDA provider in this onnxruntime build, or
a session that silently falls back to CPU) it says why and writes {"ran": false, "reason": ...}:
nothing is measured, and docs/benchmarks.md must say the check has not run. Writes
bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.common import write_results

START_MS, FREQ_MS = 1_388_534_400_000, 1_800_000
TOLERANCE = 1e-4
BATCHES = (1, 256, 4096)


def cuda_status(model_dir: Path) -> str | None:
    """None when CUDA really runs the step graph here, else the reason it does not."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime build has no CUDAExecutionProvider ({ort.get_available_providers()})"
    if not glob.glob("/dev/nvidia[0-9]*"):
        return "no NVIDIA device (/dev/nvidia*) on this machine"
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401  (on the GPU image, torch's CUDA libraries are what ORT loads)
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return f"onnxruntime fell back to {session.get_providers()}: CUDA 13 / cuDNN 9 libraries not loadable"
    return None


async def stream_plan(device: str, model_dir: Path) -> list[np.ndarray]:
    """Stream the fixed plan through a real server on `device`; every forecast [horizon, Q], in order."""
    import grpc

    from serving.config import ModelSourceConfig, RuntimeConfig, ServerConfig
    from serving.proto import pb, pb_grpc
    from serving.server import create_server

    config = ServerConfig(
        port=0,
        metrics_port=None,
        source=ModelSourceConfig(model_uri=str(model_dir), watch_interval_s=0),
        runtime=RuntimeConfig(device=device),
    )
    server, port = await create_server(config)
    await server.ready()
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(300)]
    plans = [ids[:256]] * 6 + [ids[40:300]] * 3 + [ids[:256]] * 3  # steady, then another composition, then back
    steps: dict[str, int] = {}
    out: list[np.ndarray] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = pb_grpc.ForecasterStub(channel).StreamForecast()
            for k, plan in enumerate(plans):
                obs = []
                for s in plan:
                    t = steps.get(s, 0)
                    end = k == 8 and s == "s50"  # one series ends; it restarts from zero state later
                    obs.append(pb.Observation(series_id=s, timestamp_ms=START_MS + t * FREQ_MS,
                                              value=float(3000 + 500 * rng.standard_normal()), end=end))  # fmt: skip
                    steps[s] = 0 if end else t + 1
                await call.write(pb.StreamRequest(observations=obs))
                answer = await call.read()
                out += [np.array([q.values for q in f.quantiles]).T for f in answer.forecasts]
            await call.done_writing()
    finally:
        await server.stop(0)
    return out


def step_speed(device: str, model_dir: Path, batch: int, seconds: float) -> dict:
    """OrtModel.step on the same `batch` series again and again (the steady streaming case)."""
    from serving.config import RuntimeConfig
    from serving.runtime import OrtModel
    from serving.state import StateArena

    model = OrtModel(model_dir / "model.onnx", model_dir / "sequence.onnx", RuntimeConfig(device=device))
    arena = StateArena(model.state, batch, batch)
    rows = arena.alloc([None] * batch, 0.0)
    epochs = arena.epoch[rows].copy()
    values = np.full(batch, 3000.0, np.float32)
    cov = np.zeros((batch, model.spec.num_covariates), np.float32)
    t, calls = 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.step(arena, rows, epochs, values, np.full(batch, START_MS + t * FREQ_MS, np.int64), cov)
        t, calls = t + 1, calls + 1
    model.flush(arena)
    elapsed = time.perf_counter() - started
    return {
        "device": device,
        "batch": batch,
        "steps_per_s": calls / elapsed,
        "series_steps_per_s": calls * batch / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the default config's network")
    parser.add_argument("--seconds", type=float, default=5.0, help="per speed measurement")
    args = parser.parse_args(argv)
    from bench.stream import default_model_dir

    model_dir = args.model_dir or default_model_dir()
    reason = cuda_status(model_dir)
    if reason is not None:
        print(f"gpu_check: not run: {reason}")
        print(f"wrote {write_results('gpu_check', {'ran': False, 'reason': reason})}")
        return 0
    cuda, cpu = (asyncio.run(stream_plan(d, model_dir)) for d in ("cuda", "cpu"))
    worst = max(float(np.max(np.abs(a - b) / (1.0 + np.abs(b)))) for a, b in zip(cuda, cpu))
    print(f"parity through the server, {len(cuda)} forecasts: worst |cuda - cpu| / (1 + |cpu|) = {worst:.2e}")
    speed = [step_speed(d, model_dir, b, args.seconds) for b in BATCHES for d in ("cuda", "cpu")]
    for row in speed:
        print(f"{row['device']:>4} batch {row['batch']:>5}: {row['steps_per_s']:>9.0f} steps/s, "
              f"{row['series_steps_per_s']:>12.0f} series-steps/s")  # fmt: skip
    ok = worst <= TOLERANCE and len(cuda) == len(cpu)
    payload = {"ran": True, "parity_worst": worst, "forecasts": len(cuda), "parity_ok": ok, "speed": speed}
    print(f"wrote {write_results('gpu_check', payload)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
