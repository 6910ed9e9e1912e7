"""The exported model's contract (CONTRACT §4), checked against real ORT sessions at load time.

`ModelSpec` is the metadata both graphs carry; `check_graph` verifies one graph's inputs and
outputs (names, dtypes, ranks, and static dims where the graph fixes them), so a broken export
is refused with a message naming the file and the tensor instead of failing on the first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_metadata(cls, props: Mapping[str, str], where: str) -> ModelSpec:
        missing = [key for key in REQUIRED_METADATA if key not in props]
        if missing:
            raise ModelContractError(f"{where}: metadata_props lacks {', '.join(missing)}")
        try:
            spec = cls(
                cell=props["cell"].strip().lower(),
                num_layers=int(props["num_layers"]),
                hidden_size=int(props["hidden_size"]),
                horizon=int(props["horizon"]),
                quantiles=tuple(float(q) for q in _split(props["quantiles"])),
                freq_ms=int(float(props["freq_ms"])),
                covariates=tuple(_split(props["covariates"])),
                target=props["target"],
                mlflow_run_id=props["mlflow_run_id"],
                extra={k: v for k, v in props.items() if k not in REQUIRED_METADATA},
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
        if problems:
            raise ModelContractError(f"{where}: " + "; ".join(problems))

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    @property
    def num_covariates(self) -> int:
        return len(self.covariates)

    @property
    def point_index(self) -> int:
        """Index of the quantile used as the point forecast: the one nearest the median."""
        return min(range(len(self.quantiles)), key=lambda i: abs(self.quantiles[i] - 0.5))

    def same_interface(self, other: ModelSpec) -> bool:
        keys = ("cell", "num_layers", "hidden_size", "horizon", "quantiles", "freq_ms", "covariates")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _dims(kind: GraphKind, spec: ModelSpec) -> dict[str, tuple[str, list[Any]]]:
    """Expected inputs and outputs: name -> (dtype, dims); a str dim is free (dynamic or any)."""
    lh = [spec.num_layers, "B", spec.hidden_size]  # state [L, B, H]
    time = [] if kind == "step" else ["T"]
    io: dict[str, tuple[str, list[Any]]] = {
        "values": (_FLOAT, ["B", *time]),
        "timestamps_ms": (_INT64, ["B", *time]),
    }
    if spec.num_covariates:
        io["covariates"] = (_FLOAT, ["B", *time, spec.num_covariates])
    for name in spec.state_names:
        io[name] = (_FLOAT, lh)
    io["forecast"] = (_FLOAT, ["B", spec.horizon, len(spec.quantiles)])
    for name in spec.state_names:
        io[f"{name}_out"] = (_FLOAT, lh)
    return io


def check_graph(session: Any, spec: ModelSpec, kind: GraphKind, where: str) -> bool:
    """Check an onnxruntime.InferenceSession against the contract; raise ModelContractError.

    Returns whether the graph takes a `covariates` input (a model without covariates may still
    declare one of width 0 in its sequence graph; it is then fed an empty array).
    """
    expected = _dims(kind, spec)
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    problems = []
    optional = {"covariates"} if spec.num_covariates == 0 else set()
    for name in [*inputs, *outputs]:
        if name in optional:
            continue
        if name not in expected:
            problems.append(f"unexpected tensor {name!r}")
    for name, (dtype, dims) in expected.items():
        is_output = name == "forecast" or name.endswith("_out")
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
    if problems:
        raise ModelContractError(f"{where} ({kind} graph): " + "; ".join(problems))
    return "covariates" in inputs
