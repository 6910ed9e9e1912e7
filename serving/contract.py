"""The exported model's contract (CONTRACT §4), checked against real ORT sessions at load time.

`ModelSpec` is the metadata both graphs carry; `check_graph` verifies one graph's inputs and
outputs (names, dtypes, ranks, and static dims where the graph fixes them) and returns the shapes
of its state tensors, so a broken export is refused with a message naming the file and the tensor
instead of failing on the first request.

The recurrent state is generic: the metadata `state` lists its tensors' names in order, every
state input `X` has an output `X_out` of the same type and shape, and each has exactly one dynamic
axis, the batch (`h`, `c` are [L, B, H]; a lag buffer is [B, S]). Nothing downstream (state
store, CUDA path, snapshots) knows what a tensor means, so a later state tensor needs no server
change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serving.errors import ModelContractError

REQUIRED_METADATA = (
    "cell",
    "num_layers",
    "hidden_size",
    "horizon",
    "quantiles",
    "freq_ms",
    "covariates",
    "target",
    "mlflow_run_id",
)
CELLS = ("lstm", "gru")
GraphKind = Literal["step", "sequence"]

_FLOAT, _INT64 = "tensor(float)", "tensor(int64)"
_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64}
DATA_INPUTS = ("values", "timestamps_ms", "covariates")


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of a graph: its name, dtype, and shape with None at the batch axis."""

    name: str
    shape: tuple[int | None, ...]
    dtype: type = np.float32

    @property
    def batch_axis(self) -> int:
        return self.shape.index(None)

    def shape_for(self, batch: int) -> tuple[int, ...]:
        """The shape for `batch` series (the batch axis filled in)."""
        return tuple(batch if d is None else d for d in self.shape)

    def bytes_per_series(self) -> int:
        return int(np.prod(self.shape_for(1))) * np.dtype(self.dtype).itemsize


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class ModelSpec:
    """What a served model is, from its `metadata_props`."""

    cell: str
    num_layers: int
    hidden_size: int
    horizon: int
    quantiles: tuple[float, ...]
    freq_ms: int
    covariates: tuple[str, ...]
    target: str
    mlflow_run_id: str
    state_names: tuple[str, ...]
    point_quantile: float
    season: int | None = None  # the backtest's seasonal lag, in steps (None: not recorded)
    lags: tuple[int, ...] = ()

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], where: str) -> ModelSpec:
        missing = [key for key in REQUIRED_METADATA if key not in props]
        if missing:
            raise ModelContractError(f"{where}: metadata_props lacks {', '.join(missing)}")
        try:
            cell = props["cell"].strip().lower()
            quantiles = tuple(float(q) for q in _split(props["quantiles"]))
            # Models exported before the state list and point_quantile were recorded: LSTM h, c or
            # GRU h, and the quantile nearest 0.5 (the same rule export uses now).
            state = tuple(_split(props["state"])) if "state" in props else (("h", "c") if cell == "lstm" else ("h",))
            point = (
                float(props["point_quantile"])
                if "point_quantile" in props
                else min(quantiles, key=lambda q: (abs(q - 0.5), -q), default=0.5)
            )
            spec = cls(
                cell=cell,
                num_layers=int(props["num_layers"]),
                hidden_size=int(props["hidden_size"]),
                horizon=int(props["horizon"]),
                quantiles=quantiles,
                freq_ms=int(float(props["freq_ms"])),
                covariates=tuple(_split(props["covariates"])),
                target=props["target"],
                mlflow_run_id=props["mlflow_run_id"],
                state_names=state,
                point_quantile=point,
                season=int(props["season"]) if props.get("season", "").strip() else None,
                lags=tuple(int(x) for x in _split(props.get("lags", ""))),
            )
        except ValueError as exc:
            raise ModelContractError(f"{where}: unreadable metadata_props ({exc})") from exc
        spec._validate(where)
        return spec

    def _validate(self, where: str) -> None:
        problems = []
        if self.cell not in CELLS:
            problems.append(f"cell must be one of {CELLS}, got {self.cell!r}")
        for name in ("num_layers", "hidden_size", "horizon", "freq_ms"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        qs = self.quantiles
        if not qs or any(not 0 < q < 1 for q in qs) or list(qs) != sorted(set(qs)):
            problems.append(f"quantiles must be ascending, distinct, in (0, 1), got {list(qs)}")
        if not self.state_names or len(set(self.state_names)) != len(self.state_names):
            problems.append(f"state must list distinct tensor names, got {list(self.state_names)}")
        if self.point_quantile not in qs:
            problems.append(f"point_quantile {self.point_quantile} is not one of the quantiles {list(qs)}")
        if self.season is not None and self.season < 1:
            problems.append(f"season must be >= 1, got {self.season}")
        if problems:
            raise ModelContractError(f"{where}: " + "; ".join(problems))

    @property
    def num_covariates(self) -> int:
        return len(self.covariates)

    @property
    def point_index(self) -> int:
        """Index of the quantile whose path is the point forecast (metadata point_quantile)."""
        return self.quantiles.index(self.point_quantile)

    def same_interface(self, other: ModelSpec) -> bool:
        keys = ("cell", "num_layers", "hidden_size", "horizon", "quantiles", "freq_ms", "covariates", "state_names")
        return all(getattr(self, k) == getattr(other, k) for k in keys) and self.point_quantile == other.point_quantile


def _dims(kind: GraphKind, spec: ModelSpec) -> dict[str, tuple[str, list[Any]]]:
    """Expected data inputs and the forecast: name -> (dtype, dims); a str dim is free (dynamic or any)."""
    time = [] if kind == "step" else ["T"]
    io: dict[str, tuple[str, list[Any]]] = {
        "values": (_FLOAT, ["B", *time]),
        "timestamps_ms": (_INT64, ["B", *time]),
    }
    if spec.num_covariates:
        io["covariates"] = (_FLOAT, ["B", *time, spec.num_covariates])
    io["forecast"] = (_FLOAT, ["B", spec.horizon, len(spec.quantiles)])
    return io


def _state_tensor(node: Any, out: Any, spec: ModelSpec, problems: list[str]) -> StateTensor | None:
    """A state input and its `_out`: same type, same shape, one dynamic (batch) axis."""
    name = node.name
    if node.type not in _DTYPES:
        problems.append(f"state {name!r} is {node.type}; state tensors are float or int64")
        return None
    if out.type != node.type:
        problems.append(f"state {name!r} is {node.type} but {name}_out is {out.type}")
    shape = tuple(d if isinstance(d, int) else None for d in node.shape)
    shape_out = tuple(d if isinstance(d, int) else None for d in out.shape)
    if shape.count(None) != 1:
        problems.append(f"state {name!r} {list(node.shape)} must have exactly one dynamic (batch) axis")
        return None
    if shape_out != shape:
        problems.append(f"state {name!r} is {list(node.shape)} but {name}_out is {list(out.shape)}")
    if name in ("h", "c") and shape != (spec.num_layers, None, spec.hidden_size):
        problems.append(f"{name!r} is {list(node.shape)}, expected [num_layers, B, hidden_size]")
    return StateTensor(name, shape, _DTYPES[node.type])


def check_graph(session: Any, spec: ModelSpec, kind: GraphKind, where: str) -> tuple[bool, tuple[StateTensor, ...]]:
    """Check an onnxruntime.InferenceSession against the contract; raise ModelContractError.

    Returns whether the graph takes a `covariates` input (a model without covariates may still
    declare one of width 0 in its sequence graph; it is then fed an empty array) and the state
    tensors in metadata order.
    """
    expected = _dims(kind, spec)
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    problems = []
    optional = {"covariates"} if spec.num_covariates == 0 else set()
    known = {*expected, *spec.state_names, *(f"{n}_out" for n in spec.state_names)}
    for name in [*inputs, *outputs]:
        if name not in known and name not in optional:
            problems.append(f"unexpected tensor {name!r} (metadata state lists {list(spec.state_names)})")
    for name, (dtype, dims) in expected.items():
        is_output = name == "forecast"
        node = (outputs if is_output else inputs).get(name)
        if node is None:
            problems.append(f"missing {'output' if is_output else 'input'} {name!r}")
            continue
        if node.type != dtype:
            problems.append(f"{name!r} is {node.type}, expected {dtype}")
        shape = list(node.shape)
        if len(shape) != len(dims):
            problems.append(f"{name!r} has rank {len(shape)} {shape}, expected rank {len(dims)} {dims}")
            continue
        for axis, (got, want) in enumerate(zip(shape, dims)):
            if isinstance(want, int) and isinstance(got, int) and got != want:
                problems.append(f"{name!r} dim {axis} is {got}, expected {want}")
    state = []
    for name in spec.state_names:
        node, out = inputs.get(name), outputs.get(f"{name}_out")
        if node is None or out is None:
            problems.append(f"state {name!r} needs input {name!r} and output {name}_out")
            continue
        tensor = _state_tensor(node, out, spec, problems)
        if tensor is not None:
            state.append(tensor)
    if problems:
        raise ModelContractError(f"{where} ({kind} graph): " + "; ".join(problems))
    return "covariates" in inputs, tuple(state)
