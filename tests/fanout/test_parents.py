"""The owner's side of fan-out without sockets: which requests the tracker sees."""

from __future__ import annotations

from cachesvc.digest import Digest
from cachesvc.fanout.parents import ADVERTISE, AVOID, FANOUT, parent_for
from cachesvc.fanout.tracker import Tracker

P = "http://127.0.0.1:7000"
D = Digest("cd" * 32)


def test_a_head_with_fanout_headers_is_answered_by_the_owner_and_joins_no_tree() -> None:
    """A HEAD carries no body to feed anyone: it must not take a slot under a
    parent nor become a parent itself."""
    tracker = Tracker(P, fanout=1)
    headers = {FANOUT: "2", ADVERTISE: "http://127.0.0.1:7001"}
    assert parent_for(headers, "HEAD", tracker, D) is None
    assert tracker.members(D) == []
    assert parent_for(headers, "GET", tracker, D) is None  # the owner's one slot
    assert parent_for({FANOUT: "2"}, "GET", tracker, D) == "http://127.0.0.1:7001"


def test_requests_without_fanout_headers_never_reach_the_tracker() -> None:
    tracker = Tracker(P, fanout=1)
    assert parent_for({ADVERTISE: "http://127.0.0.1:7001"}, "GET", tracker, D) is None
    assert tracker.members(D) == []


def test_malformed_advertise_and_avoid_entries_are_ignored() -> None:
    tracker = Tracker(P, fanout=1)
    assert parent_for({FANOUT: "1", ADVERTISE: "http://127.0.0.1:7001"}, "GET", tracker, D) is None
    headers = {FANOUT: "x", ADVERTISE: "not a url", AVOID: "::,http://127.0.0.1:7001/path"}
    assert parent_for(headers, "GET", tracker, D) == "http://127.0.0.1:7001"
    assert [m.url for m in tracker.members(D)] == [P, "http://127.0.0.1:7001"]
