"""Export a Forecaster to the two ONNX graphs of CONTRACT §4, and prove they are right.

``model.onnx`` is one recurrent step (B series at once); ``sequence.onnx`` runs T steps. Both take
raw values and epoch-ms timestamps and return raw-unit quantile forecasts, with the recurrent
state as explicit inputs and outputs. Every export is checked against PyTorch and against itself
(step x T == sequence, batching changes nothing) and fails loudly past ``PARITY_TOLERANCE``:
a past onnxscript release exported GRU with the wrong ``linear_before_reset`` and gave silently
wrong numbers, so nothing ships unchecked.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from training.model import MS_PER_DAY, Forecaster
from training.seasonality import calendar_periods

log = logging.getLogger(__name__)
# The exporters narrate every pass at INFO and warn about torchvision ops we never use.
for _name in ("onnxscript", "onnx_ir", "torch.onnx._internal.exporter._registration"):
    logging.getLogger(_name).setLevel(logging.ERROR)

OPSET = 18
PARITY_TOLERANCE = 1e-4
STEP_FILE = "model.onnx"
SEQUENCE_FILE = "sequence.onnx"
PARITY_BATCHES = (1, 3, 64)
PARITY_LENGTHS = (1, 7, 200)


class ExportError(RuntimeError):
    """The exported graphs disagree with the model or with each other."""


@dataclass
class ExportReport:
    step_path: Path
    sequence_path: Path
    opset: int
    # check name -> worst error, measured as max |a - b| / (1 + |b|): absolute near zero,
    # relative for large raw-unit forecasts, where float32 cannot hold 1e-4 absolute.
    parity: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.parity.values(), default=0.0)


def input_names(model: Forecaster) -> list[str]:
    """The graphs' inputs, in order; the same for both graphs (only the shapes differ)."""
    names = ["values", "timestamps_ms"]
    if model.config.num_covariates:
        names.append("covariates")
    return names + list(model.config.state_names)


def output_names(model: Forecaster) -> list[str]:
    return ["forecast", *(f"{name}_out" for name in model.config.state_names)]


def state_batch_axis(name: str) -> int:
    """The batch axis of a state tensor: h and c are [L, B, H], the lag buffer [B, S] and its count [B, 1]."""
    return 1 if name in ("h", "c") else 0


class _Graph(nn.Module):
    """Positional adapter from the graph's inputs to Forecaster.forward.

    The inputs differ by cell (``c`` only for LSTM), by covariates and by lags, so the adapter
    takes ``*inputs`` in the order of ``input_names`` and routes them by name.
    """

    def __init__(self, model: Forecaster, step: bool) -> None:
        super().__init__()
        self.model = model
        self.step = step
        self.names = input_names(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = dict(zip(self.names, inputs))
        values, ts, cov = x["values"], x["timestamps_ms"], x.get("covariates")
        if self.step:  # (B,) -> (B, 1): a step is a sequence of length one
            values, ts = values.unsqueeze(1), ts.unsqueeze(1)
            cov = cov.unsqueeze(1) if cov is not None else None
        return self.model(values, ts, cov, *(x[name] for name in self.model.config.state_names))


def example_inputs(
    model: Forecaster, batch: int, length: int | None, rng: np.random.Generator, state: str = "random"
) -> dict[str, np.ndarray]:
    """Plausible raw inputs: values drawn in the model's own scale, timestamps on its grid.

    ``length=None`` gives step-graph shapes (B,), else sequence shapes (B, T).
    """
    cfg = model.config
    t = 1 if length is None else length
    z = rng.standard_normal((batch, t))
    a = z * cfg.value_scale + cfg.value_loc
    values = (cfg.value_unit * np.sinh(a)).astype(np.float32)
    start = 1_388_534_400_000 + rng.integers(0, 3 * 365 * 48, size=(batch, 1)) * cfg.freq_ms
    ts = (start + np.arange(t) * cfg.freq_ms).astype(np.int64)
    feeds: dict[str, np.ndarray] = {"values": values, "timestamps_ms": ts}
    if cfg.num_covariates:
        loc = np.asarray(cfg.covariate_loc or [0.0] * cfg.num_covariates)
        scale = np.asarray(cfg.covariate_scale or [1.0] * cfg.num_covariates)
        cov = loc + scale * rng.standard_normal((batch, t, cfg.num_covariates))
        feeds["covariates"] = cov.astype(np.float32)
    if length is None:
        feeds = {k: v[:, 0] for k, v in feeds.items()}
    for name in cfg.state_names:
        shape = cfg.state_shape(name, batch)
        if state != "random":
            feeds[name] = np.zeros(shape, np.float32)
        elif name == "lags":  # earlier observations, in the model's own scale
            a = rng.standard_normal(shape) * cfg.value_scale + cfg.value_loc
            feeds[name] = (cfg.value_unit * np.sinh(a)).astype(np.float32)
        elif name == "lags_seen":  # from an empty buffer to a full one
            feeds[name] = rng.integers(0, cfg.buffer_size + 1, shape).astype(np.float32)
        else:
            feeds[name] = rng.uniform(-0.9, 0.9, shape).astype(np.float32)
    return feeds


def _export_one(model: Forecaster, path: Path, step: bool) -> None:
    """Export one graph through the TorchScript exporter (``dynamo=False``), which emits native
    ONNX LSTM/GRU ops and keeps the batch (and the sequence graph's ``time``) dynamic.

    Not the dynamo exporter: torch.export traces nn.LSTM/nn.GRU over time and pins the sequence
    graph's time axis to the example length (guard ``Eq(time, 5)``), and for the step graph, where it
    works, it took 13 s against 0.3 s here for the same ops and the same ONNX Runtime speed
    (docs/experiments.md, 2026-12-02). Parity checks below hold every graph to the same standard.
    """
    graph = _Graph(model, step).eval()
    feeds = example_inputs(model, batch=2, length=None if step else 5, rng=np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[n]) for n in graph.names)
    batch = {0: "batch"} if step else {0: "batch", 1: "time"}
    axes = {"values": batch, "timestamps_ms": batch, "covariates": batch, "forecast": {0: "batch"}}
    for name in model.config.state_names:
        axes |= {name: {state_batch_axis(name): "batch"}, f"{name}_out": {state_batch_axis(name): "batch"}}
    names = graph.names + output_names(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            args,
            str(path),
            dynamo=False,
            input_names=graph.names,
            output_names=output_names(model),
            dynamic_axes={k: v for k, v in axes.items() if k in names},
            opset_version=OPSET,
        )


def _declare_state_outputs(proto: onnx.ModelProto) -> None:
    """Give each ``<state>_out`` the declared shape of its ``<state>`` input.

    The lag buffer's output is the last S of S + T values, a slice whose length the exporter's
    shape inference cannot prove for a dynamic T, so it names the axis anew; the contract wants
    the state to come out as it went in (and the parity checks run it that way).
    """
    inputs = {i.name: i for i in proto.graph.input}
    for out in proto.graph.output:
        source = inputs.get(out.name.removesuffix("_out")) if out.name.endswith("_out") else None
        if source is not None:
            out.type.tensor_type.shape.CopyFrom(source.type.tensor_type.shape)


def _metadata(model: Forecaster, extra: dict[str, str]) -> dict[str, str]:
    cfg = model.config
    periods = calendar_periods(cfg.freq_ms)
    meta = {
        "cell": cfg.cell,
        "num_layers": str(cfg.num_layers),
        "hidden_size": str(cfg.hidden_size),
        "horizon": str(cfg.horizon),
        "quantiles": ",".join(repr(q) for q in cfg.quantiles),
        "point_quantile": repr(cfg.point_quantile),
        # The backtest's season (the pipeline passes eval.season); else one day in steps, or 1.
        "season": str(periods[0] if periods else 1),
        "state": ",".join(cfg.state_names),
        "lags": ",".join(str(lag) for lag in cfg.lags or ()),
        "freq_ms": str(cfg.freq_ms),
        "covariates": ",".join(cfg.covariates),
        "target": "",
        "mlflow_run_id": "",
        "model_config": json.dumps(cfg.to_dict()),
        "opset": str(OPSET),
        "torch_version": torch.__version__,
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta


def _finish(path: Path, meta: dict[str, str]) -> None:
    """Declare the state outputs' shapes, write the metadata, and check the graph."""
    proto = onnx.load(str(path))
    _declare_state_outputs(proto)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = "streaming quantile forecaster; see metadata_props and CONTRACT §4"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def export_model(model: Forecaster, out_dir: Path, metadata: dict[str, str] | None = None) -> ExportReport:
    """Write ``model.onnx`` and ``sequence.onnx`` into ``out_dir``, check them, return the report.

    ``metadata`` adds to (and overrides) the contract keys, e.g. ``target``, ``mlflow_run_id``
    and the resolved training config.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    meta = _metadata(model, metadata or {})
    report = ExportReport(out_dir / STEP_FILE, out_dir / SEQUENCE_FILE, OPSET)
    for path, step in ((report.step_path, True), (report.sequence_path, False)):
        _export_one(model, path, step)
        _finish(path, {**meta, "graph": "step" if step else "sequence"})
    check_contract(report.step_path, report.sequence_path)
    report.parity = check_parity(model, report.step_path, report.sequence_path)
    log.info(
        "exported %s and %s (opset %d); worst parity error %.2e",
        STEP_FILE,
        SEQUENCE_FILE,
        OPSET,
        report.worst,
    )
    if report.worst > PARITY_TOLERANCE:
        bad = {k: v for k, v in report.parity.items() if v > PARITY_TOLERANCE}
        raise ExportError(f"ONNX export disagrees past {PARITY_TOLERANCE:g}: {bad}")
    return report


def check_contract(step_path: Path, sequence_path: Path) -> None:
    """Run the server's own load-time contract check on both graphs, so an export the server would
    refuse fails here, with the server's message."""
    from serving.contract import ModelSpec, check_graph
    from serving.errors import ModelContractError

    states = []
    for path, kind in ((step_path, "step"), (sequence_path, "sequence")):
        session = cpu_session(path)
        try:
            spec = ModelSpec.from_metadata(dict(session.get_modelmeta().custom_metadata_map), str(path))
            states.append(check_graph(session, spec, kind, str(path))[1])
        except ModelContractError as exc:
            raise ExportError(f"the exported graph breaks the serving contract: {exc}") from exc
    if states[0] != states[1]:
        raise ExportError(f"the two graphs' state tensors differ: {states[0]} vs {states[1]}")


# -- parity -------------------------------------------------------------------------------------
def _row(a: np.ndarray, i: int, axis: int) -> np.ndarray:
    """Row i of a batch, keeping the batch axis (length 1)."""
    return np.take(a, [i], axis=axis)


def _err(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        raise ExportError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a.astype(np.float64) - b) / (1.0 + np.abs(b.astype(np.float64)))))


def _torch_run(model: Forecaster, feeds: dict[str, np.ndarray], step: bool) -> list[np.ndarray]:
    graph = _Graph(model, step).eval()
    with torch.no_grad():
        outs = graph(*(torch.from_numpy(feeds[n]) for n in graph.names))
    return [o.numpy() for o in outs]


def cpu_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(model: Forecaster, step_path: Path, sequence_path: Path) -> dict[str, float]:
    """Worst error of each check: ORT vs PyTorch, step x T vs sequence, alone vs batched."""
    step, seq = cpu_session(step_path), cpu_session(sequence_path)
    state_names = model.config.state_names
    rng = np.random.default_rng(1234)
    worst: dict[str, float] = {}

    def note(name: str, value: float) -> None:
        worst[name] = max(worst.get(name, 0.0), value)

    for batch in PARITY_BATCHES:
        feeds = example_inputs(model, batch, None, rng)
        got = step.run(None, feeds)
        for a, b in zip(got, _torch_run(model, feeds, step=True)):
            note("step_ort_vs_torch", _err(a, b))
        for length in PARITY_LENGTHS:
            feeds = example_inputs(model, batch, length, rng, state="zero" if length == 200 else "random")
            seq_out = seq.run(None, feeds)
            for a, b in zip(seq_out, _torch_run(model, feeds, step=False)):
                note("sequence_ort_vs_torch", _err(a, b))
            # The step graph T times from the same state must land where one sequence run does.
            state = {n: feeds[n] for n in state_names}
            for t in range(length):
                step_feeds = {k: feeds[k][:, t] for k in ("values", "timestamps_ms", "covariates") if k in feeds}
                out = step.run(None, {**step_feeds, **state})
                state = dict(zip(state_names, out[1:]))
            for a, b in zip(out, seq_out):
                note("step_x_T_vs_sequence", _err(a, b))
            if batch > 1:
                # Series 1 answered alone equals series 1 inside the batch.
                alone = {k: _row(v, 1, state_batch_axis(k) if k in state_names else 0) for k, v in feeds.items()}
                one = seq.run(None, alone)
                note("alone_vs_batched", _err(one[0], seq_out[0][1:2]))
                for name, a, b in zip(state_names, one[1:], seq_out[1:]):
                    note("alone_vs_batched", _err(a, _row(b, 1, state_batch_axis(name))))
    # Calendar edges: midnights (and 1 ms either side) on random days and on the days around
    # each holiday, where a float32 division in a graph would put the day boundary minutes off.
    days = [
        *rng.integers(16_000, 20_000, size=32).tolist(),
        *(d + k for d in model.config.holiday_days for k in (-1, 0, 1, 2)),
    ]
    edges = np.array([d * MS_PER_DAY + offset for d in days for offset in (-1, 0, 1)], np.int64)
    feeds = {**example_inputs(model, len(edges), None, rng), "timestamps_ms": edges}
    for a, b in zip(step.run(None, feeds), _torch_run(model, feeds, step=True)):
        note("step_ort_vs_torch", _err(a, b))
    seq_feeds = {k: (v[:, None] if k in ("values", "timestamps_ms", "covariates") else v) for k, v in feeds.items()}
    for a, b in zip(seq.run(None, seq_feeds), _torch_run(model, seq_feeds, step=False)):
        note("sequence_ort_vs_torch", _err(a, b))
    return worst
