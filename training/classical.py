"""The classical baseline "mstl_ets": MSTL decomposition plus a damped-trend ETS on what is left.

This is the standard recipe for high-frequency data with several seasons (statsforecast's MSTL
model, Bandara et al. 2021), built from statsmodels. Per series, on its training part only:

1. MSTL (``statsmodels.tsa.seasonal.MSTL``) splits the training values into one seasonal component per
   period (e.g. a day and a week in steps) plus trend and remainder. No periods: no decomposition.
2. ETS(A,Ad,N) (``statsmodels.tsa.exponential_smoothing.ets.ETSModel``: additive error, additive damped
   trend, no seasonality) is fitted by maximum likelihood to the seasonally adjusted training series.

Scoring at origin o (the last observed step, always at or after the end of the training part): the ETS
forecast from its filtered state at o, plus each seasonal component at the steps ahead. Beyond the
training part a seasonal component is the periodic extension of its last fitted cycle; the adjusted
history there is y minus that periodic profile. The ETS parameters stay fixed from the training fit; the
states come from running statsmodels' filter with those parameters once over the whole adjusted series,
so the state at o has seen steps 0..o and nothing later (the decomposition, being two-sided, is used only
inside the training part, which every origin follows). No refitting per origin, like the network.

Choices and fallbacks (dropped periods and fallbacks are logged):
- Periods are deduplicated and sorted; one of at least half the training part (2p >= n) cannot be
  estimated by STL and is dropped.
- STL's trend and low-pass LOESS smoothers are evaluated every ``jump`` steps and interpolated in
  between, with jump about a tenth of the shortest period. R's ``stl`` and the original Fortran do the
  same with a tenth of each window (every window is longer than its period, so ours is never coarser).
  statsmodels' default of 1 costs 27x more on 5-minute data (MSTL of four weeks of bank_calls: 30 s
  instead of 1.1 s on 2 cores) and 3-6x on hourly and half-hourly data (bench/baselines.py), while the
  exact components of those four weeks differ from ours by under 0.2 % of their range, and the backtest
  MASE of elecdemand, nyc_weather and nox moves by at most 0.0005.
- ETS is fitted on the adjusted series standardised to mean 0 and sd 1: an additive-error ETS is
  equivariant under y -> a + b y, so this changes only the optimiser's conditioning (unscaled, series
  around 1e12 left L-BFGS stuck at its start values).
- If the damped-trend fit raises or gives non-finite parameters, likelihood or states, simple exponential
  smoothing, ETS(A,N,N), is fitted instead (``ClassicalFit.trend`` is then False). If that fails too, a
  ``ValueError`` says so. A fit whose optimiser reports no convergence is kept, with a warning in the log
  and ``converged=False`` (L-BFGS with numerical gradients often stops that way at a good optimum).
- A constant training part (or one the seasonal components explain exactly) has no variance to fit an
  error model to, and a training part under ``MIN_TRAIN_STEPS`` too few points for five parameters: both
  are ``ValueError``s, not a made-up forecast.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MIN_TRAIN_STEPS = 10  # ETS(A,Ad,N) estimates 5 parameters (alpha, beta, phi, initial level and trend)


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields
class ClassicalFit:
    """MSTL + ETS fitted to one series' training part; ``forecast`` scores it on later origins."""

    train_length: int  # steps in the training part the fit saw: values[:train_length]
    periods: tuple[int, ...]  # seasonal periods decomposed (steps), ascending; () = no decomposition
    fitted_seasonal: np.ndarray  # float64 [train_length] sum of the seasonal components in the training part
    profiles: tuple[np.ndarray, ...]  # float64 [p] per period: its component over the last p training steps
    trend: bool  # True: ETS(A,Ad,N); False: the ETS(A,N,N) fallback
    params: np.ndarray  # statsmodels' ETS params on the standardised adjusted series, in its order
    center: float  # mean of the adjusted training series
    scale: float  # its standard deviation (the ETS sees (adjusted - center) / scale)
    converged: bool  # the optimiser's own verdict
    seconds: float  # wall time of decomposition + ETS fit

    @property
    def method(self) -> str:
        seasons = f"MSTL{list(self.periods)} + " if self.periods else ""
        return seasons + ("ETS(A,Ad,N)" if self.trend else "ETS(A,N,N) fallback")

    def seasonal(self, n: int) -> np.ndarray:
        """float64 [n]: the fitted seasonal sum in the training part, each profile repeated beyond it."""
        out = np.zeros(n)
        m = min(n, self.train_length)
        out[:m] = self.fitted_seasonal[:m]
        ahead = np.arange(max(n - self.train_length, 0))  # steps after the training part, 0-based
        for p, profile in zip(self.periods, self.profiles):
            # profile[k] is the component at train_length - p + k, so train_length + j maps to k = j mod p.
            out[self.train_length :] += profile[ahead % p]
        return out

    def forecast(self, values: np.ndarray, origins: np.ndarray, horizon: int) -> np.ndarray:
        """float64 [N, horizon] point forecasts at each origin (int [N], each >= train_length - 1)."""
        values = np.asarray(values, np.float64)
        origins = np.asarray(origins, np.int64)
        if origins.size and (origins.min() < self.train_length - 1 or origins.max() >= len(values)):
            raise ValueError(
                f"origins must lie in [{self.train_length - 1}, {len(values) - 1}] (from the last training step "
                f"on): the decomposition is two-sided inside the training part; got {origins.min()}..{origins.max()}"
            )
        seasonal = self.seasonal(len(values) + horizon)  # [T + H], so the last origin's steps exist
        adjusted = (values - seasonal[: len(values)] - self.center) / self.scale  # [T]
        states = _ets_states(adjusted, self.trend, self.params)  # [T, 1 or 2]: (level[, slope]) after step t
        level = states[origins, 0][:, None]  # [N, 1]
        k = np.arange(1, horizon + 1)  # [H] steps ahead
        if self.trend:
            phi = self.params[2]  # damping_trend, third in statsmodels' order (alpha, beta, phi, l0, b0)
            damped = np.cumsum(phi**k)  # [H] phi + phi^2 + ... + phi^k
            ets = level + states[origins, 1][:, None] * damped[None, :]  # [N, H]
        else:
            ets = np.repeat(level, horizon, axis=1)  # [N, H]
        return self.center + self.scale * ets + seasonal[origins[:, None] + k[None, :]]


def fit_mstl_ets(train: np.ndarray, periods: Sequence[int] = ()) -> ClassicalFit:
    """Fit MSTL (with ``periods``) and ETS to the training values (float [n]); see the module docstring."""
    started = time.perf_counter()
    train = np.asarray(train, np.float64)
    n = len(train)
    if train.ndim != 1 or n < MIN_TRAIN_STEPS:
        raise ValueError(f"the classical baseline needs at least {MIN_TRAIN_STEPS} training steps, got {train.shape}")
    if not np.isfinite(train).all():
        raise ValueError("the training part holds NaN or infinite values")
    if np.ptp(train) == 0:
        raise ValueError(f"the training part is constant ({train[0]:g}); ETS has no variance to fit")
    periods = usable_periods(periods, n)

    seasonal = np.zeros((n, 0))  # [n, K] one column per period
    if periods:
        from statsmodels.tsa.seasonal import MSTL

        jump = max(1, math.ceil(min(periods) / 10))
        mstl = MSTL(train, periods=periods, stl_kwargs={"trend_jump": jump, "low_pass_jump": jump})
        # One period gives a 1-D seasonal, several a [n, K] one; reshape serves both.
        seasonal = np.reshape(np.asarray(mstl.fit().seasonal, np.float64), (n, len(periods)))
    adjusted = train - seasonal.sum(axis=1)  # [n] trend + remainder
    center, scale = float(adjusted.mean()), float(adjusted.std())
    if not scale > 1e-12 * max(1.0, float(np.abs(train).max())):
        raise ValueError(
            f"the seasonal components {list(periods)} explain the training part exactly; nothing left to fit"
        )

    z = (adjusted - center) / scale
    trend, params, converged = True, None, False
    for trend in (True, False):
        try:
            params, converged = _fit_ets(z, trend)
            break
        except (ValueError, np.linalg.LinAlgError, FloatingPointError) as exc:
            log.warning(
                "mstl_ets: ETS(%s) fit failed (%s)%s",
                "A,Ad,N" if trend else "A,N,N",
                exc,
                "; falling back to ETS(A,N,N)" if trend else "",
            )
    if params is None:
        raise ValueError("the classical baseline could not fit ETS(A,Ad,N) nor ETS(A,N,N) to the adjusted series")
    if not converged:
        log.warning("mstl_ets: the ETS optimiser did not report convergence; keeping its parameters %s", params)
    return ClassicalFit(
        train_length=n,
        periods=periods,
        fitted_seasonal=seasonal.sum(axis=1),
        profiles=tuple(seasonal[n - p :, i].copy() for i, p in enumerate(periods)),
        trend=trend,
        params=params,
        center=center,
        scale=scale,
        converged=converged,
        seconds=time.perf_counter() - started,
    )


def usable_periods(periods: Sequence[int], train_length: int) -> tuple[int, ...]:
    """Distinct periods (steps) in ascending order, without those STL cannot estimate (2p >= n)."""
    if any(isinstance(p, bool) or int(p) != p or p < 2 for p in periods):
        raise ValueError(f"seasonal periods must be whole numbers of steps >= 2, got {list(periods)}")
    wanted = sorted({int(p) for p in periods})
    kept = tuple(p for p in wanted if 2 * p < train_length)
    if len(kept) < len(wanted):
        log.info(
            "mstl_ets: dropping periods %s, longer than half the %d-step training part",
            [p for p in wanted if p not in kept],
            train_length,
        )
    return kept


def _fit_ets(z: np.ndarray, trend: bool) -> tuple[np.ndarray, bool]:
    """ETS(A,Ad,N) or ETS(A,N,N) by maximum likelihood on z (float [n]): (params, converged)."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    model = ETSModel(z, error="add", trend="add" if trend else None, damped_trend=trend)
    with warnings.catch_warnings():
        # Its ConvergenceWarning is read from mle_retvals below and logged once, in our words.
        warnings.simplefilter("ignore")
        result = model.fit(disp=False)
    params = np.asarray(result.params, np.float64)
    if not (np.isfinite(params).all() and np.isfinite(result.llf) and np.isfinite(result.states).all()):
        raise ValueError(f"non-finite parameters, likelihood or states (params {params}, llf {result.llf})")
    return params, bool(result.mle_retvals.get("converged", True))


def _ets_states(z: np.ndarray, trend: bool, params: np.ndarray) -> np.ndarray:
    """float64 [T, 1 or 2]: statsmodels' filtered (level[, slope]) after each step of z, params fixed."""
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    model = ETSModel(z, error="add", trend="add" if trend else None, damped_trend=trend)
    _, states = model.smooth(params, return_raw=True)  # one causal pass; return_raw skips the Hessian
    return np.asarray(states, np.float64).reshape(len(z), -1)
