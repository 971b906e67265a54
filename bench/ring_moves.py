"""How many digests change L2 owner when a peer joins or leaves the ring.

Command (from the repository root; deterministic, ~2 s, no network)::

    .venv/bin/python bench/ring_moves.py [--keys 100000]

Builds the real :class:`cachesvc.upstream.ring.Ring` (uhashring, md5, 160 vnodes per
peer) for the peer URLs the deployments use (the Kubernetes base advertises pod
IPs, compose uses service names), and for ``--keys`` digests (sha256 of
``0``, ``1``, ...) compares the owner before and after each change: a peer
joins (3 → 4), leaves (4 → 3), or is replaced by a new name (a rescheduled pod
with a new IP). Prints one Markdown row per change: the share of digests whose
owner changed, the share consistent hashing moves on average (1/N of the
larger ring; for a replacement, a leave plus a join, 2/N - 1/N^2: the digests
the old name owned or the new one owns), and whether every move was one
consistent hashing allows: to a joining peer, or from a leaving peer to the
next peer in that digest's ``owners()`` order. ``deploy/README.md`` quotes
these rows; ``tests/test_docs.py`` recomputes them and fails if the quote and
the ring disagree.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cachesvc.digest import Digest  # noqa: E402
from cachesvc.upstream.ring import Ring  # noqa: E402

KEYS = 100_000
# Peer URLs as the deployments name them: pod IPs behind the headless Service
# (deploy/k8s), service names in deploy/docker-compose.yml.
NAMINGS = {
    "k8s pod IPs": [f"http://10.244.{i + 1}.7:8701" for i in range(4)],
    "compose names": [f"http://peer-{i}:8701" for i in range(4)],
}


@dataclass(frozen=True)
class Moves:
    """One ring change measured over ``keys`` digests."""

    naming: str
    change: str  # "3 → 4", "4 → 3", "1 of 4 renamed"
    ideal: float  # the share consistent hashing moves
    keys: int
    moved: int
    only_allowed: bool  # every move was to a joining peer or from a leaving one

    @property
    def share(self) -> float:
        return self.moved / self.keys

    def row(self) -> str:
        check = "yes" if self.only_allowed else "**no**"
        return (
            f"| {self.naming} | {self.change} | {self.moved:,} of {self.keys:,}"
            f" ({self.share:.1%}) | {self.ideal:.1%} | {check} |"
        )


def digests(n: int) -> list[Digest]:
    return [Digest(hashlib.sha256(str(i).encode()).hexdigest()) for i in range(n)]


def measure(naming: str, before: list[str], after: list[str], keys: list[Digest]) -> Moves:
    """Owners of ``keys`` on both rings; checks each move is one consistent
    hashing allows."""
    old, new = Ring(before), Ring(after)
    joined, left = set(after) - set(before), set(before) - set(after)
    moved = allowed = 0
    for digest in keys:
        was, now = old.owner(digest), new.owner(digest)
        if was != now:
            moved += 1
            successor = next(n for n in old.owners(digest) if n not in left)
            allowed += now in joined or (was in left and now == successor)
    if len(before) == len(after):
        change, ideal = f"1 of {len(after)} renamed", 2 / len(after) - 1 / len(after) ** 2
    else:
        change, ideal = f"{len(before)} → {len(after)}", 1 / max(len(before), len(after))
    return Moves(naming, change, ideal, len(keys), moved, moved == allowed)


def all_moves(n: int = KEYS) -> list[Moves]:
    """For every naming, over ``n`` digests: 3 → 4, 4 → 3, and one of 4 peers
    replaced by a new name."""
    keys = digests(n)
    rows = []
    for naming, peers in NAMINGS.items():
        renamed = [*peers[:3], peers[3].replace(":8701", "0:8701")]  # a new address
        rows.append(measure(naming, peers[:3], peers, keys))
        rows.append(measure(naming, peers, peers[:3], keys))
        rows.append(measure(naming, peers, renamed, keys))
    return rows


HEAD = (
    "| peer URLs | change | digests whose owner changed | expected share"
    " | every move allowed |\n"
    "|---|---|---|---|---|"
)


def table(rows: list[Moves]) -> str:
    return "\n".join([HEAD, *(m.row() for m in rows)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=KEYS, help="digests to place (default 100000)")
    args = parser.parse_args()
    print(table(all_moves(args.keys)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
