"""The consistent-hash ring of L2 peers, with down-marking.

:meth:`Ring.owners` gives, for a digest, every peer in the order to try: the
owner first, then exactly the peers that would own it if the ones before left
(uhashring, md5, 160 vnodes per node: deterministic across processes, so every
agent and peer computes the same owner). Peers recently marked down move to the
end of that order instead of disappearing, so the list is never empty while the
ring has nodes, and a whole-tier outage still tries someone.

Ring changes (:meth:`Ring.set_nodes`) move only the keys they must: consistent
hashing. The clock is injected so tests never sleep for a TTL. No network here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from uhashring import HashRing

from cachesvc.digest import Digest

DOWN_FOR = 10.0  # seconds a failed peer is skipped


class Ring:
    def __init__(
        self,
        nodes: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        down_for: float = DOWN_FOR,
        vnodes: int = 160,
    ) -> None:
        self._clock = clock
        self._down_for = down_for
        self._vnodes = vnodes
        self._down_until: dict[str, float] = {}
        self._ring = HashRing(nodes=[], vnodes=vnodes)
        self.nodes: tuple[str, ...] = ()
        self.set_nodes(nodes)

    def set_nodes(self, nodes: Iterable[str]) -> bool:
        """Replace the membership; returns whether it changed."""
        wanted = tuple(sorted(set(nodes)))
        if wanted == self.nodes:
            return False
        for gone in set(self.nodes) - set(wanted):
            self._ring.remove_node(gone)
            self._down_until.pop(gone, None)
        for new in set(wanted) - set(self.nodes):
            self._ring.add_node(new, {"vnodes": self._vnodes})
        self.nodes = wanted
        return True

    def owner(self, digest: Digest) -> str | None:
        return self._ring.get_node(digest.hex) if self.nodes else None

    def owners(self, digest: Digest) -> list[str]:
        """All peers in try order: ring order, with peers marked down moved last."""
        if not self.nodes:
            return []
        order = [n["nodename"] for n in self._ring.range(digest.hex, size=len(self.nodes))]
        now = self._clock()
        up = [n for n in order if self._down_until.get(n, 0.0) <= now]
        return up + [n for n in order if n not in up]

    def up_owners(self, digest: Digest) -> list[str]:
        """Like :meth:`owners`, without the peers marked down."""
        return [n for n in self.owners(digest) if not self.is_down(n)]

    def mark_down(self, node: str) -> None:
        self._down_until[node] = self._clock() + self._down_for

    def mark_up(self, node: str) -> None:
        self._down_until.pop(node, None)

    def is_down(self, node: str) -> bool:
        return self._down_until.get(node, 0.0) > self._clock()
