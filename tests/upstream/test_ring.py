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
    ring.mark_down(owner)
    assert ring.owners(d)[-1] == owner and owner not in ring.up_owners(d)
    clock.now += 10.5
    assert ring.owners(d)[0] == owner


def test_an_empty_ring_has_no_owner() -> None:
    ring = Ring()
    assert ring.owner(digests(1)[0]) is None and ring.owners(digests(1)[0]) == []
    assert ring.set_nodes(PEERS) and not ring.set_nodes(PEERS)
