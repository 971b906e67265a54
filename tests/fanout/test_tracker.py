"""The fan-out tracker's choices, without sockets: breadth-first, capped,
never a cycle, self-healing, bounded."""

from __future__ import annotations

import pytest

from cachesvc.digest import Digest
from cachesvc.fanout.tracker import Tracker

P = "http://peer"
D = Digest("ab" * 32)


def hosts(n: int) -> list[str]:
    return [f"http://agent-{i}" for i in range(n)]


def test_owner_only_when_its_fanout_is_zero() -> None:
    tracker = Tracker(P, fanout=0)
    assert [tracker.assign(D, h, 2) for h in hosts(5)] == [None] * 5
    assert tracker.members(D) == []


def test_parents_are_given_breadth_first_in_join_order() -> None:
    tracker = Tracker(P, fanout=2)
    a = hosts(9)
    parents = [tracker.assign(D, h, 2) for h in a]
    # the owner feeds 2; then agent-0 feeds 2, agent-1 feeds 2, agent-2 ...
    assert parents == [None, None, a[0], a[0], a[1], a[1], a[2], a[2], a[3]]


def test_every_member_feeds_at_most_its_own_fanout() -> None:
    tracker = Tracker(P, fanout=3)
    a = hosts(40)
    fanouts = {h: (1 if i % 2 else 4) for i, h in enumerate(a)}
    chosen = [tracker.assign(D, h, fanouts[h]) for h in a]
    for member in tracker.members(D):
        assert member.children == sum(1 for c in chosen if (c or P) == member.url)
        assert member.children <= member.fanout


def test_hosts_that_cannot_be_parents_are_still_given_one() -> None:
    tracker = Tracker(P, fanout=1)
    assert tracker.assign(D, None, 0) is None  # the owner's one slot
    assert tracker.assign(D, "http://a", 0) is None  # nobody else: fallback to the owner
    assert [m.url for m in tracker.members(D)] == [P]
    assert tracker.assign(D, "http://b", 2) is None
    assert tracker.assign(D, "http://c", 0) == "http://b"


def test_avoided_members_are_skipped_and_dropped() -> None:
    tracker = Tracker(P, fanout=1)
    a = hosts(4)
    assert tracker.assign(D, a[0], 1) is None
    assert tracker.assign(D, a[1], 1) == a[0]
    # a[1] is dropped, which gives its slot under a[0] back
    assert tracker.assign(D, a[2], 1, avoid=[a[1]]) == a[0]
    assert a[1] not in [m.url for m in tracker.members(D)]


def test_a_requester_is_never_given_itself_or_a_descendant() -> None:
    tracker = Tracker(P, fanout=1)
    a = hosts(4)
    for h in a:
        tracker.assign(D, h, 1)  # a chain: P <- a0 <- a1 <- a2 <- a3
    # a1's parent (a0) failed: it must not be sent below itself (a2, a3)
    parent = tracker.assign(D, a[1], 1, avoid=[a[0]])
    assert parent not in (a[1], a[2], a[3])


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_host_whose_parent_was_dropped_elsewhere_is_not_given_its_own_descendant(
    depth: int,
) -> None:
    """K=1: P <- a0 <- a1 <- ... a chain of ``depth`` hosts below a1. A
    newcomer reports a0 (dropped: P has room again and takes it); then a1 asks
    again. The only open members are the last host of a1's chain (its child,
    grandchild ...) and the newcomer: a1 must get the newcomer, never its own
    descendant (a cycle whose members wait on each other until a stall)."""
    tracker = Tracker(P, fanout=1)
    a = hosts(depth + 3)
    chain, newcomer = a[: depth + 2], a[-1]
    assert [tracker.assign(D, h, 1) for h in chain] == [None, *chain[:-1]]
    assert tracker.assign(D, newcomer, 1, avoid=[a[0]]) is None
    assert tracker.assign(D, a[1], 1, avoid=[a[0]]) == newcomer
    by_url = {m.url: m for m in tracker.members(D)}
    assert by_url[a[1]].parent == newcomer
    assert [by_url[h].parent for h in chain[2:]] == chain[1:-1]  # the chain below a1 stays


def test_a_host_asking_again_frees_its_slot_under_its_old_parent() -> None:
    """K=1: P <- a0 <- a1. a1 asks again with nothing to avoid (it lost the
    package): no one has room, so the owner serves it, and a0's slot comes
    back for the next newcomer."""
    tracker = Tracker(P, fanout=1)
    a = hosts(3)
    assert [tracker.assign(D, h, 1) for h in a[:2]] == [None, a[0]]
    assert tracker.assign(D, a[1], 1) is None
    assert tracker.assign(D, a[2], 1) == a[0]
    children = {m.url: m.children for m in tracker.members(D)}
    assert children[a[0]] == 1


def test_an_avoid_list_naming_the_owner_does_not_drop_the_root() -> None:
    """A requester may list the owner itself (a hostile or confused header):
    the owner stays the tree's root and keeps answering."""
    tracker = Tracker(P, fanout=1)
    a = hosts(3)
    assert tracker.assign(D, a[0], 1) is None
    assert tracker.assign(D, a[1], 1, avoid=[P]) == a[0]
    assert tracker.assign(D, a[2], 1, avoid=[P]) == a[1]
    assert [m.url for m in tracker.members(D)] == [P, *a]


def test_a_host_coming_back_moves_under_its_new_parent() -> None:
    tracker = Tracker(P, fanout=2)
    a = hosts(3)
    for h in a:
        tracker.assign(D, h, 2)
    assert tracker.assign(D, a[2], 2, avoid=[a[0]]) in (None, a[1])
    by_url = {m.url: m for m in tracker.members(D)}
    assert by_url[a[2]].parent in (P, a[1])


def test_trees_expire_when_idle_and_are_bounded_in_number() -> None:
    now = [0.0]
    tracker = Tracker(P, fanout=1, clock=lambda: now[0], ttl=60, max_digests=3)
    assert tracker.assign(D, "http://a", 1) is None
    assert tracker.assign(D, "http://b", 1) == "http://a"
    now[0] = 61.0
    assert tracker.assign(D, "http://c", 1) is None  # a fresh tree
    for i in range(5):
        tracker.assign(Digest(f"{i:02x}" * 32), "http://x", 1)
    assert tracker.members(D) == []  # pushed out by newer trees


def test_exactly_max_digests_trees_are_kept_the_least_recently_used_goes_first() -> None:
    tracker = Tracker(P, fanout=1, max_digests=3)
    d = [Digest(f"{i:02x}" * 32) for i in range(4)]
    for digest in d[:3]:
        tracker.assign(digest, "http://a", 1)
    assert all(tracker.members(digest) for digest in d[:3])
    tracker.assign(d[0], "http://b", 1)  # d[0] used again: d[1] is now the oldest
    tracker.assign(d[3], "http://a", 1)
    assert [bool(tracker.members(digest)) for digest in d] == [True, False, True, True]


def test_members_per_tree_are_bounded() -> None:
    tracker = Tracker(P, fanout=2, max_members=3)
    for h in hosts(10):
        tracker.assign(D, h, 2)
    assert len(tracker.members(D)) == 3
