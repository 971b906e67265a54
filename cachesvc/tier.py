"""The nouns of the read path every layer shares: :class:`Tier` (``X-Cache-Tier``),
:class:`Upstream` (who sends a fill its bytes) and :class:`Role` (agent or peer).

``Tier`` and ``Upstream`` are ``StrEnum`` s whose values are the contract's
strings: ``str()``, f-strings, ``json`` and metric labels give the wire text.
Bytes fed by another agent are ``L2`` (the AZ's tier); only
:attr:`Upstream.AGENT` tells them from a peer's.
"""

from __future__ import annotations

from enum import Enum, StrEnum


class Tier(StrEnum):
    """``X-Cache-Tier``: where the bytes of a response came from."""

    L1 = "L1"  # this host's own cache (agents)
    L2 = "L2"  # the AZ's tier: an L2 peer, or another agent by fan-out
    ORIGIN = "ORIGIN"  # the origin, directly: no peer could


class Upstream(StrEnum):
    """Who sends a fill its bytes right now: the ``upstream`` label of
    ``cachesvc_upstream_fetches_total``."""

    PEER = "peer"
    AGENT = "agent"  # another agent, by fan-out
    ORIGIN = "origin"


class Role(Enum):
    """What a service is: a node agent (L1), or an L2 peer.

    An agent's fills walk the ring's owners, then the origin; a peer's read the
    origin only (it never forwards), and a peer warms only the digests it owns.
    """

    AGENT = "agent"
    PEER = "peer"

    @property
    def local_tier(self) -> Tier:
        """The tier of what this service serves from its own store."""
        return Tier.L1 if self is Role.AGENT else Tier.L2
