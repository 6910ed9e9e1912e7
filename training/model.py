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

Seasonal memory. A recurrent state cannot recall exactly what happened one season ago, so with
``lags`` (steps, e.g. one day and one week) the state also holds a shift buffer of the last S
observations (S = the longest lag, the ``lags`` state tensor, raw units) and how many of them are
real (``lags_seen``; zero state = an empty buffer = start of series). Each step the network sees,
per lag l, the change since l steps ago and the change from now to the value l - 1 steps ago (what
the season says comes next), and the head forecasts around a seasonal reference: for horizon step
k, a softmax-weighted mix (weights from the hidden state) of the latest value and, per lag, the
value at t + k - l * ceil(k / l) (the seasonal naive forecast of that lag). Before training it is
close to the mean of the naive and seasonal naive forecasts; the network learns when to trust
which and what to add. A reference not yet in the buffer falls back to the latest value.

Reference blend. With ``blend`` (one weight per reference, from training: see
``training.train.choose_blend``) the forecast moves part of the way from the network's point
forecast towards one of its references, the whole band with it: an equal-weight combination of the
network and the plain seasonal rule that did best on the validation stretch. Combining a network
with a simple rule that errs differently is the most reliable gain in forecasting competitions,
and equal weights, not weights fitted on a short validation stretch, are what hold up on new data
(docs/experiments.md: fitted per-horizon weights lost on the test periods).

Members. With ``members`` K > 1 the model is K networks of ``hidden_size / K`` units each, trained
one after another from their own seeds (own initialisation, data order and early stopping; see
``training.train.train_forecaster``), then packed into one recurrent stack by ``pack_members``:
block-diagonal recurrent and layer-to-layer weights, shared inputs, one head each. The forecast
is the mean of the members' z-space quantiles, which still never cross. The exported graphs stay
a plain LSTM/GRU of ``hidden_size`` units (the state holds every member's units), so the ONNX
contract and the server do not change. Averaging independently trained networks removes much of
the seed-to-seed variance of one network, which on one year of data is larger than the effect of
most design choices (docs/experiments.md).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from training.evaluate import point_index, point_quantile

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
    # Lagged values the network sees, in steps (see the module docstring); () for none. None (unset
    # in a fit config) lets the pipeline choose one day and one week from the data's step, where the
    # training data covers them (training.seasonality); a network built from None has no lags.
    lags: tuple[int, ...] | None = ()
    # z = (asinh(x / value_unit) - value_loc) / value_scale; see the module docstring.
    value_unit: float = 1.0
    value_loc: float = 0.0
    value_scale: float = 1.0
    covariate_loc: tuple[float, ...] = field(default=())
    covariate_scale: tuple[float, ...] = field(default=())
    # The reference blend (see the module docstring), chosen after training on the validation
    # stretch: per reference (the latest value, then each lag's), how far the forecast moves
    # towards it; num_references weights >= 0 summing to at most 1. () is no blend.
    blend: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        # Lists from YAML/JSON become tuples so the config stays hashable and frozen.
        for name in ("quantiles", "covariates", "covariate_loc", "covariate_scale", "holidays", "lags", "blend"):
            if getattr(self, name) is not None:
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
        lags = self.lags or ()
        if any(isinstance(lag, bool) or not isinstance(lag, int) or lag < 2 for lag in lags) or list(lags) != sorted(
            set(lags)
        ):
            raise ValueError(
                "model.lags takes increasing whole numbers of steps >= 2, e.g. [48, 336] for a day and a week of "
                f"half-hours (lag 1 is the latest value, which the model always sees); got {list(lags)}"
            )
        if self.blend and (
            len(self.blend) != self.num_references or min(self.blend) < 0.0 or sum(self.blend) > 1.0 + 1e-6
        ):
            raise ValueError(
                f"blend takes one weight >= 0 per reference ({self.num_references}: the latest value, then each "
                f"lag), summing to at most 1; got {list(self.blend)}"
            )
        if len(set(self.covariates)) != c:
            raise ValueError(f"covariate names must be unique, got {list(self.covariates)}")

    @property
    def member_size(self) -> int:
        return self.hidden_size // self.members

    @property
    def num_quantiles(self) -> int:
        return len(self.quantiles)

    @property
    def point_quantile(self) -> float:
        """The quantile whose path is the point forecast, for the backtest, the gate and the server
        alike (exported as metadata ``point_quantile``); see training.evaluate.point_quantile."""
        return point_quantile(self.quantiles)

    @property
    def num_covariates(self) -> int:
        return len(self.covariates)

    @property
    def num_features(self) -> int:
        # scaled value, daily sin/cos pairs, 7 weekday one-hots, holiday today/tomorrow, per lag (change since,
        # change to next, seen flag), covariates. No time-of-year encoding: with a year or two of history it only
        # memorises, and positions of the year past the training data would be extrapolation.
        return 1 + 2 * self.daily_harmonics + 7 + 2 + 3 * len(self.lags or ()) + self.num_covariates

    @property
    def buffer_size(self) -> int:
        """S: observations the lag buffer keeps (the longest lag; 0 without lags)."""
        return max(self.lags or (), default=0)

    @property
    def num_references(self) -> int:
        """What the head mixes: the latest value and one seasonal reference per lag."""
        return 1 + len(self.lags or ())

    @property
    def head_size(self) -> int:
        """Head outputs per member and horizon step: Q quantile terms, plus the reference mix's logits."""
        return self.num_quantiles + (self.num_references if self.lags else 0)

    @property
    def state_names(self) -> tuple[str, ...]:
        """The recurrent state tensors, in graph order (CONTRACT §4)."""
        return ("h",) + (("c",) if self.cell == "lstm" else ()) + (("lags", "lags_seen") if self.lags else ())

    def state_shape(self, name: str, batch: int) -> tuple[int, ...]:
        if name in ("h", "c"):
            return (self.num_layers, batch, self.hidden_size)
        return (batch, self.buffer_size) if name == "lags" else (batch, 1)

    @property
    def holiday_days(self) -> list[int]:
        """Holidays as days since 1970-01-01."""
        return [(dt.date.fromisoformat(str(d)) - dt.date(1970, 1, 1)).days for d in self.holidays]

    def to_dict(self) -> dict:
        return asdict(self)


State = dict[str, torch.Tensor]  # state name -> tensor, shapes as ModelConfig.state_shape


def lag_offsets(config: ModelConfig) -> tuple[list[int], list[int]]:
    """Where, relative to the current step t, each lag looks (see the module docstring).

    Features: per lag l, t - l (the value one lag ago) and t + 1 - l (one lag before the next
    step): [-l, 1 - l] per lag. References: for horizon step k, t + k - l * ceil(k / l), the last
    value one or more whole lags before t + k, laid out horizon-major ([k][lag]). Every offset is
    in [-S, 0], so the buffer of the last S values plus the current one holds all of them.
    """
    features = [off for lag in config.lags for off in (-lag, 1 - lag)]
    references = [k - lag * -(-k // lag) for k in range(1, config.horizon + 1) for lag in config.lags]
    return features, references


def _columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, N) at the column indices idx (any shape) -> (B, *idx.shape).

    Gathered as rows of the transposed x, then moved back: ONNX Runtime's Gather copies whole rows
    (B contiguous values each) along axis 0 but element by element along axis 1, where it was the
    step graph's costliest node at batch 256 (0.76 of 4.9 ms).
    """
    rows = x.transpose(0, 1)[idx]  # (*idx.shape, B)
    return rows.permute(idx.dim(), *range(idx.dim()))  # explicit axes: the exporters reject movedim's -1


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
        self.head = nn.Linear(config.hidden_size, config.members * config.horizon * config.head_size)
        c = config.num_covariates
        # Buffers, not Python floats, so the scaling lives in the state dict and the graphs.
        self.register_buffer("cov_loc", torch.tensor(config.covariate_loc or [0.0] * c, dtype=torch.float32))
        self.register_buffer("cov_scale", torch.tensor(config.covariate_scale or [1.0] * c, dtype=torch.float32))
        self.register_buffer("daily_k", torch.arange(1, config.daily_harmonics + 1, dtype=torch.float32))
        self.register_buffer("weekday_start_ms", torch.arange(7, dtype=torch.int64) * MS_PER_DAY)
        # An empty calendar gets one day no timestamp reaches, so the feature layout stays the same.
        days = torch.tensor(config.holiday_days or [-(10**9)], dtype=torch.int64)
        self.register_buffer("holiday_start_ms", days * MS_PER_DAY)
        if config.lags:  # derived from the config, so not part of the state dict
            features, references = lag_offsets(config)
            self.register_buffer("lag_feature_offsets", torch.tensor(features, dtype=torch.int64), persistent=False)
            self.register_buffer("lag_reference_offsets", torch.tensor(references, dtype=torch.int64), persistent=False)
        # The reference blend from the config, like the lag offsets: not part of the state dict.
        blend = torch.tensor(config.blend, dtype=torch.float32) if config.blend else None
        self.register_buffer("blend", blend, persistent=False)
        self.point = point_index(config.quantiles)  # the point forecast's quantile, which the blend moves

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
        self,
        values: torch.Tensor,
        timestamps_ms: torch.Tensor,
        covariates: torch.Tensor | None,
        lag_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) values, (B, T) int64 ms, (B, T, C) covariates, (B, T, 3 * lags) -> (B, T, F) features.

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
        if lag_features is not None:
            parts.append(lag_features)
        if covariates is not None and self.config.num_covariates:
            parts.append((covariates - self.cov_loc) / self.cov_scale)
        return torch.cat(parts, dim=-1)

    # -- the lag buffer ---------------------------------------------------------------------
    def _lag_window(
        self, values: torch.Tensor, z: torch.Tensor, state: State, scaled: bool
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The buffer followed by this call's values, ext (B, S + T), and which of them are real
        observations, known (B, S + T) bool (the buffer's first S - lags_seen entries are not).

        ext is raw (scaled: False), for the graphs, where a step needs only a few of the S + T values
        and scales just those (cheaper than all of them), or scaled (scaled: True), for training, where
        every step needs ~100 of them and scaling the window once is the cheaper way round. The
        forecasts are the same either way: scaling is elementwise.
        """
        ext = torch.cat([self.scale_values(state["lags"]), z] if scaled else [state["lags"], values], dim=1)
        position = torch.arange(ext.shape[1], device=values.device).to(values.dtype)  # (S + T,)
        known = position >= self.config.buffer_size - state["lags_seen"]  # (B, S + T)
        return ext, known, scaled

    def _lag_features(self, z: torch.Tensor, ext: torch.Tensor, known: torch.Tensor, scaled: bool) -> torch.Tensor:
        """z (B, T) scaled values -> (B, T, 3 * lags): per lag the change since one lag ago, the change
        to the value one lag before the next step, and whether the lag is known (changes are 0 if not)."""
        n, steps = len(self.config.lags), z.shape[1]
        idx = self.config.buffer_size + torch.arange(steps, device=z.device)[:, None] + self.lag_feature_offsets
        past = _columns(ext, idx) if scaled else self.scale_values(_columns(ext, idx))
        past = past.unflatten(-1, (n, 2))  # (B, T, lags, 2)
        ok = _columns(known, idx).unflatten(-1, (n, 2)).to(z.dtype)
        since = (z.unsqueeze(-1) - past[..., 0]) * ok[..., 0]
        ahead = (past[..., 1] - z.unsqueeze(-1)) * ok[..., 1]
        return torch.cat([since, ahead, ok[..., 0]], dim=-1)

    def _references(
        self, ext: torch.Tensor, known: torch.Tensor, scaled: bool, z: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """Scaled references at the given steps (T',) with their z (B, T') -> (B, T', horizon, 1 + lags):
        the latest value, then each lag's seasonal naive forecast (the latest value where unknown)."""
        cfg = self.config
        idx = cfg.buffer_size + steps[:, None] + self.lag_reference_offsets  # (T', horizon * lags)
        latest = z.unsqueeze(-1)  # (B, T', 1)
        at = _columns(ext, idx)
        lagged = torch.where(_columns(known, idx), at if scaled else self.scale_values(at), latest)
        lagged = lagged.unflatten(-1, (cfg.horizon, len(cfg.lags)))  # (B, T', horizon, lags)
        return torch.cat([latest.unsqueeze(-1).expand(-1, -1, cfg.horizon, 1), lagged], dim=-1)

    # -- network ----------------------------------------------------------------------------
    def cell_inputs(
        self,
        values: torch.Tensor,
        timestamps_ms: torch.Tensor,
        covariates: torch.Tensor | None,
        state: State,
        scaled_window: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, bool] | None]:
        """The cell's inputs for (B, T) steps that follow ``state`` -> features (B, T, F), scaled values
        (B, T) and the lag window (ext, known, scaled) when the model has lags (see _lag_window).
        Every feature of a step depends on that step and the values before it only."""
        z = self.scale_values(values)
        window = self._lag_window(values, z, state, scaled_window) if self.config.lags else None
        lag_features = self._lag_features(z, *window) if window is not None else None
        return self.features(values, timestamps_ms, covariates, lag_features), z, window

    def run_cell(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The recurrent cell over features (B, T, F) from ``state`` -> top-layer outputs (B, T, H)
        and the recurrent state after the last step (h, and c for LSTM)."""
        if self.config.cell == "lstm":
            out, (h_out, c_out) = self.rnn(x, (state["h"], state["c"]))
            return out, {"h": h_out, "c": c_out}
        out, h_out = self.rnn(x, state["h"])
        return out, {"h": h_out}

    def encode(
        self,
        values: torch.Tensor,
        timestamps_ms: torch.Tensor,
        covariates: torch.Tensor | None,
        state: State,
        scaled_window: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, State, tuple[torch.Tensor, torch.Tensor, bool] | None]:
        """Run the cell over (B, T) steps from ``state`` -> top-layer outputs (B, T, H), scaled values
        (B, T), the state to continue from, and the lag window (ext, known, scaled) when the model has
        lags (``scaled_window``: see _lag_window)."""
        x, z, window = self.cell_inputs(values, timestamps_ms, covariates, state, scaled_window)
        out, new = self.run_cell(x, state)
        if window is not None:
            s = self.config.buffer_size
            # The last S values, this call's included (export declares lags_out [B, S], as lags).
            raw = torch.cat([state["lags"], values], dim=1) if window[2] else window[0]
            new["lags"] = raw[:, -s:]
            new["lags_seen"] = torch.clamp(state["lags_seen"] + values.shape[1], max=float(s))
        return out, z, new, window

    def quantiles_z(self, hidden: torch.Tensor, reference: torch.Tensor, blended: bool = True) -> torch.Tensor:
        """(..., H) hidden and the reference -> (..., horizon, Q) non-crossing z quantiles (with members,
        their mean), moved by the reference blend (unless ``blended`` is False). The reference is the
        latest scaled value (...) for a model without lags, else the references (..., horizon, 1 + lags)
        that the head mixes."""
        out = self._network_quantiles_z(hidden, reference)
        if self.blend is None or not blended:
            return out
        # Every quantile moves by the same amount, so the band keeps its shape and never crosses:
        # the sum over references of weight x (reference - point forecast).
        point = out[..., self.point : self.point + 1]  # (..., horizon, 1)
        return out + ((self.references_of(reference) - point) * self.blend).sum(dim=-1, keepdim=True)

    def references_of(self, reference: torch.Tensor) -> torch.Tensor:
        """quantiles_z's reference as (..., horizon, R): a model without lags has one, the latest value."""
        if self.config.lags:
            return reference
        return reference[..., None, None].expand(*reference.shape, self.config.horizon, 1)

    def _network_quantiles_z(self, hidden: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        q = cfg.num_quantiles
        shape = (cfg.horizon, cfg.head_size) if cfg.members == 1 else (cfg.members, cfg.horizon, cfg.head_size)
        raw = self.head(hidden).unflatten(-1, shape)
        if cfg.lags:
            ref = reference if cfg.members == 1 else reference.unsqueeze(-3)  # (..., [1,] horizon, R)
            # Softmax over the references with them on the second-last axis: over a last axis of 2-3
            # elements torch's CPU kernel measured 7-12x slower (0.6 of 1.2 s of a bank_calls step).
            weights = torch.softmax(raw[..., q:].transpose(-1, -2), dim=-2)  # (..., R, horizon)
            base = (weights * ref.transpose(-1, -2)).sum(dim=-2).unsqueeze(-1)
        else:
            base = reference
            for _ in shape:
                base = base.unsqueeze(-1)
        lowest = raw[..., :1] + base
        if q > 1:
            # contiguous() first: softplus on the strided view measured ~6x slower (75 ms of a step).
            steps = nn.functional.softplus(raw[..., 1:q].contiguous())
            lowest = torch.cat([lowest, lowest + torch.cumsum(steps, dim=-1)], dim=-1)
        return lowest if cfg.members == 1 else lowest.mean(dim=-3)

    def zero_state(self, batch: int) -> State:
        """The state of a series that has not started: all zeros (CONTRACT §4)."""
        return {name: torch.zeros(self.config.state_shape(name, batch)) for name in self.config.state_names}

    def forecast_all_z(
        self,
        values: torch.Tensor,
        timestamps_ms: torch.Tensor,
        covariates: torch.Tensor | None = None,
        state: State | None = None,
        blended: bool = True,
        with_references: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training/backtest path: from ``state`` (default zero: the start of the series), the z-space
        forecast after every step. (B, T) -> (B, T, horizon, Q); entry t is made after observing step t.
        Training windows pass the window's lag buffer with a zero recurrent state. ``blended`` False: the
        network's own forecast, without the reference blend; ``with_references``: also the references
        (B, T, horizon, R), for choosing the blend."""
        state = self.zero_state(values.shape[0]) if state is None else state
        out, z, _, window = self.encode(values, timestamps_ms, covariates, state, scaled_window=True)
        if window is None:
            reference = z
        else:
            steps = torch.arange(values.shape[1], device=values.device)
            reference = self._references(*window, z, steps)
        forecast = self.quantiles_z(out, reference, blended)
        return (forecast, self.references_of(reference)) if with_references else forecast

    def forward(
        self, values: torch.Tensor, timestamps_ms: torch.Tensor, covariates: torch.Tensor | None, *state: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The sequence-graph contract: (B, T) in and the state tensors in ``state_names`` order ->
        the raw-unit forecast (B, horizon, Q) after the last step, then the state to continue from."""
        names = self.config.state_names
        out, z, new, window = self.encode(values, timestamps_ms, covariates, dict(zip(names, state)))
        if window is None:
            reference = z[:, -1]
        else:
            last = torch.arange(values.shape[1], device=values.device)[-1:]  # (1,)
            reference = self._references(*window, z[:, -1:], last)[:, 0]  # (B, horizon, R)
        forecast = self.unscale_values(self.quantiles_z(out[:, -1], reference))
        return (forecast, *(new[name] for name in names))


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
    out = first.horizon * first.head_size
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
