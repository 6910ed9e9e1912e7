"""Calendar seasons in steps: one day and one week, from the data's step length.

The model's default lags (``model.lags``) and the classical baseline's seasonal periods both come
from here, so a new data set gets the same seasonal view in both without any setting: half-hourly
data gets 48 and 336, hourly 24 and 168, 5-minute 288 and 2016, daily data only the week (7; one
day back is the latest value, which every forecaster already sees). A period is used only when the
training data covers it ``min_cycles`` times over, so a month of hourly data gets no weekly lag.
"""

from __future__ import annotations

from collections.abc import Sequence

MS_PER_DAY = 86_400_000
MS_PER_WEEK = 7 * MS_PER_DAY


def calendar_periods(freq_ms: int) -> list[int]:
    """One day and one week in steps of ``freq_ms``, where they are whole numbers of steps > 1."""
    if freq_ms < 1:
        raise ValueError(f"freq_ms must be positive, got {freq_ms}")
    return [span // freq_ms for span in (MS_PER_DAY, MS_PER_WEEK) if span % freq_ms == 0 and span // freq_ms > 1]


def weekly_lag(freq_ms: int, season: int) -> int | None:
    """The weekly seasonal naive's lag: one week in steps of ``freq_ms`` (as ``calendar_periods`` has
    it), or None where a week is not a whole number of steps or not longer than the season (a season
    of a week is the weekly naive already: seven seasons back would be seven weeks, a lag no
    calendar explains)."""
    week = MS_PER_WEEK // freq_ms
    return week if week in calendar_periods(freq_ms) and week > season else None


def covered_periods(periods: Sequence[int], train_length: int, min_cycles: int = 3) -> list[int]:
    """The periods that the shortest training series spans at least ``min_cycles`` times."""
    return [p for p in periods if p * min_cycles <= train_length]
