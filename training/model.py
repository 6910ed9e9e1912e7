"""The forecaster network: raw values and timestamps in, raw-unit quantile forecasts out.

Everything a client would otherwise have to reproduce — value scaling, calendar encodings from
epoch-millisecond timestamps, covariate scaling, the inverse transform of the forecast — happens
inside the module, so the exported ONNX graphs carry it and train/serve skew cannot happen.
This file holds only the network and its config: no I/O, so export and tests need nothing else.

Scale and many series. One global model serves every series. Values go through a log-like
transform, ``asinh(x / value_unit)``, then are standardised with statistics pooled over all
training series. A series ten times larger than another therefore differs by a constant offset
(about ``log 10 / value_scale`` standard units), not by a factor; and the head forecasts each
quantile as an offset from the latest observation (``z_t + delta``), so the series' level comes
from its input while the network learns shape and dynamics shared across series. asinh (unlike
log) accepts zero and negative values. Limit: a series far outside the magnitudes seen in
training pushes the recurrent gates towards saturation, so train on series of the magnitudes
you will serve.

Quantiles never cross by construction: the head emits the lowest quantile and non-negative
(softplus) increments for each next one; the inverse transform is monotone, so the order
survives into raw units.

Members. With ``members`` K > 1 the model is K networks of ``hidden_size / K`` units each, trained
one after another from their own seeds (own initialisation, data order and early stopping; see
``training.train.train_forecaster``), then packed into one recurrent stack by ``pack_members``:
block-diagonal recurrent and layer-to-layer weights, shared inputs, one head each. The forecast
is the mean of the members' z-space quantiles, which still never cross. The exported graphs stay
a plain LSTM/GRU of ``hidden_size`` units (the state holds every member's units), so the ONNX
contract and the server do not change. Averaging independently trained networks removes much of
the seed-to-seed variance of one network, which on one year of data is larger than the effect of
most design choices (docs/benchmarks.md).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

MS_PER_DAY = 86_400_000
MS_PER_WEEK = 7 * MS_PER_DAY
# 1970-01-01 (epoch day 0) was a Thursday; shifting by 3 days makes Monday day 0 of the week.
EPOCH_TO_MONDAY_MS = 3 * MS_PER_DAY
CELLS = ("lstm", "gru")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network plus the scaling statistics fitted on the training split."""

    cell: str = "lstm"
    hidden_size: int = 64  # recurrent units in all (the state's H), split evenly between members
    num_layers: int = 2
    members: int = 1  # independently trained networks, averaged (see the module docstring)
    dropout: float = 0.0
    horizon: int = 48
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    covariates: tuple[str, ...] = ()  # names, in the order of the covariate axis
    freq_ms: int = 1_800_000  # step between observations, ms
    daily_harmonics: int = 3  # sin/cos pairs of the time of day
    # Public holidays as ISO dates ("2014-12-25"), in the clock of the timestamps. The graph flags
    # whether today and tomorrow are holidays: a calendar fact known in advance, which matters
    # for a day-ahead forecast as much as the weekday does.
    holidays: tuple[str, ...] = ()
    # z = (asinh(x / value_unit) - value_loc) / value_scale; see the module docstring.
    value_unit: float = 1.0
    value_loc: float = 0.0
    value_scale: float = 1.0
    covariate_loc: tuple[float, ...] = field(default=())
    covariate_scale: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples so the config stays hashable and frozen.
        for name in ("quantiles", "covariates", "covariate_loc", "covariate_scale", "holidays"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # YAML reads 2014-12-25 as a date object; keep ISO strings (JSON, ONNX metadata).
        object.__setattr__(self, "holidays", tuple(str(d) for d in self.holidays))
        if self.cell not in CELLS:
            raise ValueError(f"model.cell must be one of {CELLS}, got {self.cell!r}")
        for name in ("hidden_size", "num_layers", "horizon", "freq_ms", "members"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.members:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must split evenly between model.members ({self.members})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        q = self.quantiles
        if not q or any(not 0.0 < x < 1.0 for x in q) or list(q) != sorted(set(q)):
            raise ValueError(
                f"model.quantiles must be strictly increasing values in (0, 1), e.g. [0.1, 0.5, 0.9]; got {list(q)}"
            )
        if self.value_unit <= 0 or self.value_scale <= 0:
            raise ValueError("value_unit and value_scale must be positive")
        c = len(self.covariates)
        if self.covariate_loc and (len(self.covariate_loc) != c or len(self.covariate_scale) != c):
            raise ValueError(f"covariate_loc/covariate_scale need one entry per covariate ({c})")
        for day in self.holidays:
            try:
                dt.date.fromisoformat(str(day))
            except ValueError:
                raise ValueError(f"model.holidays takes ISO dates like 2014-12-25, got {day!r}") from None
        if len(set(self.covariates)) != c:
            raise ValueError(f"covariate names must be unique, got {list(self.covariates)}")

    @property
    def member_size(self) -> int:
        return self.hidden_size // self.members

    @property
    def num_quantiles(self) -> int:
        return len(self.quantiles)

    @property
    def num_covariates(self) -> int:
        return len(self.covariates)

    @property
    def num_features(self) -> int:
        # scaled value, daily sin/cos pairs, 7 weekday one-hots, holiday today/tomorrow, covariates. No time-of-year
        # encoding: with a year or two of history it only memorises, and positions of the year
        # past the training data would be extrapolation; the recurrent state tracks the level.
        return 1 + 2 * self.daily_harmonics + 7 + 2 + self.num_covariates

    @property
    def holiday_days(self) -> list[int]:
        """Holidays as days since 1970-01-01."""
        return [(dt.date.fromisoformat(str(d)) - dt.date(1970, 1, 1)).days for d in self.holidays]

    def to_dict(self) -> dict:
        return asdict(self)


class Forecaster(nn.Module):
    """LSTM/GRU over per-step features, with a direct multi-horizon quantile head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        rnn = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn(
            input_size=config.num_features,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        # One head per member (rows member-major); block-diagonal when built by pack_members.
        self.head = nn.Linear(config.hidden_size, config.members * config.horizon * config.num_quantiles)
        c = config.num_covariates
        # Buffers, not Python floats, so the scaling lives in the state dict and the graphs.
        self.register_buffer("cov_loc", torch.tensor(config.covariate_loc or [0.0] * c, dtype=torch.float32))
        self.register_buffer("cov_scale", torch.tensor(config.covariate_scale or [1.0] * c, dtype=torch.float32))
        self.register_buffer("daily_k", torch.arange(1, config.daily_harmonics + 1, dtype=torch.float32))
        self.register_buffer("weekday_start_ms", torch.arange(7, dtype=torch.int64) * MS_PER_DAY)
        # An empty calendar gets one day no timestamp reaches, so the feature layout stays the same.
        days = torch.tensor(config.holiday_days or [-(10**9)], dtype=torch.int64)
        self.register_buffer("holiday_start_ms", days * MS_PER_DAY)

    # -- transforms -------------------------------------------------------------------------
    def scale_values(self, values: torch.Tensor) -> torch.Tensor:
        """Raw values -> standardised z (any shape). asinh written out so every runtime has it."""
        cfg = self.config
        x = values / cfg.value_unit
        asinh = torch.sign(x) * torch.log(x.abs() + torch.sqrt(x * x + 1.0))
        return (asinh - cfg.value_loc) / cfg.value_scale

    def unscale_values(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of scale_values (sinh written out for the same reason)."""
        cfg = self.config
        a = z * cfg.value_scale + cfg.value_loc
        return cfg.value_unit * 0.5 * (torch.exp(a) - torch.exp(-a))

    def features(
        self, values: torch.Tensor, timestamps_ms: torch.Tensor, covariates: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T) values, (B, T) int64 ms, (B, T, C) covariates -> (B, T, F) features.

        Remainders are taken on int64 before casting: epoch ms do not fit float32 exactly,
        but a position within a day or week does.
        """
        z = self.scale_values(values).unsqueeze(-1)  # (B, T, 1)
        day = torch.remainder(timestamps_ms, MS_PER_DAY).to(torch.float32) / MS_PER_DAY
        angle = (2.0 * math.pi) * day.unsqueeze(-1) * self.daily_k  # (B, T, K)
        # Weekday and holidays by comparing int64 ms against day boundaries, never by dividing:
        # exporters lower int64 division through float32, which misplaces midnight by minutes.
        week_ms = torch.remainder(timestamps_ms + EPOCH_TO_MONDAY_MS, MS_PER_WEEK).unsqueeze(-1)  # (B, T, 1)
        onehot = ((week_ms >= self.weekday_start_ms) & (week_ms < self.weekday_start_ms + MS_PER_DAY)).to(torch.float32)
        ts = timestamps_ms.unsqueeze(-1)  # (B, T, 1) against (K,) holiday starts
        start = self.holiday_start_ms
        today = ((ts >= start) & (ts < start + MS_PER_DAY)).any(dim=-1, keepdim=True).to(torch.float32)
        later = ts + MS_PER_DAY
        tomorrow = ((later >= start) & (later < start + MS_PER_DAY)).any(dim=-1, keepdim=True).to(torch.float32)
        parts = [z, torch.sin(angle), torch.cos(angle), onehot, today, tomorrow]
        if covariates is not None and self.config.num_covariates:
            parts.append((covariates - self.cov_loc) / self.cov_scale)
        return torch.cat(parts, dim=-1)

    # -- network ----------------------------------------------------------------------------
    def encode(
        self,
        values: torch.Tensor,
        timestamps_ms: torch.Tensor,
        covariates: torch.Tensor | None,
        h: torch.Tensor,
        c: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the recurrent cell: -> top-layer outputs (B, T, H), h_out (L, B, H), c_out."""
        x = self.features(values, timestamps_ms, covariates)
        if self.config.cell == "lstm":
            out, (h_out, c_out) = self.rnn(x, (h, c))
            return out, h_out, c_out
        out, h_out = self.rnn(x, h)
        return out, h_out, None

    def quantiles_z(self, hidden: torch.Tensor, z_last: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden, (...) latest scaled value -> (..., horizon, Q) non-crossing z quantiles
        (with members, their mean)."""
        cfg = self.config
        shape = (cfg.horizon, cfg.num_quantiles) if cfg.members == 1 else (cfg.members, cfg.horizon, cfg.num_quantiles)
        raw = self.head(hidden).unflatten(-1, shape)
        for _ in shape:
            z_last = z_last.unsqueeze(-1)
        lowest = raw[..., :1] + z_last
        if cfg.num_quantiles > 1:
            # contiguous() first: softplus on the strided view measured ~6x slower (75 ms of a step).
            steps = nn.functional.softplus(raw[..., 1:].contiguous())
            lowest = torch.cat([lowest, lowest + torch.cumsum(steps, dim=-1)], dim=-1)
        return lowest if cfg.members == 1 else lowest.mean(dim=-3)

    def zero_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        h = torch.zeros(cfg.num_layers, batch, cfg.hidden_size)
        return h, (torch.zeros_like(h) if cfg.cell == "lstm" else None)

    def forecast_all_z(
        self, values: torch.Tensor, timestamps_ms: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Training/backtest path: from zero state, the z-space forecast after every step.

        (B, T) -> (B, T, horizon, Q); entry t is the forecast made after observing step t.
        """
        h, c = self.zero_state(values.shape[0])
        out, _, _ = self.encode(values, timestamps_ms, covariates, h, c)
        return self.quantiles_z(out, self.scale_values(values))

    def forward(
        self,
        values: torch.Tensor,
        timestamps_ms: torch.Tensor,
        covariates: torch.Tensor | None,
        h: torch.Tensor,
        c: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The sequence-graph contract: (B, T) in, raw-unit forecast (B, horizon, Q) after the
        last step, plus the recurrent state to continue from."""
        out, h_out, c_out = self.encode(values, timestamps_ms, covariates, h, c)
        z = self.quantiles_z(out[:, -1], self.scale_values(values[:, -1]))
        return self.unscale_values(z), h_out, c_out


def pack_members(nets: list[Forecaster]) -> Forecaster:
    """K trained single networks of one config -> one Forecaster with ``members`` K whose
    forecast is exactly the mean of theirs (see the module docstring).

    PyTorch stores a recurrent weight gate-major: rows ``[g * H, (g + 1) * H)`` are gate g's units.
    The packed gate g holds member i's units at ``g * K * m + i * m``; a recurrent or
    layer-to-layer weight keeps only the columns of the same member, so no unit ever reads another
    member's units, and the first layer's input weights are shared features, stacked.
    """
    if not nets:
        raise ValueError("pack_members needs at least one network")
    first = nets[0].config
    if first.members != 1 or any(n.config != first for n in nets):
        raise ValueError("pack_members needs single networks (members 1) of one and the same config")
    k, m = len(nets), first.hidden_size
    packed = Forecaster(ModelConfig(**{**first.to_dict(), "hidden_size": k * m, "members": k}))
    gates = 4 if first.cell == "lstm" else 3
    member_params = [dict(n.rnn.named_parameters()) for n in nets]
    out = first.horizon * first.num_quantiles
    with torch.no_grad():
        for name, param in packed.rnn.named_parameters():
            param.zero_()
            for i, params in enumerate(member_params):
                for g in range(gates):
                    rows = slice(g * k * m + i * m, g * k * m + (i + 1) * m)
                    source = params[name][g * m : (g + 1) * m]
                    if name.startswith(("bias", "weight_ih_l0")):
                        param[rows] = source
                    else:
                        param[rows, i * m : (i + 1) * m] = source
        packed.head.weight.zero_()
        for i, net in enumerate(nets):
            packed.head.weight[i * out : (i + 1) * out, i * m : (i + 1) * m] = net.head.weight
            packed.head.bias[i * out : (i + 1) * out] = net.head.bias
    return packed.eval()
