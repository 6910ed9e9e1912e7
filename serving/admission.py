"""What may start, and what no longer lives: client limits, the live-series cap, idle expiry.

Live-series cap (`StateConfig.max_series`), the policy: when a request would start new series
past the cap, series idle longer than the idle timeout are reclaimed first; if that is not
enough the request is refused with RESOURCE_EXHAUSTED. Running series are never evicted to
make room: a series silently restarted from zero state would give wrong forecasts, and the
client could not tell.

Per-client limits (`LimitsConfig`): concurrent streams, live series per stream, observations
per request, series id length. Each is checked before anything of the request is queued, and
refused with a message naming the limit, its flag and where in the request it was hit.

Idle expiry: a state row not stepped for the idle timeout is freed, and the table that held it
(a stream's series, the server-wide sequences: the row's owner in the state arena) is told to
forget it through `SeriesOwner.forget`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

from serving import validation
from serving.config import LimitsConfig, StateConfig
from serving.errors import LimitExceeded

if TYPE_CHECKING:
    from serving.model_store import LoadedModel, ModelStore

log = logging.getLogger(__name__)


class SeriesOwner(Protocol):
    """A table of live series; each state row's owner in the arena is (table, key)."""

    def forget(self, key: Hashable, model: LoadedModel, row: int) -> bool:
        """Drop the series `key` if it still holds `row` of `model` (its row is being freed)."""
        ...


class Admission:
    def __init__(
        self,
        models: ModelStore,
        limits: LimitsConfig,
        state: StateConfig,
        on_expired: Callable[[int], object] | None = None,
    ) -> None:
        self._models = models
        self.limits = limits
        self._state = state
        self._on_expired = on_expired

    @property
    def idle_timeout_s(self) -> float:
        return self._state.idle_timeout_s

    @property
    def live_series(self) -> int:
        return sum(m.arena.live_count for m in self._models.loaded())

    @property
    def state_bytes(self) -> int:
        return sum(m.arena.nbytes for m in self._models.loaded())

    def check_streams(self, open_streams: int) -> None:
        """Room for one more stream, or LimitExceeded past --max-streams."""
        cap = self.limits.max_streams
        if open_streams >= cap:
            raise LimitExceeded(
                "max_streams",
                f"cannot open another stream: {open_streams} streams are open and the limit is {cap} "
                "(--max-streams); send many series over one stream instead of a stream per series",
            )

    def check_request(self, observations: int, series_ids: Sequence[Hashable] = ()) -> None:
        """Per-request checks of a stream request, before any of it is queued."""
        cap = self.limits.max_observations_per_request
        if observations > cap:
            raise LimitExceeded(
                "max_observations_per_request",
                f"the request has {observations} observations and the limit is {cap} "
                "(--max-observations-per-request); split it into several requests",
            )
        validation.check_series_ids(series_ids)

    def check_histories(self, observations: int, histories: int) -> None:
        """A stateless request's observations, summed over its histories."""
        cap = self.limits.max_observations_per_request
        if observations > cap:
            raise LimitExceeded(
                "max_observations_per_request",
                f"the request has {observations} observations in {histories} histories and the limit is "
                f"{cap} (--max-observations-per-request); split it into several requests",
            )

    def check_new_series(self, series_ids: Sequence[str], positions: Sequence[int], table_live: int | None) -> None:
        """Before a table starts new series (distinct ids at these request positions): ids within
        --max-series-id-bytes, and room for them (table_live: the stream's live series, for
        --max-series-per-stream; None for a table without that limit). Only new series are
        checked: every other id of a request is a live series, checked when it started."""
        validation.check_series_id_lengths(series_ids, self.limits.max_series_id_bytes, positions)
        self.reserve(len(series_ids), validation.where(int(positions[0]), series_ids[0]), table_live)

    def reserve(self, n: int, where: str, table_live: int | None = None) -> None:
        """Room for n new series, or LimitExceeded: past the stream's --max-series-per-stream
        (when table_live is given), or past --max-series after reclaiming idle series."""
        if table_live is not None and table_live + n > self.limits.max_series_per_stream:
            raise LimitExceeded(
                "max_series_per_stream",
                f"{where}: cannot start {n} new series in this stream: it has {table_live} live series and "
                f"the limit is {self.limits.max_series_per_stream} (--max-series-per-stream); end finished "
                "series with end=true or spread them over more streams",
            )
        cap = self._state.max_series
        if self.live_series + n <= cap:
            return
        self.sweep_idle(time.monotonic())
        live = self.live_series
        if live + n > cap:
            raise LimitExceeded(
                "max_series",
                f"{where}: cannot start {n} new series: {live} series are live and the cap is {cap} "
                "(--max-series); end finished series with end=true or close idle streams",
            )

    def sweep_idle(self, now: float) -> int:
        """Free every series not stepped for idle_timeout_s; returns how many."""
        freed = 0
        for model in self._models.loaded():
            rows = model.arena.idle_rows(now, self._state.idle_timeout_s)
            if not len(rows):
                continue
            for row in rows.tolist():
                owner, key = model.arena.owners[row]
                owner.forget(key, model, row)
            model.arena.free(rows)
            freed += len(rows)
            self._models.release(model)
        if freed:
            log.info("event=series_expired count=%d idle_timeout_s=%s", freed, self._state.idle_timeout_s)
            if self._on_expired is not None:
                self._on_expired(freed)
        return freed

    async def run_sweeper(self) -> None:
        """Expire idle series forever (cancel the task to stop)."""
        while True:
            await asyncio.sleep(self._state.sweep_interval_s)
            self.sweep_idle(time.monotonic())
