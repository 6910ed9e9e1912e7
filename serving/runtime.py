"""ONNX Runtime execution of one model version: session options, providers, and the two graphs.

SessionOptions are chosen for a server that runs many small calls from one executor thread:
intra-op threads configurable (default 1: batching, not threads, gives throughput here),
inter-op 1 and sequential execution (a recurrent cell has no parallel branches), no spinning
(idle ORT threads would burn the cores the gRPC and Python threads need), all graph optimisations.

The provider really in use is read back from `session.get_providers()`; that, not what was asked
for, is what logs, metrics and GetModelInfo report.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.config import RuntimeConfig
from serving.contract import ModelSpec, check_graph
from serving.cuda_state import DeviceResidentStepper
from serving.errors import DeviceUnavailable, ModelContractError, ModelLoadError
from serving.state import StateArena

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def session_options(cfg: RuntimeConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's own warnings about fallbacks are reported by us
    return so


def _nvidia_device_present() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _preload_cuda_dlls() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels before the first CUDA session (ORT >= 1.21).

    preload_dlls prints its complaints; they go to our log instead of stdout.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            preload()
    except Exception as exc:  # a failed preload is not fatal: CUDA may still load from the system
        log.warning("event=cuda_preload_failed error=%r", exc)
    if out.getvalue().strip():
        log.info("event=cuda_preload output=%r", out.getvalue().strip())


def providers_for(cfg: RuntimeConfig) -> list:
    """Providers to ask for; whether CUDA really runs is checked on the created session."""
    if cfg.device == "cpu":
        return [CPU]
    if CUDA not in ort.get_available_providers():
        if cfg.device == "cuda":
            raise DeviceUnavailable(
                f"--device cuda: this onnxruntime build has no {CUDA} "
                f"(available: {ort.get_available_providers()}); install onnxruntime-gpu or use --device cpu"
            )
        return [CPU]
    if cfg.device == "auto" and not _nvidia_device_present():
        log.info("event=device_auto choice=cpu reason=no_nvidia_device")
        return [CPU]
    _preload_cuda_dlls()
    return [(CUDA, {"device_id": cfg.cuda_device_id}), CPU]


def open_session(path: Path, cfg: RuntimeConfig, providers: list) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(str(path), session_options(cfg), providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelLoadError(f"{path}: onnxruntime cannot open it: {exc}") from exc
    asked_cuda = any(p == CUDA or (isinstance(p, tuple) and p[0] == CUDA) for p in providers)
    if cfg.device == "cuda" and session.get_providers()[0] != CUDA:
        raise DeviceUnavailable(
            f"--device cuda: {CUDA} is not active for {path.name} (running on {session.get_providers()}); "
            "check the NVIDIA driver, CUDA 13 and cuDNN 9 libraries, or use --device auto|cpu"
        )
    if asked_cuda and session.get_providers()[0] != CUDA:
        log.warning("event=cuda_fallback graph=%s providers=%s", path.name, session.get_providers())
    return session


def _metadata(session: ort.InferenceSession) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


class OrtModel:
    """The step and sequence graphs of one model version, and how to run them on batches.

    Not thread-safe: one executor thread per model version calls `step` and `sequence`.
    """

    def __init__(self, step_path: Path, sequence_path: Path, cfg: RuntimeConfig) -> None:
        providers = providers_for(cfg)
        self.step_session = open_session(step_path, cfg, providers)
        self.sequence_session = open_session(sequence_path, cfg, providers)
        self.spec = spec = ModelSpec.from_metadata(_metadata(self.step_session), str(step_path))
        sequence_spec = ModelSpec.from_metadata(_metadata(self.sequence_session), str(sequence_path))
        if not spec.same_interface(sequence_spec):
            raise ModelContractError(
                f"{step_path.parent}: {step_path.name} and {sequence_path.name} disagree in metadata_props "
                f"({spec} vs {sequence_spec})"
            )
        self.step_has_cov, self.state = check_graph(self.step_session, spec, "step", str(step_path))
        self.sequence_has_cov, sequence_state = check_graph(self.sequence_session, spec, "sequence", str(sequence_path))
        if sequence_state != self.state:
            raise ModelContractError(
                f"{step_path.parent}: the state tensors of {step_path.name} and {sequence_path.name} differ "
                f"({self.state} vs {sequence_state})"
            )
        self.provider = self.step_session.get_providers()[0]
        self._state_out = [f"{name}_out" for name in spec.state_names]
        self._device: DeviceResidentStepper | None = None
        on_cuda = self.provider == CUDA
        if cfg.resident_state == "on" or (cfg.resident_state == "auto" and on_cuda):
            self._device = DeviceResidentStepper(
                self.step_session, spec.state_names, self.step_has_cov, cfg.cuda_device_id, "cuda" if on_cuda else "cpu"
            )

    def step(
        self,
        arena: StateArena,
        rows: np.ndarray,
        epochs: np.ndarray,
        values: np.ndarray,
        timestamps_ms: np.ndarray,
        covariates: np.ndarray,
    ) -> np.ndarray:
        """One step of the series in `rows`: values [B], timestamps_ms [B], covariates [B, C].

        Reads their state from the arena and writes it back into the rows whose epoch is still
        `epochs` (the series' epochs when the step was asked for: a row freed, or freed and handed
        to another series, meanwhile is left alone); returns forecast [B, horizon, Q].
        """
        if self._device is not None:
            return self._device.step(arena, rows, epochs, values, timestamps_ms, covariates)
        states, _ = arena.gather(rows)
        feeds = {"values": values, "timestamps_ms": timestamps_ms}
        if self.step_has_cov:
            feeds["covariates"] = covariates
        feeds.update(zip(self.spec.state_names, states))
        forecast, *new_states = self.step_session.run(["forecast", *self._state_out], feeds)
        arena.scatter(rows, epochs, new_states)
        return forecast

    def read_state(
        self, arena: StateArena, rows: np.ndarray, epochs: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """The rows' state right after their step (on the thread that ran it), as StateArena.read."""
        if self._device is not None:
            return self._device.read(arena, rows, epochs)
        return arena.read(rows, epochs)

    def sequence(self, values: np.ndarray, timestamps_ms: np.ndarray, covariates: np.ndarray) -> np.ndarray:
        """Whole histories from zero state: values [B, T], timestamps_ms [B, T], covariates [B, T, C].

        Returns forecast [B, horizon, Q] after each history's last step.
        """
        batch = values.shape[0]
        feeds = {"values": values, "timestamps_ms": timestamps_ms}
        if self.sequence_has_cov:
            feeds["covariates"] = covariates
        feeds.update((t.name, np.zeros(t.shape_for(batch), t.dtype)) for t in self.state)
        return self.sequence_session.run(["forecast"], feeds)[0]

    def flush(self, arena: StateArena) -> None:
        """Bring device-resident state back into the arena (CUDA only; a no-op on CPU)."""
        if self._device is not None:
            self._device.flush(arena)

    def warm_up(self, batch_sizes: tuple[int, ...], timestamp_ms: int) -> None:
        """Run both graphs at the given batch sizes on zero state; check shapes and finiteness.

        The first run of a shape allocates ORT's buffers (and, on CUDA, picks kernels), so doing it
        here keeps that latency off the first client request.
        """
        spec = self.spec
        want = (spec.horizon, len(spec.quantiles))
        arena = StateArena(self.state, max(batch_sizes))
        for batch in batch_sizes:
            rows = arena.alloc([None] * batch, 0.0)
            values = np.ones(batch, np.float32)
            ts = np.full(batch, timestamp_ms, np.int64)
            cov = np.zeros((batch, spec.num_covariates), np.float32)
            step_fc = self.step(arena, rows, arena.epoch[rows], values, ts, cov)
            self.flush(arena)
            arena.free(rows)
            seq_fc = self.sequence(
                np.ones((batch, 2), np.float32),
                np.stack([ts, ts + spec.freq_ms], axis=1),
                np.zeros((batch, 2, spec.num_covariates), np.float32),
            )
            for name, fc in (("step", step_fc), ("sequence", seq_fc)):
                if fc.shape != (batch, *want):
                    raise ModelContractError(
                        f"{name} graph returned forecast {list(fc.shape)} at batch {batch}, "
                        f"expected {[batch, *want]} from its metadata (horizon, quantiles)"
                    )
                if not np.isfinite(fc).all():
                    raise ModelLoadError(f"{name} graph returned non-finite forecasts during warm-up")
