"""Fan-out: agents that hold or are filling a package feed other agents.

The owner peer of a digest is its tracker (:mod:`cachesvc.fanout.tracker`). The
pieces here, one per side:

* **Asking** (agent): :class:`FanoutSource` is the owner in the agent's walk.
  It asks the owner with this agent's ``--advertise`` URL, ``--fanout`` and
  avoid list; the owner serves the bytes itself or answers ``307`` naming a
  parent host; the agent then GETs ``/pkg/<digest>`` from that host (peer
  token, forwarded mark). A parent that refuses, dies, stalls or lies is
  avoided (:class:`Avoided`, for a while, by every fill of this agent), and
  the walk asks the owner again, resuming at the byte it reached.
* **Deciding** (peer): :func:`parent_for` turns a request's fan-out headers
  into the tracker's choice.
* **Feeding** (agent): :class:`Feeds` caps the hosts this host feeds one
  package at once at ``--fanout``; :func:`check_requester` refuses a host this
  one is itself fetching the package through (two owners that disagree about
  the ring could otherwise make two agents wait for each other).

Every hop verifies: bytes from another agent go through the same ingest as
bytes from a peer; this module only chooses who sends them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, FanoutBusy, LoopRefused, PeerFailed
from cachesvc.fanout.tracker import Tracker
from cachesvc.tier import Tier, Upstream
from cachesvc.upstream.membership import parse_base_url
from cachesvc.upstream.peer_client import PARENT, PeerClient, Redirect
from cachesvc.upstream.ring import Ring
from cachesvc.upstream.source import Body

log = logging.getLogger(__name__)

ADVERTISE = "X-Cachesvc-Advertise"  # the requester's URL, for other hosts to reach it
FANOUT = "X-Cachesvc-Fanout"  # the requester's --fanout; its presence means "redirects ok"
AVOID = "X-Cachesvc-Avoid"  # hosts the requester found failing, comma-separated

DEFAULT_FANOUT = 2
MAX_FANOUT = 64
MAX_AVOID = 32
MAX_PARENTS = 4  # parents one fill tries before it asks the owner to serve it itself
AVOID_FOR = 60.0  # seconds a failed host is avoided


class Avoided:
    """Hosts this service recently found failing (dead, stalled, lying),
    avoided by every fill for ``AVOID_FOR`` seconds; bounded, clock injected."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()

    def add(self, host: str) -> None:
        self._until[host] = self._clock() + AVOID_FOR
        self._until.move_to_end(host)
        while len(self._until) > MAX_AVOID:
            self._until.popitem(last=False)

    def hosts(self) -> list[str]:
        now = self._clock()
        for host in [h for h, until in self._until.items() if until <= now]:
            del self._until[host]
        return list(self._until)


@dataclass
class FanoutSource:
    """The owner peer, asked as a tracker; see the module docstring."""

    client: PeerClient
    ring: Ring
    name: str  # the owner peer's URL
    me: str | None  # this agent's --advertise URL
    fanout: int
    avoided: Avoided
    tier: Tier = Tier.L2  # bytes from a parent agent too: the AZ's tier
    serving: str = ""  # who sends the bytes now: the owner or a parent host
    senders: set[str] = field(default_factory=set)  # parents that sent bytes in this fill
    _parents: int = field(default=0)

    @property
    def upstream(self) -> Upstream:
        return Upstream.AGENT if self.serving not in ("", self.name) else Upstream.PEER

    @asynccontextmanager
    async def open(self, digest: Digest, offset: int) -> AsyncIterator[Body]:
        async with AsyncExitStack() as stack:
            yield await self._connect(stack, digest, offset)

    async def _connect(self, stack: AsyncExitStack, digest: Digest, offset: int) -> Body:
        """Headers from the owner, or from the parent it names. A parent that
        fails before its headers is avoided and the owner asked again; after
        :data:`MAX_PARENTS` failed parents the owner is asked to serve itself
        (never the origin: that would be a second origin GET)."""
        while True:
            try:
                self.serving = self.name
                headers = self._headers(redirects=self._parents < MAX_PARENTS)
                return await stack.enter_async_context(
                    self.client.open(self.name, digest, offset, headers)
                )
            except Redirect as redirect:
                parent = _host_url(redirect.host)
            try:
                self.serving = parent
                body = await stack.enter_async_context(
                    self.client.open_host(parent, digest, offset, self._headers())
                )
            except PeerFailed as exc:
                self._parent_failed(parent, exc)
                continue
            self.senders.add(parent)
            return body

    async def head(self, digest: Digest) -> int:
        return await self.client.head(self.name, digest)

    def retry(self, exc: CachesvcError) -> bool:
        """After a failure mid-body: ask the owner again (avoiding the parent)
        when a parent host failed, while this fill has parents left to try."""
        if self.upstream is not Upstream.AGENT:
            return False
        self._parent_failed(self.serving, exc)
        return True  # bounded: past MAX_PARENTS the owner serves, and cannot redirect

    def failed(self) -> None:
        if self.upstream is Upstream.AGENT:
            self.avoided.add(self.serving)
        else:
            self.ring.mark_down(self.name)

    def refused(self) -> None:
        """Wrong bytes: blame the parents that sent any (their bytes were relayed,
        so any of them may be the liar); the owner only when it sent them all."""
        for parent in self.senders:
            self.avoided.add(parent)
        if not self.senders:
            self.ring.mark_refused(self.name)

    def succeeded(self) -> None:
        self.ring.mark_up(self.name)

    def _parent_failed(self, parent: str, exc: CachesvcError) -> None:
        log.warning("fan-out: parent %s failed: %s; asking %s again", parent, exc, self.name)
        self.avoided.add(parent)
        self._parents += 1

    def _headers(self, redirects: bool = True) -> dict[str, str]:
        """This agent's fan-out headers; without ``redirects`` the owner serves."""
        if not redirects:
            return {}
        headers = {FANOUT: str(self.fanout if self.me else 0)}
        if self.me:
            headers[ADVERTISE] = self.me
        avoid = self.avoided.hosts()
        if avoid:
            headers[AVOID] = ",".join(avoid)
        return headers


def parent_for(
    headers: Mapping[str, str], method: str, tracker: Tracker, digest: Digest
) -> str | None:
    """The host a requester that speaks fan-out should fetch from, or None
    for "serve it here" (requests without fan-out headers always are)."""
    if FANOUT not in headers or method != "GET":
        return None
    fanout = _bounded_int(headers[FANOUT], MAX_FANOUT)
    requester = _optional_url(headers.get(ADVERTISE))
    avoid = [
        url
        for part in headers.get(AVOID, "").split(",")[:MAX_AVOID]
        if (url := _optional_url(part)) is not None
    ]
    return tracker.assign(digest, requester, fanout, avoid)


def redirect(parent: str, digest: Digest) -> web.Response:
    """The owner's answer naming a parent: 307 to its ``/pkg`` URL."""
    headers = redirect_headers(parent, digest)
    return web.json_response({"parent": parent}, status=307, headers=headers)


def redirect_headers(parent: str, digest: Digest) -> dict[str, str]:
    return {"Location": f"{parent}/pkg/{digest}", PARENT: parent}


class Feeds:
    """How many hosts this host feeds each package to right now, capped at
    ``--fanout``; one ``with feeds.slot(digest):`` per downstream transfer."""

    def __init__(self, fanout: int) -> None:
        self.fanout = fanout
        self._active: Counter[Digest] = Counter()

    @contextmanager
    def slot(self, digest: Digest) -> Iterator[None]:
        if self._active[digest] >= self.fanout:
            raise FanoutBusy(f"already feeding {self.fanout} hosts {digest.short}")
        self._active[digest] += 1
        try:
            yield
        finally:
            self._active[digest] -= 1
            if self._active[digest] <= 0:
                del self._active[digest]


def check_requester(request: web.Request, via: tuple[str, ...], me: str | None) -> None:
    """Refuse a host this one fetches the package through (a wait cycle)."""
    requester = _optional_url(request.headers.get(ADVERTISE))
    if requester is not None and (requester in via or requester == me):
        raise LoopRefused(f"{requester} is upstream of this host for this package")


def _host_url(text: str) -> str:
    url = _optional_url(text)
    if url is None:
        raise PeerFailed(f"fan-out: the owner named a malformed parent {text[:100]!r}")
    return url


def _optional_url(text: str | None) -> str | None:
    """An ``http(s)://host:port`` base URL, normalised; None if malformed."""
    if not text:
        return None
    try:
        return parse_base_url(text)
    except ValueError:
        return None


def _bounded_int(text: str, high: int) -> int:
    try:
        return max(0, min(int(text), high))
    except ValueError:
        return 0
