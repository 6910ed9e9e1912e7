"""The alias watch's retry schedule after failed checks (serving.model_store.retry_delay)."""

import pytest

from serving.model_store import retry_delay


def test_retries_start_at_a_second_and_double_up_to_the_watch_interval():
    assert [retry_delay(n, 30.0) for n in range(8)] == [30.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize("interval", [0.2, 1.0])
def test_a_short_interval_is_never_stretched(interval):
    assert {retry_delay(n, interval) for n in range(1, 6)} == {interval}


def test_a_long_outage_stays_at_the_interval():
    assert retry_delay(10_000, 300.0) == 300.0
