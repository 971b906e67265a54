"""The negative cache: a digest the origin lacked is remembered for its TTL,
forgotten after it, and the table stays bounded (injected clock)."""

from __future__ import annotations

from cachesvc.digest import Digest
from cachesvc.readpath.tiers import NEGATIVE_MAX, NegativeCache
from tests.clock import Clock


def digest(i: int) -> Digest:
    return Digest(f"{i:064x}")


def test_an_entry_is_present_before_its_ttl_and_gone_after() -> None:
    clock = Clock()
    cache = NegativeCache(ttl=10.0, clock=clock)
    cache.add(digest(1))
    clock.now += 9.9
    assert digest(1) in cache
    clock.now += 0.1
    assert digest(1) not in cache
    clock.now -= 5.0  # a clock read back does not bring it back: it was forgotten
    assert digest(1) not in cache


def test_adding_again_renews_the_ttl_and_discard_forgets() -> None:
    clock = Clock()
    cache = NegativeCache(ttl=10.0, clock=clock)
    cache.add(digest(1))
    clock.now += 8.0
    cache.add(digest(1))
    clock.now += 8.0
    assert digest(1) in cache
    cache.discard(digest(1))
    assert digest(1) not in cache


def test_the_table_stays_bounded_dropping_the_oldest() -> None:
    clock = Clock()
    cache = NegativeCache(ttl=10.0, clock=clock)
    for i in range(NEGATIVE_MAX + 100):
        cache.add(digest(i))
    assert len(cache._until) == NEGATIVE_MAX
    assert digest(99) not in cache and digest(100) in cache
    assert digest(NEGATIVE_MAX + 99) in cache
