"""The training loop: one readable function, no framework.

Each sample is a window of ``window`` consecutive steps from one series. The model runs over the
window from zero state and forecasts after *every* step, so one forward pass yields up to
``window`` multi-horizon targets (the loss starts after ``burn_in`` steps, when the state carries
some history). The pinball loss is taken in the model's scaled space, where series of different
magnitude weigh alike; quantiles are invariant under the monotone inverse transform, so this is
the same objective as in raw units up to a per-point weight.

Early stopping holds out the last ``val_fraction`` of each series, which is also its most recent
data: the stretch most like what the model will forecast next. So once early stopping has
chosen the epoch, the network is fine-tuned for ``finetune_passes`` passes over the windows whose
targets reach into that held-out stretch, at the low constant rate ``finetune_lr`` (the usual
"refit on all data", done as a short second phase because the epoch count cannot be validated
again). On elecdemand every one of 15 networks scored better with it (docs/experiments.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.distributed import DEVICES, Workers
from training.model import Forecaster, ModelConfig, pack_members

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss)."""


STOP_PATIENCE, STOP_BUDGET, STOP_MAX_EPOCHS = "patience", "budget", "max_epochs"


@dataclass(frozen=True)
class TrainConfig:
    # Steps per training window; None: 336 (a week of half-hours), or half of what the shortest
    # training series leaves after validation and one horizon when that is less (resolved by the
    # pipeline, see training.pipeline.resolve).
    window: int | None = None
    batch_size: int = 64
    # Training runs until validation stops improving (patience), bounded by max_minutes of wall
    # time for the whole fit (all members, validation and fine-tuning included); max_epochs is
    # only a backstop. The learning-rate schedule is planned for the steps that fit in the budget.
    max_epochs: int = 500
    max_minutes: float = 5.0
    lr: float = 3e-3  # peak learning rate of the warm-up + cosine schedule
    weight_decay: float = 1e-4
    clip_norm: float = 1.0  # max global gradient norm; 0 disables
    clip_value: float | None = None  # optional element-wise clip, applied before the norm clip
    patience: int = 5  # epochs without validation improvement before stopping
    seed: int = 0
    val_fraction: float = 0.1  # last share of each series' training part, for early stopping
    # Steps between consecutive window starts; None: 12, or less on short series so that there are
    # about 256 windows (resolved by the pipeline, see training.pipeline.resolve).
    stride: int | None = None
    burn_in: int = 24  # first steps of a window that carry no loss
    # After early stopping: passes over the windows whose targets reach into the validation
    # stretch (the most recent data), at a constant learning rate; 0 passes disables it.
    finetune_passes: int = 3
    finetune_lr: float = 3e-4
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # An epoch (the unit of validation, patience and the schedule) is one pass over the training
    # windows, repeated until it makes at least this many optimizer steps: on short data one pass
    # is a step or two, too little between two validations.
    min_epoch_steps: int = 32
    # Windows start from the recurrent state the series has there after all its history (see
    # _warm_states), not from zero; false trains every window from zero state.
    warm_start: bool = True
    # The reference blend (training.model): after early stopping, the forecast moves this share of
    # the way towards the reference (the latest value or a lag's seasonal naive) that did best alone
    # on the validation stretch (choose_blend); 0.5 is an equal-weight combination, 0 turns it off.
    blend: float = 0.5
    device: str = "auto"  # auto | cpu | cuda (see training.distributed)

    def __post_init__(self) -> None:
        optional = [key for key in ("window", "stride") if getattr(self, key) is not None]
        for name in ("batch_size", "max_epochs", "patience", "min_epoch_steps", *optional):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.device not in DEVICES:
            raise ValueError(f"train.device must be one of {DEVICES}, got {self.device!r}")
        if not self.max_minutes > 0:
            raise ValueError(f"train.max_minutes must be a positive number of minutes, got {self.max_minutes!r}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if self.clip_norm < 0:
            raise ValueError(f"train.clip_norm must be >= 0 (0 disables clipping), got {self.clip_norm}")
        if self.clip_value is not None and self.clip_value <= 0:
            raise ValueError(f"train.clip_value must be positive or null, got {self.clip_value}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"train.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.burn_in < 0 or (self.window is not None and self.burn_in >= self.window):
            raise ValueError(f"train.burn_in must be in [0, window), got {self.burn_in}")
        if self.finetune_passes < 0:
            raise ValueError(f"train.finetune_passes must be >= 0 (0 disables), got {self.finetune_passes}")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"train.blend must be in [0, 1] (0 turns the reference blend off), got {self.blend}")
        if self.finetune_lr <= 0:
            raise ValueError(f"train.finetune_lr must be positive, got {self.finetune_lr}")


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    finetune: list[dict[str, float]] = field(default_factory=list)  # one dict per fine-tuning pass
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped_early: bool = False
    stop_reason: str = ""  # STOP_PATIENCE, STOP_BUDGET or STOP_MAX_EPOCHS
    seconds: float = 0.0
    seed: int = 0
    # The reference blend chosen on validation (choose_blend): one weight per reference, () if none;
    # and the validation error of the network and of each reference alone.
    blend: tuple[float, ...] = ()
    blend_errors: dict[str, float] = field(default_factory=dict)
    # With model.members K > 1: one result per member, and the fields above stay empty but for
    # ``seconds`` (all members) and ``best_val_loss`` (the members' mean).
    members: list[TrainResult] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        """Epochs run, over all members."""
        return sum(len(r.history) for r in self.members) if self.members else len(self.history)

    @property
    def stop_reasons(self) -> list[str]:
        """Why training stopped: one reason, or one per member."""
        return [r.stop_reason for r in self.members] if self.members else [self.stop_reason]

    def summary(self) -> dict:
        out = {"seconds": round(self.seconds, 2), "epochs": self.epochs, "blend": list(self.blend)}
        if not self.members:
            return {
                **out,
                "best_epoch": self.best_epoch,
                "stop_reason": self.stop_reason,
                "finetune_passes": len(self.finetune),
            }
        return {**out, "members": [{"seed": r.seed, **r.summary()} for r in self.members]}


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor owning a copy: dataset arrays are read-only, and torch wants writable memory."""
    return torch.tensor(np.array(array), dtype=dtype)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees activations of tens of MB (the forecasts after every step
    of every window). By default glibc serves blocks that large with fresh mmap()s and unmaps
    them on free, so each step page-faults all of it back in: measured on 2 cores, half the step
    time went to the kernel (0.28 s -> 0.14 s per default-config step with this). Process-wide;
    returns False where the C library has no mallopt (not glibc), which only costs speed.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (m_mmap_threshold, 32 << 20),  # the largest glibc accepts; the step's tensors are below it
            (m_trim_threshold, 2**31 - 1),
            (m_top_pad, 256 << 20),
        )
    )


# -- scaling ------------------------------------------------------------------------------------
def fit_scaling(values: Sequence[np.ndarray], covariates: Sequence[np.ndarray]) -> dict:
    """Scaling statistics for ModelConfig, pooled over the training parts of all series."""
    v = np.concatenate([np.asarray(x, np.float64) for x in values])
    # asinh(x / unit) is log-like once |x| / unit >> 1; a tenth of the typical magnitude gets there.
    # Typical of the non-zero values: a series that is mostly 0 (a call centre closed at night and at
    # weekends) has a median of 0, and a unit of 1 made the transform a log of counts, under which
    # a small error of the network became a several-fold error in raw units.
    active = np.abs(v[v != 0])
    unit = 0.1 * float(np.median(active)) if active.size else 1.0
    a = np.arcsinh(v / unit)
    scale = float(a.std()) or 1.0
    stats = {"value_unit": unit, "value_loc": float(a.mean()), "value_scale": scale}
    cov = np.concatenate([np.asarray(c, np.float64) for c in covariates]) if covariates else None
    if cov is not None and cov.shape[1]:
        std = cov.std(axis=0)
        stats["covariate_loc"] = tuple(float(x) for x in cov.mean(axis=0))
        stats["covariate_scale"] = tuple(float(x) if x > 0 else 1.0 for x in std)
    return stats


# -- windows ------------------------------------------------------------------------------------
@dataclass
class _Windows:
    """Series packed end to end, and windows into them that never cross a series boundary."""

    values: torch.Tensor  # (N,) float32, raw units
    timestamps: torch.Tensor  # (N,) int64 ms
    covariates: torch.Tensor  # (N, C)
    targets: torch.Tensor  # (N, horizon) scaled future values; NaN past a series' end
    series_start: torch.Tensor  # (N,) int64: where each position's series starts in the packed arrays
    starts: np.ndarray  # window start offsets into the packed arrays
    loss_from: np.ndarray  # per window: first position (within the window) that carries loss
    loss_to: np.ndarray  # per window: one past the last position that carries loss


def _pack(model: Forecaster, series: Sequence, cfg: TrainConfig) -> tuple[_Windows, _Windows, _Windows]:
    """Train windows (targets before the validation split), validation windows (forecast
    origins inside it) and recent windows (laid out like train windows, targets reaching into
    the validation split: the fine-tuning data), over the same packed arrays."""
    horizon, w = model.config.horizon, cfg.window
    if w is None or cfg.stride is None:
        raise ValueError("train.window or train.stride is unresolved (None); training.pipeline.resolve sets them")
    parts_v, parts_t, parts_c, parts_y, parts_s = [], [], [], [], []
    train, val, recent = ([], [], []), ([], [], []), ([], [], [])
    offset = 0
    for s in series:
        n = len(s.values)
        z = model.scale_values(_tensor(s.values, torch.float32))
        future = torch.full((n, horizon), math.nan)
        for k in range(1, horizon + 1):  # future[t, k-1] = z[t + k]
            future[: n - k, k - 1] = z[k:]
        parts_v.append(_tensor(s.values, torch.float32))
        parts_t.append(_tensor(s.timestamps_ms, torch.int64))
        parts_c.append(_tensor(s.covariates, torch.float32).reshape(n, -1))
        parts_y.append(future)
        parts_s.append(torch.full((n,), offset, dtype=torch.int64))
        val_start = n - max(1, math.ceil(cfg.val_fraction * n))
        # Train: the whole forecast (t + horizon) stays before the validation split.
        for start in range(0, val_start - horizon - w + 1, cfg.stride):
            train[0].append(offset + start)
            train[1].append(cfg.burn_in)
            train[2].append(w)
        # Validation: every origin in [val_start, n - horizon), in chunks, each chunk preceded
        # by burn_in steps of history. Positions past a chunk are masked; the RNN is causal, so
        # whatever follows them in the packed arrays cannot leak into the scored forecasts.
        for origin in range(val_start, n - horizon, w - cfg.burn_in):
            start = max(0, origin - cfg.burn_in)
            val[0].append(offset + start)
            val[1].append(origin - start)
            val[2].append(min(w, n - horizon - start))
        # Recent: every target inside the series, the last one past the validation split.
        for start in range(0, n - horizon - w + 1, cfg.stride):
            if start + w - 1 + horizon >= val_start:
                recent[0].append(offset + start)
                recent[1].append(cfg.burn_in)
                recent[2].append(w)
        offset += n
    if not train[0] or not val[0]:
        raise TrainingError(
            f"series too short for window {w} + horizon {horizon} with val_fraction {cfg.val_fraction}: "
            f"lengths {[len(s.values) for s in series]}"
        )
    packed = (torch.cat(parts_v), torch.cat(parts_t), torch.cat(parts_c), torch.cat(parts_y), torch.cat(parts_s))

    def windows(idx: tuple[list, list, list]) -> _Windows:
        return _Windows(*packed, np.asarray(idx[0]), np.asarray(idx[1]), np.asarray(idx[2]))

    return windows(train), windows(val), windows(recent)


@dataclass
class _WarmStates:
    """The recurrent state (h, c) a series has at each window start when the model runs over all of
    its history from the series' first step, as a server streaming it would have it."""

    positions: np.ndarray  # (P,) sorted window starts, packed-array offsets
    states: dict[str, torch.Tensor]  # name -> (L, P, H)

    def at(self, starts: torch.Tensor) -> dict[str, torch.Tensor]:
        k = torch.as_tensor(np.searchsorted(self.positions, starts.numpy()))
        return {name: s[:, k.to(s.device)].cpu() for name, s in self.states.items()}


@torch.no_grad()
def _warm_states(model: Forecaster, win: _Windows, starts: np.ndarray) -> _WarmStates:
    """Run the model over each series once, in segments from one window start to the next, and keep
    the recurrent state at every start (the lag buffer needs no run: it is read from the data).

    Why: the server steps a series from its first observation for ever, so its state has seen
    weeks of history; windows trained from zero state only ever see a window's worth. Where a
    series has regimes longer than a window (a call centre closed all weekend), the state at serving
    time then lies where training never went, and forecasts after such a stretch go wild. Windows
    that start from these states (computed with the weights of the epoch before: stale by one
    epoch, which the burn-in absorbs) train on the states the server will have.
    """
    positions = np.unique(starts)
    names = [n for n in ("h", "c") if n in model.config.state_names]
    kept = {n: [] for n in names}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    firsts = win.series_start[torch.as_tensor(positions)].numpy()
    for first in np.unique(firsts):
        mine = positions[firsts == first].tolist()
        state = {k: v.to(device) for k, v in model.zero_state(1).items()}
        # The features of the whole stretch in one call (each step's depend on the values before it
        # only, so this equals running them segment by segment); then only the cell runs per segment:
        # 3-4x cheaper than one whole encode call per window start (2,776 starts: 2.2 -> 0.7 s).
        if mine[-1] > first:  # (a series whose only start is its first step needs no run)
            seg = slice(int(first), mine[-1])
            inputs = (win.values[seg][None], win.timestamps[seg][None], win.covariates[seg][None])
            x, _, _ = model.cell_inputs(*(t.to(device) for t in inputs), state)
        at = int(first)
        for p in mine:
            if p > at:
                _, recurrent = model.run_cell(x[:, at - first : p - first], state)
                state.update(recurrent)
                at = p
            for n in names:
                kept[n].append(state[n])
    model.train(was_training)
    return _WarmStates(positions, {n: torch.cat(kept[n], dim=1) for n in names})


def _batch(
    model: Forecaster, win: _Windows, rows: np.ndarray, width: int, warm: _WarmStates | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Gather windows -> values (B, W), timestamps (B, W), covariates (B, W, C), targets (B, W, h),
    a loss mask (B, W), and the state each window starts from. Validation windows may be shorter
    than ``width``: padded and masked.

    The recurrent state starts from ``warm`` (the state after all history before the window, see
    _warm_states), or zero; burn_in steps let it settle. The lag buffer holds the S values before the
    window, as a server streaming the series would have it: zeros and a shorter count where the
    series began less than S steps before the window.
    """
    pos = torch.arange(width)
    start = torch.as_tensor(win.starts[rows])
    idx = start[:, None] + pos  # (B, W)
    idx = idx.clamp(max=len(win.values) - 1)
    lo = torch.as_tensor(win.loss_from[rows])[:, None]
    hi = torch.as_tensor(win.loss_to[rows])[:, None]
    mask = (pos >= lo) & (pos < hi)
    targets = win.targets[idx]
    mask &= ~torch.isnan(targets).any(-1)
    state = model.zero_state(len(rows))
    if warm is not None:
        state.update(warm.at(start))
    s = model.config.buffer_size
    if s:
        first = win.series_start[start]  # (B,)
        back = start[:, None] - s + torch.arange(s)  # (B, S) positions before the window
        known = back >= first[:, None]
        state["lags"] = torch.where(known, win.values[back.clamp(min=0)], 0.0)
        state["lags_seen"] = (start - first).clamp(max=s).to(torch.float32)[:, None]
    return win.values[idx], win.timestamps[idx], win.covariates[idx], torch.nan_to_num(targets), mask, state


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """pred (B, W, h, Q), target (B, W, h), mask (B, W) -> mean pinball loss over masked points."""
    total, count = pinball_sum(pred, target, mask, quantiles)
    return total / count.clamp(min=1)


def pinball_sum(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, quantiles: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pinball loss summed over masked points (each point's mean over horizon and quantiles),
    and the number of masked points: the parts a data-parallel step needs apart.

    max(q d, (q - 1) d) = q d + relu(-d) with d = target - pred, and the q d part sums over the
    quantiles as a dot product: two passes over the (B, W, h, Q) forecasts instead of five.
    """
    h, q = pred.shape[-2], pred.shape[-1]
    over = torch.relu(pred - target.unsqueeze(-1)).sum(dim=(-1, -2))  # (B, W)
    below = target.sum(-1) * quantiles.sum() - (pred @ quantiles).sum(-1)  # (B, W)
    loss = (over + below) / (h * q)
    return (loss * mask).sum(), mask.sum()


def clip_gradients(
    params: Sequence[torch.nn.Parameter], clip_norm: float, clip_value: float | None
) -> tuple[float, bool]:
    """Clip in place; return the pre-clip global gradient norm and whether anything was clipped."""
    grads = [p.grad for p in params if p.grad is not None]
    pre_norm = float(torch.nn.utils.get_total_norm(grads))
    clipped = False
    if clip_value is not None:
        clipped = any(bool((g.abs() > clip_value).any()) for g in grads)
        torch.nn.utils.clip_grad_value_(params, clip_value)
    if clip_norm > 0:
        clipped |= pre_norm > clip_norm
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    return pre_norm, clipped


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_forecaster(
    config: ModelConfig,
    series: Sequence,
    cfg: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    workers: Workers | None = None,
) -> tuple[Forecaster, TrainResult]:
    """Build and train the model of ``config`` (scaling statistics already fitted, see
    ``scaled_config``). With ``members`` K > 1, K networks of ``hidden_size / K`` units are
    trained one after another, each from its own seed (``member_seeds``), then packed into one;
    their epoch metrics reach ``on_epoch`` as ``member{i}.NAME``. The ``max_minutes`` budget
    covers all members: each gets an even share of what is left when it starts. ``workers``: the
    data-parallel process group (training.distributed; default: this process alone, on the CPU)."""
    workers = workers or Workers()
    deadline = time.monotonic() + 60.0 * cfg.max_minutes
    if config.members == 1:
        model = _seeded_model(config, cfg.seed)
        result = train_model(model, series, cfg, on_epoch, progress, deadline=deadline, workers=workers)
        return with_blend(model, result.blend), result
    single = replace(config, hidden_size=config.member_size, members=1)
    nets, results = [], []
    started = time.perf_counter()
    for i, seed in enumerate(member_seeds(cfg.seed, config.members)):
        log.info("member %d of %d: %d units, seed %d", i + 1, config.members, single.hidden_size, seed)
        share = time.monotonic() + (deadline - time.monotonic()) / (config.members - i)
        net = _seeded_model(single, seed)
        hook = None
        if on_epoch is not None:

            def hook(epoch: int, metrics: dict[str, float], i: int = i) -> None:
                on_epoch(epoch, {f"member{i}.{k}": v for k, v in metrics.items()})

        desc = f"member {i + 1}/{config.members}"
        member_cfg = replace(cfg, seed=seed)
        results.append(train_model(net, series, member_cfg, hook, progress, desc=desc, deadline=share, workers=workers))
        nets.append(net)
    result = TrainResult(
        best_val_loss=float(np.mean([r.best_val_loss for r in results])),
        stopped_early=all(r.stopped_early for r in results),
        stop_reason=",".join(sorted({r.stop_reason for r in results})),
        seconds=time.perf_counter() - started,
        seed=cfg.seed,
        members=results,
    )
    # One blend for the packed model: the members' mean (each was fitted to its own network).
    blends = [r.blend for r in results if r.blend]
    result.blend = tuple(float(x) for x in np.mean(blends, axis=0)) if len(blends) == len(results) else ()
    return with_blend(pack_members(nets), result.blend), result


def with_blend(model: Forecaster, blend: Sequence[float]) -> Forecaster:
    """``model`` with the reference blend ``blend`` (() : none) in its config; the same weights."""
    if not blend:
        return model
    blended = Forecaster(replace(model.config, blend=tuple(blend)))
    blended.load_state_dict(model.state_dict())
    return blended.to(next(model.parameters()).device).train(model.training)


@torch.no_grad()
def choose_blend(
    model: Forecaster, win: _Windows, cfg: TrainConfig, warm: _WarmStates | None, device: torch.device
) -> tuple[tuple[float, ...], dict[str, float]]:
    """The reference blend (see training.model): weight ``cfg.blend`` on the reference whose forecast
    alone had the least error over the validation stretch, and each candidate's error.

    Error: the mean absolute error of the point forecast in raw units, each series' errors divided by
    its mean absolute step-to-step change (so series of different sizes count alike, as in MASE),
    over every validation origin and horizon step. Run on the early-stopped network before
    fine-tuning, while the validation stretch is still out of sample for it.
    """
    model.eval()
    config = model.config
    names = ["network", "latest_value"] + [f"lag_{lag}" for lag in config.lags or ()]
    scale = _series_scales(win)
    errors = torch.zeros(len(names), dtype=torch.float64)  # summed: the network, then each reference
    count = 0
    for first in range(0, len(win.starts), cfg.batch_size):
        rows = np.arange(first, min(first + cfg.batch_size, len(win.starts)))
        values, ts, cov, target, mask, state = _to(device, *_batch(model, win, rows, cfg.window, warm))
        q, refs = model.forecast_all_z(values, ts, cov, state, blended=False, with_references=True)
        keep = mask.cpu()  # (B, W): origins whose horizon steps are all known
        pos = (torch.as_tensor(win.starts[rows])[:, None] + torch.arange(values.shape[1])).clamp(max=len(scale) - 1)
        per = scale[pos][keep][:, None, None]  # (N, 1, 1) each origin's series scale
        candidates = torch.cat([q[..., model.point, None], refs], dim=-1).cpu()[keep]  # (N, horizon, 1 + R)
        actual = model.unscale_values(target.cpu()[keep])[..., None]  # (N, horizon, 1)
        errors += ((actual - model.unscale_values(candidates)).abs() / per).sum(dim=(0, 1)).double()
        count += actual.shape[0] * actual.shape[1]
    errors /= max(1, count)
    best = int(errors[1:].argmin())
    blend = [0.0] * config.num_references
    blend[best] = cfg.blend
    return tuple(blend), dict(zip(names, errors.tolist(), strict=True))


def _series_scales(win: _Windows) -> torch.Tensor:
    """(N,) per packed position: its series' mean absolute step-to-step change (1 where that is 0)."""
    values, starts = win.values.double().numpy(), win.series_start.numpy()
    same = starts[1:] == starts[:-1]
    ids, inverse = np.unique(starts, return_inverse=True)
    total = np.bincount(inverse[1:][same], weights=np.abs(np.diff(values))[same], minlength=len(ids))
    count = np.bincount(inverse[1:][same], minlength=len(ids))
    scale = np.divide(total, count, out=np.ones(len(ids)), where=count > 0)
    return torch.as_tensor(np.where(scale > 0, scale, 1.0)[inverse], dtype=torch.float32)


def describe_blend(config: ModelConfig) -> str:
    """One line: the reference the forecast moves towards, and how far."""
    if not config.blend:
        return "none"
    names = ["the latest value"] + [f"lag {lag}" for lag in config.lags or ()]
    return ", ".join(f"{w:g} towards {names[r]}" for r, w in enumerate(config.blend) if w > 0) or "none"


def member_seeds(seed: int, members: int) -> list[int]:
    """Member i trains from seed + 1000 i: member 0 is the single network of the same seed."""
    return [seed + 1000 * i for i in range(members)]


def train_model(
    model: Forecaster,
    series: Sequence,
    cfg: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    deadline: float | None = None,
    workers: Workers | None = None,
) -> TrainResult:
    """Fit ``model`` (one network: members 1) in place on the training parts of ``series``
    (objects with ``values`` (T,), ``timestamps_ms`` (T,) and ``covariates`` (T, C)); keep the
    weights of the best validation epoch, then fine-tune them on the most recent windows (see the
    module docstring). ``on_epoch(step, metrics)`` is called after each epoch and each
    fine-tuning pass, numbered on from the last epoch (MLflow logging).

    Training stops when validation has not improved for ``patience`` epochs, when the next epoch
    (and the fine-tuning after it) would not fit before ``deadline`` (``time.monotonic()`` seconds;
    default ``max_minutes`` from now) or an epoch is still running at the deadline (it stops at that
    step: an epoch can be longer than the whole budget on long data or a busy machine), or after
    ``max_epochs``; ``stop_reason`` says which. The
    learning-rate schedule (warm-up, cosine decay) is planned over the epochs that fit: after each
    epoch the plan is re-estimated from the epochs' measured time, so a budget that cuts training
    short still ends it at a low rate.

    Data-parallel under torchrun (``workers``, see training.distributed): the same windows in the
    same order on every rank, each taking its share of every batch; the epoch's timing and the
    budget decision are taken on the slowest rank's figures, so all ranks stop together. The model
    trains on ``workers.device`` and comes back on the CPU.
    """
    workers = workers or Workers()
    if model.config.members != 1:
        raise ValueError("train_model fits one network; train a model of members with train_forecaster")
    deadline = time.monotonic() + 60.0 * cfg.max_minutes if deadline is None else deadline
    torch.manual_seed(cfg.seed)
    keep_freed_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    train_w, val_w, recent_w = _pack(model, series, cfg)
    model.to(workers.device)
    quantiles = torch.tensor(model.config.quantiles, device=workers.device)
    forecasts: nn.Module = _Forecasts(model)
    if workers.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [workers.device] if workers.device.type == "cuda" else None
        forecasts = DistributedDataParallel(forecasts, device_ids=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # An epoch: one pass over the training windows, or more on short data (see min_epoch_steps).
    passes_per_epoch = max(1, math.ceil(cfg.min_epoch_steps * cfg.batch_size / len(train_w.starts)))
    steps_per_epoch = math.ceil(passes_per_epoch * len(train_w.starts) / cfg.batch_size)
    plan = {"epochs": cfg.max_epochs}  # revised after every epoch; the schedule reads it
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _schedule(s, plan["epochs"] * steps_per_epoch, warmup=steps_per_epoch)
    )
    # (No recent windows only when the validation stretch is shorter than the stride.)
    passes = cfg.finetune_passes if len(recent_w.starts) else 0
    finetune_steps = math.ceil(len(recent_w.starts) / cfg.batch_size) * passes
    result = TrainResult(seed=cfg.seed)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    started = time.perf_counter()
    every_start = np.concatenate([train_w.starts, val_w.starts, recent_w.starts])
    warm = _warm_states(model, train_w, every_start) if cfg.warm_start else None
    best_warm = warm
    # Redrawn at most every 2 s when stderr is a log file rather than a terminal.
    bar = tqdm(
        total=steps_per_epoch * cfg.max_epochs + finetune_steps,
        desc=desc,
        unit="step",
        disable=not progress or not workers.main,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.1 if sys.stderr.isatty() else 2.0,
    )
    try:
        result.stop_reason = STOP_MAX_EPOCHS
        for epoch in range(1, cfg.max_epochs + 1):
            epoch_started = time.monotonic()
            metrics = _train_pass(
                model, train_w, rng, opt, sched, cfg, quantiles, bar, f"epoch {epoch}", steps=steps_per_epoch,
                warm=warm, workers=workers, forecasts=forecasts, deadline=deadline,
            )  # fmt: skip
            pass_seconds = workers.largest(time.monotonic() - epoch_started)
            if warm is not None:  # this epoch's weights: for its validation and the next epoch's windows
                warm = _warm_states(model, train_w, every_start)
            val_loss = evaluate_loss(model, val_w, cfg, quantiles, warm, workers)
            metrics = {"train_loss": metrics.pop("loss"), "val_loss": val_loss, **metrics}
            result.history.append(metrics)
            bar.set_postfix(epoch=epoch, loss=f"{metrics['train_loss']:.4f}", val=f"{val_loss:.4f}")
            log.info("epoch %d %s", epoch, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
            if on_epoch:
                on_epoch(epoch, metrics)
            if val_loss < result.best_val_loss - 1e-6:
                result.best_val_loss, result.best_epoch = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best_warm = warm
            elif epoch - result.best_epoch >= cfg.patience:
                result.stop_reason, result.stopped_early = STOP_PATIENCE, True
                log.info("early stop at epoch %d: no validation gain for %d epochs", epoch, cfg.patience)
                break
            # The budget: epochs that still fit, each as long as this one, after reserving the
            # fine-tuning (its passes cost what their share of windows costs in a training pass).
            epoch_seconds = workers.largest(time.monotonic() - epoch_started)
            finetune_seconds = pass_seconds * passes * len(recent_w.starts) / len(train_w.starts)
            left = -workers.largest(time.monotonic() - deadline)  # the least time left on any rank
            fits = int((left - finetune_seconds) // epoch_seconds)
            plan["epochs"] = min(cfg.max_epochs, epoch + max(0, fits))
            bar.total = plan["epochs"] * steps_per_epoch + finetune_steps
            # (An epoch cut at the deadline leaves no time: fits < 1.)
            if fits < 1 and epoch < cfg.max_epochs:
                result.stop_reason = STOP_BUDGET
                log.info(
                    "stop at epoch %d: the time budget (train.max_minutes %g) has no room for another epoch",
                    epoch,
                    cfg.max_minutes,
                )
                break
        bar.total = bar.n + finetune_steps
        model.load_state_dict(best_state)
        warm = best_warm
        if cfg.blend:  # on the early-stopped network, before fine-tuning trains on the validation stretch
            result.blend, result.blend_errors = choose_blend(model, val_w, cfg, warm, workers.device)
            log.info(
                "validation error alone (scaled MAE): %s",
                ", ".join(f"{k} {v:.4g}" for k, v in result.blend_errors.items()),
            )
        # Fine-tuning: a fresh optimizer at a constant low rate, the same clipping.
        opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=cfg.weight_decay)
        for p in range(1, passes + 1):
            metrics = _train_pass(
                model, recent_w, rng, opt, None, cfg, quantiles, bar, f"fine-tuning pass {p}", warm=warm,
                workers=workers, forecasts=forecasts,
            )  # fmt: skip
            metrics = {f"finetune_{k}": v for k, v in metrics.items()}
            result.finetune.append(metrics)
            bar.set_postfix(finetune=p, loss=f"{metrics['finetune_loss']:.4f}")
            log.info("fine-tuning pass %d %s", p, " ".join(f"{k}={v:.5g}" for k, v in metrics.items()))
            if on_epoch:
                on_epoch(len(result.history) + p, metrics)
    finally:
        bar.close()
    model.to("cpu").eval()
    result.seconds = time.perf_counter() - started
    log.info(
        "%s: %d epochs in %.1fs, best epoch %d, stopped by %s",
        desc,
        len(result.history),
        result.seconds,
        result.best_epoch,
        result.stop_reason,
    )
    return result


class _Forecasts(nn.Module):
    """forecast_all_z as a module's forward, so DistributedDataParallel (which hooks forward) can
    average the gradients of a data-parallel step."""

    def __init__(self, model: Forecaster) -> None:
        super().__init__()
        self.model = model

    def forward(self, values, timestamps_ms, covariates, state) -> torch.Tensor:
        return self.model.forecast_all_z(values, timestamps_ms, covariates, state)


def _train_pass(
    model: Forecaster,
    win: _Windows,
    rng: np.random.Generator,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    quantiles: torch.Tensor,
    bar: tqdm,
    where: str,
    steps: int = 0,
    warm: _WarmStates | None = None,
    workers: Workers = Workers(),  # noqa: B008  (frozen: one process, CPU)
    forecasts: nn.Module | None = None,
    deadline: float | None = None,
) -> dict[str, float]:
    """One pass over ``win`` in random order (repeated, each time reshuffled, until it makes at least
    ``steps`` optimizer steps): -> mean loss, pre-clip gradient norms (mean and max), the share of
    clipped steps and the learning rate at the end. It stops early at ``deadline``
    (``time.monotonic()`` seconds; on every rank at the same step).

    Data-parallel (``workers``): every rank draws the same order and takes its share of each global
    batch; its loss is its pinball sum over the global count of points times the world size, so the
    gradients DistributedDataParallel averages are the one-process gradients of the whole batch.
    A global batch too small to give every rank a window (a pass's last) is skipped by all ranks.
    """
    model.train()
    forecasts = forecasts or _Forecasts(model)
    passes = max(1, math.ceil(steps * cfg.batch_size / len(win.starts))) if steps else 1
    order = np.concatenate([rng.permutation(len(win.starts)) for _ in range(passes)])
    losses, norms, clipped = [], [], 0
    params = [p for group in opt.param_groups for p in group["params"]]
    for step, first in enumerate(range(0, len(order), cfg.batch_size), start=1):
        rows = order[first : first + cfg.batch_size]
        if len(rows) < workers.world:
            continue
        values, ts, cov, target, mask, state = _to(
            workers.device, *_batch(model, win, workers.share(rows), cfg.window, warm)
        )
        local, count = pinball_sum(forecasts(values, ts, cov, state), target, mask, quantiles)
        points = max(1.0, workers.total(count))
        loss = local * (workers.world / points)
        mean_loss = workers.total(local.detach()) / points
        if not math.isfinite(mean_loss):
            raise TrainingError(f"non-finite loss ({mean_loss}) at {where}, step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm, was_clipped = clip_gradients(params, cfg.clip_norm, cfg.clip_value)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(mean_loss)
        norms.append(norm)
        clipped += was_clipped
        bar.update()
        bar.set_postfix(step=where, loss=f"{mean_loss:.4f}", refresh=False)
        if deadline is not None and workers.largest(time.monotonic() - deadline) > 0:
            break
    return {
        "loss": float(np.mean(losses)),
        "grad_norm_mean": float(np.mean(norms)),
        "grad_norm_max": float(np.max(norms)),
        "clipped_share": clipped / len(norms),
        "lr": opt.param_groups[0]["lr"],
    }


def _to(device: torch.device, *batch):
    """A batch from _batch on the training device (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    *tensors, state = batch
    return (*(t.to(device) for t in tensors), {k: v.to(device) for k, v in state.items()})


@torch.no_grad()
def evaluate_loss(
    model: Forecaster,
    win: _Windows,
    cfg: TrainConfig,
    quantiles: torch.Tensor,
    warm: _WarmStates | None = None,
    workers: Workers = Workers(),  # noqa: B008
) -> float:
    """Mean pinball loss over the windows' masked points (data-parallel: each rank a share, summed)."""
    model.eval()
    total, weight = 0.0, 0.0
    rows = workers.share(np.arange(len(win.starts)))
    for first in range(0, len(rows), cfg.batch_size):
        batch = _batch(model, win, rows[first : first + cfg.batch_size], cfg.window, warm)
        values, ts, cov, target, mask, state = _to(workers.device, *batch)
        part, count = pinball_sum(model.forecast_all_z(values, ts, cov, state), target, mask, quantiles)
        total += float(part)
        weight += float(count)
    return workers.total(total) / max(1.0, workers.total(weight))


@torch.no_grad()
def forecast_series(model: Forecaster, series) -> np.ndarray:
    """Raw-unit quantile forecasts after every step of one whole series: (T, horizon, Q).

    One pass from zero state over all history, as a streaming server would see it.
    """
    model.eval()
    values = _tensor(series.values, torch.float32)[None]
    ts = _tensor(series.timestamps_ms, torch.int64)[None]
    cov = _tensor(series.covariates, torch.float32).reshape(1, values.shape[1], -1)
    return model.unscale_values(model.forecast_all_z(values, ts, cov))[0].numpy()


def scaled_config(config: ModelConfig, series: Sequence) -> ModelConfig:
    """``config`` with the scaling statistics of the given (training) series."""
    stats = fit_scaling(
        [s.values for s in series], [np.asarray(s.covariates).reshape(len(s.values), -1) for s in series]
    )
    return replace(config, **stats)


def _seeded_model(config: ModelConfig, seed: int) -> Forecaster:
    torch.manual_seed(seed)
    return Forecaster(config)
