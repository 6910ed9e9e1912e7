"""Live accuracy per model version, and the shadow challenger.

`LiveMonitor` gives every served version a `LiveScorer` (serving.live), hooked into its step
processor, and reports all of them (GetLiveAccuracy, the Prometheus metrics). With a shadow alias
(`--shadow-alias candidate`) it also loads the version that alias points at and steps it beside
the served version on every monitored series (`ShadowRunner`): its own state rows in its own
arena, one ORT call per served step batch on its own executor thread, scored like the served
version, never answered. The served scorer then also sums its own pairs over exactly the pairs
the shadow scores (same series, targets and origins: `versus_shadow`), with the served version's
MASE scale for both, so the two compare like for like.

The shadow follows the alias (polled every --watch-interval-s): when it moves, the shadow restarts
on the new version; when it points at the served version (after a promotion), no shadow runs.
When the served version changes, the shadow restarts beside the new one (series that stay on a
retired version are not shadowed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

import numpy as np

from serving.config import MonitorConfig
from serving.errors import RegistryUnavailable
from serving.live import BucketAccuracy, LiveScorer, bytes_per_series, origin_stride_for, overall_mase, pooled
from serving.model_store import LoadedModel, ModelStore

log = logging.getLogger(__name__)

MAX_PENDING = 64  # shadow ORT calls queued at most; past it a batch is skipped (its series restart)
KEEP_VERSIONS = 8  # served versions whose figures are still reported after they were unloaded


@dataclass(frozen=True)
class VersionReport:
    model_version: str
    role: str  # "served" or "shadow"
    since_load: list[BucketAccuracy]
    recent: list[BucketAccuracy]
    versus_shadow: list[BucketAccuracy]
    shadow_version: str
    backtest_mase: float | None
    drift: float | None  # recent MASE over all horizons / backtest MASE
    monitored_series: int
    current: bool
    scoring_cpu_seconds: float  # thread CPU time spent scoring this version's forecasts  # the version new series start on (served), or the running shadow


class ShadowRunner:
    """Steps a shadow version on the served scorer's monitored series (its slots); see the module."""

    def __init__(self, model: LoadedModel, served: LiveScorer, window_observations: int) -> None:
        self.model, self.served = model, served
        self.scorer = LiveScorer(
            model.version, "shadow", model.spec, served.max_series, window_observations,
            origin_stride=served.origin_stride,
        )  # fmt: skip
        self._row_of_slot = np.full(served.max_series, -1, np.int64)  # the slot's state row in model.arena
        self._pending = 0
        self.skipped = 0  # batches not stepped (queue full or a failed call)
        self.closed = False

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def series(self) -> int:
        """Series stepped in the shadow now."""
        return int((self._row_of_slot >= 0).sum())

    def __call__(
        self,
        slots: np.ndarray,
        fresh: np.ndarray,
        values: np.ndarray,
        ts: np.ndarray,
        cov: np.ndarray,
        scale: np.ndarray,
    ) -> bool:
        """Queue one step of these slots (fresh ones start from zero state); False if skipped."""
        if self.closed or self._pending >= MAX_PENDING:
            self.skipped += 1
            return False
        arena = self.model.arena
        if fresh.any():
            new = slots[fresh]
            old = self._row_of_slot[new]
            if (old >= 0).any():
                arena.free(old[old >= 0])
            self._row_of_slot[new] = arena.alloc([None] * len(new), time.monotonic())
        rows = self._row_of_slot[slots]
        epochs = arena.epoch[rows]
        step = self.model.ort.step
        future = asyncio.get_running_loop().run_in_executor(
            self.model.executor, step, arena, rows, epochs, values, ts, cov
        )
        self._pending += 1
        future.add_done_callback(functools.partial(self._stepped, slots, fresh, values, ts, scale))
        return True

    def _stepped(
        self, slots: np.ndarray, fresh: np.ndarray, values: np.ndarray, ts: np.ndarray, scale: np.ndarray, future
    ) -> None:
        self._pending -= 1
        if self.closed:
            return
        if future.cancelled() or future.exception() is not None:
            self.skipped += 1
            self.served.shadow_lost(slots)
            log.error("event=shadow_step_failed version=%s error=%r", self.version, future.exception())
            return
        started = time.thread_time()
        if fresh.any():
            self.scorer.reset(slots[fresh])
        self.scorer.score(slots, values, ts, future.result(), scale)
        self.scorer.cpu_seconds += time.thread_time() - started

    async def flush(self) -> None:
        """Wait until every queued shadow step has been stepped and scored."""
        await asyncio.get_running_loop().run_in_executor(self.model.executor, lambda: None)
        await asyncio.sleep(0)  # the steps' done callbacks (scoring) run before this task resumes

    def stop(self) -> None:
        """Stop stepping; free the state rows."""
        self.closed = True
        rows = self._row_of_slot[self._row_of_slot >= 0]
        if rows.size:
            self.model.arena.free(rows)
        self._row_of_slot[:] = -1


class LiveMonitor:
    def __init__(self, cfg: MonitorConfig, models: ModelStore, interval_s: float) -> None:
        self.cfg, self.models, self.interval_s = cfg, models, interval_s
        self.scorers: list[tuple[LiveScorer, LoadedModel]] = []  # served versions, oldest first
        self.current: LiveScorer | None = None
        self.shadow: ShadowRunner | None = None
        self.shadows_done: list[LiveScorer] = []  # earlier shadows' scorers (figures only)
        self.refused: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    # -- served versions ------------------------------------------------------------------------

    def served(self, model: LoadedModel) -> None:
        """A new current version (models' on_change): score it; the shadow moves beside it."""
        if not self.cfg.enabled:
            return
        cfg, spec = self.cfg, model.spec
        shape = (spec.horizon, len(spec.quantiles), spec.season or 0)
        stride = cfg.origin_stride or origin_stride_for(*shape, cfg.max_series, cfg.memory_mib << 20)
        scorer = LiveScorer(
            model.version, "served", spec, cfg.max_series, cfg.window_observations, cfg.fraction, model.arena, stride
        )
        log.info(
            "event=live_accuracy version=%s origin_stride=%d kept_origins=%d bytes_per_series=%d max_series=%d",
            model.version,
            stride,
            scorer.kept,
            bytes_per_series(*shape, stride),
            cfg.max_series,
        )
        model.stepper.monitor = scorer.observe
        self.scorers = [*self.scorers, (scorer, model)][-KEEP_VERSIONS:]  # replaced, not mutated: scrapes read it
        self.current = scorer
        self._background(self._fetch_backtest(scorer))
        if self.shadow is not None:
            shadow_model = self.shadow.model
            self._stop_shadow()
            if shadow_model.version == model.version:
                self._background(shadow_model.close())  # promoted: it serves now, from its own load
            else:
                self._start_shadow(shadow_model)

    async def _fetch_backtest(self, scorer: LiveScorer) -> None:
        """The version's backtest MASE (registry tag backtest_mase), the drift ratio's denominator."""
        try:
            tags = await asyncio.to_thread(self.models.version_tags, scorer.version)
            scorer.backtest_mase = float(tags["backtest_mase"]) if "backtest_mase" in tags else None
        except Exception as exc:  # the registry is down or the tag unreadable: no drift figure
            log.warning("event=backtest_mase_unknown version=%s error=%r", scorer.version, str(exc))

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the shadow -----------------------------------------------------------------------------

    def _start_shadow(self, model: LoadedModel) -> None:
        assert self.current is not None
        self.shadow = ShadowRunner(model, self.current, self.cfg.window_observations)
        self.current.start_shadow(self.shadow)
        log.info("event=shadow_started version=%s beside=%s", model.version, self.current.version)

    def _stop_shadow(self) -> None:
        if self.shadow is None:
            return
        self.shadow.stop()
        self.shadows_done = [*self.shadows_done, self.shadow.scorer][-KEEP_VERSIONS:]
        for scorer, _ in self.scorers:
            if scorer.shadow is self.shadow:
                scorer.stop_shadow()
        log.info("event=shadow_stopped version=%s", self.shadow.version)
        self.shadow = None

    async def check_shadow(self) -> None:
        """Run the shadow on the version the alias points at now (none if that is the served one)."""
        alias, current = self.cfg.shadow_alias, self.models.current
        if alias is None or current is None or self.current is None:
            return
        version = await asyncio.to_thread(self.models.resolve_alias, alias)
        running = self.shadow.version if self.shadow is not None else None
        if version == running:
            return
        if version == current.version or version in self.refused:
            if self.shadow is not None:
                old = self.shadow.model
                self._stop_shadow()
                await old.close()
            return
        try:
            model = await self.models.load(version)
        except RegistryUnavailable:
            raise
        except Exception as exc:  # the files are here and do not serve
            self.refused.add(version)
            log.error("event=shadow_refused version=%s error=%r", version, str(exc))
            return
        served = self.models.current.spec
        if model.spec.covariates != served.covariates or model.spec.freq_ms != served.freq_ms:
            self.refused.add(version)
            log.error(
                "event=shadow_refused version=%s error=%r", version,
                f"covariates {model.spec.covariates} / freq_ms {model.spec.freq_ms} differ from the served "
                f"version's {served.covariates} / {served.freq_ms}: it cannot step the same observations",
            )  # fmt: skip
            await model.close()
            return
        if self.shadow is not None:
            old = self.shadow.model
            self._stop_shadow()
            await old.close()
        self._start_shadow(model)

    async def watch_shadow(self) -> None:
        """Follow the shadow alias forever (cancel to stop); registry failures are retried."""
        while True:
            try:
                await self.check_shadow()
            except RegistryUnavailable as exc:
                log.warning("event=shadow_watch_failing alias=%s error=%r", self.cfg.shadow_alias, str(exc))
            if self.interval_s <= 0:
                return
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.shadow is not None:
            old = self.shadow.model
            self._stop_shadow()
            await old.close()

    # -- reports --------------------------------------------------------------------------------

    async def report(self) -> list[VersionReport]:
        """Every version's figures, the shadow's steps all scored first."""
        if self.shadow is not None:
            await self.shadow.flush()
        return self.snapshot()

    def snapshot(self) -> list[VersionReport]:
        """Every version's figures as they are now (the metrics scrape's view: no waiting)."""
        loaded = {id(m) for m in self.models.loaded()}
        out = []
        shadow = self.shadow
        for scorer, model in self.scorers:
            if id(model) not in loaded and scorer is not self.current:
                scorer.retire()
            versus = scorer.versus
            out.append(
                self._report(scorer, scorer is self.current, versus.total if versus is not None else None,
                             shadow.version if shadow is not None and scorer.shadow is shadow else "")
            )  # fmt: skip
        for scorer in self.shadows_done:
            out.append(self._report(scorer, False))
        if shadow is not None:
            out.append(self._report(shadow.scorer, True, monitored=shadow.series))
        return out

    def _report(
        self, scorer: LiveScorer, current: bool, versus=None, shadow_version: str = "", monitored: int | None = None
    ) -> VersionReport:
        total, recent = scorer.acc.total.copy(), scorer.acc.recent
        mase = overall_mase(recent)
        drift = mase / scorer.backtest_mase if mase is not None and scorer.backtest_mase else None
        return VersionReport(
            scorer.version, scorer.role, pooled(total, scorer.q, scorer.buckets), pooled(recent, scorer.q, scorer.buckets),
            pooled(versus, scorer.q, scorer.buckets) if versus is not None else [], shadow_version,
            scorer.backtest_mase, drift, scorer.monitored if monitored is None else monitored, current,
            scorer.cpu_seconds,
        )  # fmt: skip
