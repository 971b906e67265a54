"""The consistent-hash ring of L2 peers (uhashring: md5, 160 vnodes, the same
owner in every process), with down-marking. No network, no membership (that
is :mod:`cachesvc.upstream.membership`).

* :meth:`Ring.owners` is the try order: the owner, then exactly the peers
  that would own the digest if the ones before left.
* Peers that failed in the last :data:`DOWN_FOR` s move to the end, never
  out. Rejected: skipping them. An origin blip makes every peer answer 502,
  and skipping would send every agent to the origin (one GET per agent, not
  per AZ); README "How a request is answered", step 5.
* Peers that sent wrong bytes are left out for :data:`DOWN_FOR` s, so the
  refill goes elsewhere.
* :meth:`Ring.set_nodes` moves only the keys it must. The clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from uhashring import HashRing

from cachesvc.digest import Digest

DOWN_FOR = 10.0  # seconds a failed peer is tried after the others, a refused one not at all


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
        self._refused_until: dict[str, float] = {}
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
            self.mark_up(gone)
        for new in set(wanted) - set(self.nodes):
            self._ring.add_node(new, {"vnodes": self._vnodes})
        self.nodes = wanted
        return True

    def owner(self, digest: Digest) -> str | None:
        return self._ring.get_node(digest.hex) if self.nodes else None

    def owners(self, digest: Digest) -> list[str]:
        """The peers in try order: ring order, the peers marked down moved last
        (in ring order among themselves), the peers refused left out."""
        if not self.nodes:
            return []
        order = [n["nodename"] for n in self._ring.range(digest.hex, size=len(self.nodes))]
        now = self._clock()
        trusted = [n for n in order if self._refused_until.get(n, 0.0) <= now]
        return sorted(trusted, key=self.is_down)  # stable: ring order within up and within down

    def mark_down(self, node: str) -> None:
        """It failed (no connection, an error status, a stall): try it last."""
        self._down_until[node] = self._clock() + self._down_for

    def mark_refused(self, node: str) -> None:
        """It sent bytes that did not match their digest: do not offer it."""
        self._refused_until[node] = self._clock() + self._down_for

    def mark_up(self, node: str) -> None:
        self._down_until.pop(node, None)
        self._refused_until.pop(node, None)

    def is_down(self, node: str) -> bool:
        """Marked down or refused, and its time is not up."""
        now = self._clock()
        return max(self._down_until.get(node, 0.0), self._refused_until.get(node, 0.0)) > now
