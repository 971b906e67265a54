from __future__ import annotations

import hashlib

from cachesvc.digest import Digest
from cachesvc.upstream.ring import Ring
from tests.clock import Clock

PEERS = [f"http://10.0.0.{i}:8701" for i in range(1, 6)]


def digests(n: int) -> list[Digest]:
    return [Digest(hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)]


def test_owners_lists_every_peer_once_owner_first() -> None:
    ring = Ring(PEERS)
    for d in digests(50):
        order = ring.owners(d)
        assert sorted(order) == sorted(PEERS) and order[0] == ring.owner(d)


def test_two_rings_with_the_same_nodes_agree() -> None:
    a, b = Ring(PEERS), Ring(reversed(PEERS))
    assert all(a.owners(d) == b.owners(d) for d in digests(200))


def test_removing_a_peer_moves_only_its_keys_to_the_next_in_order() -> None:
    full = Ring(PEERS)
    less = Ring(PEERS[1:])
    for d in digests(2000):
        before = full.owners(d)
        if before[0] == PEERS[0]:
            assert less.owner(d) == before[1]
        else:
            assert less.owner(d) == before[0]


def test_keys_spread_over_peers() -> None:
    ring = Ring(PEERS[:3])
    counts = {p: 0 for p in PEERS[:3]}
    for d in digests(6000):
        owner = ring.owner(d)
        assert owner is not None
        counts[owner] += 1
    assert max(counts.values()) / (6000 / 3) < 1.25


def test_a_peer_marked_down_goes_last_until_its_time_is_up() -> None:
    clock = Clock()
    ring = Ring(PEERS, clock=clock, down_for=10)
    d = digests(1)[0]
    owner = ring.owner(d)
    assert owner is not None
    before = ring.owners(d)
    ring.mark_down(owner)
    assert ring.owners(d) == [*before[1:], owner]
    clock.now += 10.5
    assert ring.owners(d) == before


def test_peers_marked_down_stay_listed_in_ring_order_behind_the_others() -> None:
    ring = Ring(PEERS, clock=Clock())
    for d in digests(50):
        before = ring.owners(d)
        ring.mark_down(before[0])
        ring.mark_down(before[2])
        assert ring.owners(d) == [before[1], *before[3:], before[0], before[2]]
        ring.mark_up(before[0])
        ring.mark_up(before[2])


def test_when_every_peer_is_marked_down_the_owner_is_still_asked_first() -> None:
    """An origin blip makes every peer answer 502 and get marked down; the walk
    must still ask the owner (the AZ's coalescing point) before the origin."""
    ring = Ring(PEERS, clock=Clock())
    orders = {d: ring.owners(d) for d in digests(50)}
    for peer in PEERS:
        ring.mark_down(peer)
    assert all(ring.owners(d) == order for d, order in orders.items())


def test_a_peer_that_sent_wrong_bytes_is_left_out_until_its_time_is_up() -> None:
    """Even when it is the only peer: a refill must not ask it again."""
    clock = Clock()
    ring = Ring(PEERS[:2], clock=clock, down_for=10)
    d = digests(1)[0]
    liar, other = ring.owners(d)
    ring.mark_refused(liar)
    assert ring.owners(d) == [other] and ring.is_down(liar)
    ring.mark_down(other)
    assert ring.owners(d) == [other]
    clock.now += 10.5
    assert ring.owners(d) == [liar, other] and not ring.is_down(liar)


def test_an_empty_ring_has_no_owner() -> None:
    ring = Ring()
    assert ring.owner(digests(1)[0]) is None and ring.owners(digests(1)[0]) == []
    assert ring.set_nodes(PEERS) and not ring.set_nodes(PEERS)


def test_a_peer_that_leaves_and_comes_back_is_not_still_marked_down() -> None:
    """A peer marked down that leaves the membership and rejoins (a new pod on
    the same address) starts up: its old down mark went with it."""
    clock = Clock()
    ring = Ring(PEERS, clock=clock, down_for=10)
    d = digests(1)[0]
    owner = ring.owner(d)
    assert owner is not None
    ring.mark_down(owner)
    assert ring.set_nodes([p for p in PEERS if p != owner])
    assert ring.set_nodes(PEERS)
    assert not ring.is_down(owner)
    assert ring.owners(d)[0] == owner  # not kept last as a down peer
