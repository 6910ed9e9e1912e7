"""ONNX Runtime step vs PyTorch eager, batched throughput, and step vs window re-run.

python -m bench.export_speed [--config configs/elecdemand.yaml] [--threads 1]

Uses the default model's shape (from the config) with scaling fitted on its data; weights are
untrained because speed does not depend on their values. Both runtimes get the same thread
count. Targets: ORT step >= 5x faster than PyTorch eager at batch 1; a step >= 10x cheaper than
re-running a 336-step window.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench.common import print_table, write_results
from training.config import load_config
from training.export import example_inputs, export_model
from training.model import Forecaster
from training.pipeline import prepare

WINDOW = 336


def per_call(fn: Callable[[], object], round_seconds: float = 0.2, repeats: int = 5) -> float:
    """Median seconds per call over `repeats` rounds, each calibrated to last `round_seconds`."""
    fn()  # warm-up
    calls = 1
    while True:
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - started
        if elapsed >= round_seconds:
            break
        calls *= 2
    rounds = [elapsed / calls]
    for _ in range(repeats - 1):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) / calls)
    return statistics.median(rounds)


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/elecdemand.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    _, _, model_cfg, _ = prepare(cfg)
    model = Forecaster(model_cfg).eval()  # untrained: speed does not depend on the weights' values
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, Path(tmp))
        step, seq = session(Path(tmp) / "model.onnx", args.threads), session(Path(tmp) / "sequence.onnx", args.threads)
        f1 = example_inputs(model, 1, None, rng)
        f256 = example_inputs(model, 256, None, rng)
        fwin = example_inputs(model, 1, WINDOW, rng, state="zero")
        t1 = {k: torch.from_numpy(v) for k, v in f1.items()}

        def torch_step() -> None:
            with torch.no_grad():
                state = (t1[name] for name in model.config.state_names)
                model(t1["values"][:, None], t1["timestamps_ms"][:, None], None, *state)

        t_torch = per_call(torch_step)
        t_ort1 = per_call(lambda: step.run(None, f1))
        t_ort256 = per_call(lambda: step.run(None, f256))
        t_window = per_call(lambda: seq.run(None, fwin))
    c = model.config
    rows = [
        {"measure": "PyTorch eager step, batch 1", "µs/call": t_torch * 1e6, "ratio": 1.0, "target": ""},
        {
            "measure": "ONNX Runtime step, batch 1",
            "µs/call": t_ort1 * 1e6,
            "ratio": t_torch / t_ort1,
            "target": ">= 5x vs eager",
        },
        {
            "measure": "ONNX Runtime step, batch 256",
            "µs/call": t_ort256 * 1e6,
            "series steps/s": 256 / t_ort256,
            "target": "",
        },
        {
            "measure": f"ONNX Runtime {WINDOW}-step window re-run, batch 1",
            "µs/call": t_window * 1e6,
            "ratio": t_window / t_ort1,
            "target": ">= 10x vs one step",
        },
    ]
    title = f"export speed: {c.cell.upper()} {c.num_layers}x{c.hidden_size}, horizon {c.horizon}, {c.num_quantiles} quantiles, {args.threads} thread(s), provider CPUExecutionProvider"
    print_table(rows, ["measure", "µs/call", "ratio", "series steps/s", "target"], title)
    summary = {
        "ort_vs_torch_step_b1": t_torch / t_ort1,
        "window_rerun_vs_step": t_window / t_ort1,
        "ort_steps_per_s_b256": 256 / t_ort256,
    }
    print({k: round(v, 2) for k, v in summary.items()})
    print(
        f"wrote {write_results('export_speed', {'threads': args.threads, 'rows': rows, 'summary': summary, 'model': c.to_dict()})}"
    )


if __name__ == "__main__":
    main()
