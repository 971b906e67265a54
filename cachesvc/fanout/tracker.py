"""Who feeds whom: the per-digest fan-out tree, kept by the digest's ring owner.

An L2 peer sees every agent that asks it for a digest it owns. For each such
digest it keeps the hosts that hold the package or are filling it, in the
order they joined (the peer itself first), and hands each newcomer a
*parent*: the first member, in join order, that has fed fewer hosts than its
own fan-out cap ``K``. So the hosts that fetch one package form a balanced
K-ary tree in join order (FaaSNet's function trees are built the same way,
breadth-first), its depth grows with log_K of the number of hosts, and every
host (the owner included) feeds at most ``K`` others.

Guarantees:

* **A tree, never a cycle**: a requester is never handed itself, a member on
  its avoid list, or one of its own descendants. (Across two owners that
  disagree about the ring, hosts check ancestry themselves: see
  :mod:`cachesvc.fanout.parents`.)
* **Self-healing**: a member a requester reports on its avoid list (dead,
  stalled, lying, evicted) is dropped; its children keep their place.
* **Bounded**: at most ``max_digests`` trees (least recently used go first,
  and any idle for ``ttl`` seconds), ``max_members`` hosts per tree (later
  ones are still given parents, but become no one's parent).
* Counts are not decremented when a transfer ends (the tracker sees
  requests, not completions): a full member stays full for its tree's life,
  so later waves attach below newer members and the tree keeps growing
  breadth-first. A member's slots come back only when it is dropped or the
  tree expires. The hosts themselves enforce ``K`` on transfers at once.

No network, no clock of its own (injected): pure bookkeeping.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cachesvc.digest import Digest

log = logging.getLogger(__name__)

MAX_DIGESTS = 4096
MAX_MEMBERS = 10_000
TTL = 600.0


@dataclass
class Member:
    url: str
    fanout: int
    parent: str | None  # None for the tree's root (the owner)
    children: int = 0


@dataclass
class Tree:
    """The hosts that hold or fill one digest, in join order."""

    members: dict[str, Member] = field(default_factory=dict)  # insertion order is join order
    used: float = 0.0
    cursor: int = 0  # members before it are full: the search starts here

    def open_members(self) -> Iterable[Member]:
        members = list(self.members.values())
        while self.cursor < len(members) and _full(members[self.cursor]):
            self.cursor += 1
        return members[self.cursor :]

    def is_descendant(self, url: str, of: str) -> bool:
        """Whether ``url`` sits below ``of`` in the tree (bounded by its size)."""
        node = self.members.get(url)
        for _ in range(len(self.members)):
            if node is None or node.parent is None:
                return False
            if node.parent == of:
                return True
            node = self.members.get(node.parent)
        return False

    def drop(self, url: str) -> None:
        gone = self.members.pop(url, None)
        if gone is None or gone.parent is None:
            return
        for member in self.members.values():
            if member.parent == url:
                member.parent = None  # orphans keep their place, ancestry ends
        parent = self.members.get(gone.parent)
        if parent is not None:
            parent.children = max(0, parent.children - 1)
        self.cursor = 0


def _full(member: Member) -> bool:
    return member.children >= member.fanout


class Tracker:
    """Fan-out trees of the digests this service owns; see the module docstring."""

    def __init__(
        self,
        self_url: str,
        fanout: int,
        clock: Callable[[], float] = time.monotonic,
        max_digests: int = MAX_DIGESTS,
        max_members: int = MAX_MEMBERS,
        ttl: float = TTL,
    ) -> None:
        self.self_url = self_url
        self.fanout = fanout
        self._clock = clock
        self._max_digests = max_digests
        self._max_members = max_members
        self._ttl = ttl
        self._trees: OrderedDict[Digest, Tree] = OrderedDict()

    def assign(
        self, digest: Digest, requester: str | None, fanout: int, avoid: Iterable[str] = ()
    ) -> str | None:
        """The parent ``requester`` should fetch ``digest`` from: a member's URL,
        or None for "this service serves it". A requester with a URL and a
        fan-out above 0 joins the tree as a possible parent for later ones."""
        if self.fanout <= 0:
            return None  # owner-only: the pre-fan-out design
        tree = self._tree(digest)
        for url in avoid:
            if url != self.self_url:
                tree.drop(url)
        parent = self._pick(tree, requester, set(avoid))
        if parent is None:
            log.info("fan-out %s: no member with room for %s; serving it", digest.short, requester)
            parent = tree.members[self.self_url]
        parent.children += 1
        self._join(tree, requester, fanout, parent.url)
        return None if parent.url == self.self_url else parent.url

    def members(self, digest: Digest) -> list[Member]:
        tree = self._trees.get(digest)
        return list(tree.members.values()) if tree is not None else []

    def _pick(self, tree: Tree, requester: str | None, avoid: set[str]) -> Member | None:
        for member in tree.open_members():
            if _full(member) or member.url == requester or member.url in avoid:
                continue
            if requester is not None and tree.is_descendant(member.url, of=requester):
                continue
            return member
        return None

    def _join(self, tree: Tree, requester: str | None, fanout: int, parent: str) -> None:
        if requester is None or fanout <= 0 or requester == self.self_url:
            return
        old = tree.members.get(requester)
        if old is not None:  # back again (its parent failed): it moves under the new one
            old_parent = tree.members.get(old.parent) if old.parent else None
            if old_parent is not None and old.parent != parent:
                old_parent.children = max(0, old_parent.children - 1)
                tree.cursor = 0
            old.parent = parent
            return
        if len(tree.members) < self._max_members:
            tree.members[requester] = Member(requester, fanout, parent)

    def _tree(self, digest: Digest) -> Tree:
        now = self._clock()
        tree = self._trees.get(digest)
        if tree is None or now - tree.used > self._ttl:
            tree = Tree()
            tree.members[self.self_url] = Member(self.self_url, self.fanout, None)
            self._trees[digest] = tree
        tree.used = now
        self._trees.move_to_end(digest)
        self._expire(now)
        return tree

    def _expire(self, now: float) -> None:
        while len(self._trees) > self._max_digests:
            self._trees.popitem(last=False)
        while self._trees:
            digest, oldest = next(iter(self._trees.items()))
            if now - oldest.used <= self._ttl:
                break
            del self._trees[digest]
