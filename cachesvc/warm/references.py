"""The tenant reference index: what the origin's ``tenants/<tenant>/<function>/<version>.json``
references say, in memory. Fetches no package.

* :meth:`ReferenceIndex.lookup` and :meth:`ReferenceIndex.current` do no I/O
  and never await: safe on the request path. A function's current package is
  its highest version in natural order (``v10`` after ``v9``); there is no
  ``current.json``: publishing a higher version is what moves traffic.
* A well-formed key is read at most once while it stays listed (versions are
  immutable); a key gone from a listing is forgotten; a malformed one is read
  again next listing; at most :data:`MAX_REFERENCES` held, reads
  :data:`READ_CONCURRENCY` at a time. Bad or vanished references are skipped
  with a warning, never fatal.

Use from the event loop only.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, NotFound
from cachesvc.publish.upload import NAME
from cachesvc.upstream.origin import Origin, read_reference

log = logging.getLogger(__name__)

MAX_REFERENCES = 100_000
READ_CONCURRENCY = 8
READ_BATCH = 256  # reads scheduled at once (each waits for one of READ_CONCURRENCY slots)
LISTING_TTL = 30.0  # seconds a function's listing is trusted for "current"
_KEY = re.compile(r"tenants/([^/]+)/([^/]+)/([^/]+)\.json")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Reference:
    """One published version of one function."""

    tenant: str
    function: str
    version: str
    digest: Digest
    size: int
    layers: tuple[Digest, ...] = ()
    calls: tuple[str, ...] = ()

    @property
    def digests(self) -> list[Digest]:
        """The package, then its layers: what travels with this version."""
        return [self.digest, *self.layers]


def natural_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key for versions: digit runs as numbers, everything else as text."""
    parts = _DIGITS.split(version)
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def parse_key(key: str) -> tuple[str, str, str] | None:
    """``tenants/T/F/V.json`` → (T, F, V); None for keys of any other shape."""
    m = _KEY.fullmatch(key)
    if m is None or not all(NAME.fullmatch(part) for part in m.groups()):
        return None
    return m[1], m[2], m[3]


def _reference(key: str, text: str) -> Reference:
    names = parse_key(key)
    assert names is not None
    ref = read_reference(text, key)
    return Reference(
        *names,
        digest=Digest.parse(ref["digest"]),
        size=int(ref.get("size", 0)),
        layers=tuple(Digest.parse(d) for d in ref.get("layers") or ()),
        calls=tuple(c for c in ref.get("calls") or () if NAME.fullmatch(str(c))),
    )


class ReferenceIndex:
    """References read from one origin. Use from the event loop only."""

    def __init__(
        self,
        origin: Origin,
        clock: Callable[[], float] = time.monotonic,
        max_references: int = MAX_REFERENCES,
        listing_ttl: float = LISTING_TTL,
    ) -> None:
        self._origin = origin
        self._clock = clock
        self._max = max_references
        self._ttl = listing_ttl
        self._by_key: dict[str, Reference] = {}
        self._by_hex: dict[str, Reference] = {}
        self._versions: dict[tuple[str, str], dict[str, Reference]] = {}
        self._listed: dict[tuple[str, str], float] = {}  # (tenant, function) -> when
        self._reads = asyncio.Semaphore(READ_CONCURRENCY)
        self.on_change: list[Callable[[int], None]] = []

    def __len__(self) -> int:
        return len(self._by_key)

    # -- the request path: no I/O ------------------------------------------------

    def lookup(self, hex_digest: str) -> Reference | None:
        """The reference a package digest (bare hex) was published as, if known."""
        return self._by_hex.get(hex_digest)

    def current(self, tenant: str, function: str) -> Reference | None:
        """The highest version (natural order) of a function, from memory."""
        versions = self._versions.get((tenant, function), {})
        return max(versions.values(), key=lambda r: natural_key(r.version), default=None)

    # -- refreshing from the origin -------------------------------------------------

    async def tenant(self, tenant: str) -> list[Reference]:
        """Every reference of a tenant, listed now; [] when it has none."""
        prefix = f"tenants/{tenant}/"
        return await self._refresh(prefix)

    async def function(self, tenant: str, function: str) -> Reference | None:
        """The current version of a function, re-listing it when the last
        listing is older than the listing TTL (one LIST; off the request path)."""
        listed = self._listed.get((tenant, function))
        if listed is None or self._clock() - listed > self._ttl:
            await self._refresh(f"tenants/{tenant}/{function}/")
            self._listed[(tenant, function)] = self._clock()
        return self.current(tenant, function)

    async def refresh_all(self) -> int:
        """List the whole ``tenants/`` tree and read new references; returns how
        many references are known afterwards."""
        await self._refresh("tenants/")
        return len(self._by_key)

    async def _refresh(self, prefix: str) -> list[Reference]:
        listed = {k: names for k in await self._origin.list_keys(prefix) if (names := parse_key(k))}
        self._forget(prefix, set(listed))
        new = [k for k in listed if k not in self._by_key]
        room = max(0, self._max - len(self._by_key))
        if len(new) > room:
            log.warning("references: %d new under %s, room for %d", len(new), prefix, room)
            new = new[:room]
        for start in range(0, len(new), READ_BATCH):  # bounded task count, not just concurrency
            refs = await asyncio.gather(*(self._read(k) for k in new[start : start + READ_BATCH]))
            self._learn(r for r in refs if r is not None)
        now = self._clock()
        for tenant, function, _ in listed.values():
            self._listed[(tenant, function)] = now
        return [self._by_key[k] for k in listed if k in self._by_key]

    async def _read(self, key: str) -> Reference | None:
        async with self._reads:
            try:
                return _reference(key, await self._origin.read_text(key))
            except NotFound:
                return None  # removed between LIST and GET
            except CachesvcError as exc:
                log.warning("references: skipping %s: %s", key, exc)
                return None

    def _learn(self, refs: Iterable[Reference]) -> None:
        for ref in refs:
            key = f"tenants/{ref.tenant}/{ref.function}/{ref.version}.json"
            self._by_key[key] = ref
            self._by_hex[ref.digest.hex] = ref
            self._versions.setdefault((ref.tenant, ref.function), {})[ref.version] = ref
        self._changed()

    def _forget(self, prefix: str, listed: set[str]) -> None:
        gone = [k for k in self._by_key if k.startswith(prefix) and k not in listed]
        for key in gone:
            ref = self._by_key.pop(key)
            if self._by_hex.get(ref.digest.hex) is ref:
                del self._by_hex[ref.digest.hex]
            versions = self._versions.get((ref.tenant, ref.function), {})
            versions.pop(ref.version, None)
            if not versions:
                self._versions.pop((ref.tenant, ref.function), None)
        if gone:
            self._changed()

    def _changed(self) -> None:
        for callback in self.on_change:
            callback(len(self._by_key))
