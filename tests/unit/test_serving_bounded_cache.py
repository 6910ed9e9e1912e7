"""The byte-bounded cache: holds at most its budget, and keeps what is used again."""

import pytest

from serving.bounded_cache import ByteBoundedCache, entry_bytes


def test_the_bytes_held_stay_within_the_budget():
    cache: ByteBoundedCache[str, bytes] = ByteBoundedCache(64 << 10)
    for i in range(10_000):
        cache.get_or_make(f"{i:06d}".ljust(200, "x"), str.encode)
        assert cache.nbytes <= 64 << 10
    assert 0 < len(cache) < 10_000
    assert cache.nbytes == sum(entry_bytes(k, v) for k, v in [*cache.recent.items(), *cache._older.items()])


def test_an_entry_used_again_survives_a_flood_of_one_off_keys():
    made: list[str] = []

    def make(key: str) -> bytes:
        made.append(key)
        return key.encode()

    cache: ByteBoundedCache[str, bytes] = ByteBoundedCache(16 << 10)
    for i in range(5_000):
        cache.get_or_make("hot", make)
        cache.get_or_make(f"cold-{i}", make)
    assert made.count("hot") == 1  # found in the recent or the older generation every time
    assert made.count("cold-0") == 1 and "cold-0" not in cache.recent  # long gone
    assert cache.get_or_make("cold-0", make) == b"cold-0" and made.count("cold-0") == 2


def test_a_tiny_budget_is_refused():
    with pytest.raises(ValueError, match="budget_bytes must be >= 2048"):
        ByteBoundedCache(100)
