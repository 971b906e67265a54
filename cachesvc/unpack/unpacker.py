"""Unpacked packages: a package extracted safely into ``<code_dir>/<hex>/``, once.

Layout of ``code_dir``: ``<hex>/`` is the tree, exactly the archive's
members; ``<hex>.json`` beside it is the manifest (files, bytes, layers);
``.tmp-*`` are work in progress or leftovers of a crash. Other names are
not ours (a lock file, say) and are left alone.

Guarantees:

* **Atomic.** Members are written into a ``.tmp-*`` directory inside
  ``code_dir`` which is renamed to ``<hex>`` as the last step; the manifest
  is written (atomically) just before that rename, so an existing ``<hex>/``
  always has its manifest. A refused or failed package leaves nothing behind.
  No fsync: a process crash is safe, an OS crash may leave short files.
* **Once.** Concurrent calls for one digest share one extraction (a task
  per digest, shielded from callers' cancellation); later calls read the
  manifest. Two processes racing on one ``code_dir`` both extract and one
  rename wins; the loser discards its copy.
* **Isolated.** Archives are parsed only in worker processes
  (:mod:`cachesvc.unpack.worker`: bounded in number, time, memory and CPU);
  this module's own disk work (temp dirs, manifests, renames, removals) runs
  on its own two threads. Nothing here runs on the default thread pool, so
  a hostile package can never starve store I/O or fills.
* **Safe paths and limits**: see :mod:`cachesvc.unpack.tree` (names, modes, bytes
  written) and :mod:`cachesvc.unpack.extract` (what archives may hold).
* **The disk is input too.** :meth:`Unpacker.sweep_temp` and every manifest
  read trust nothing they find: links are removed, never followed; a tree
  is kept only as a real 0755 directory with a regular, well-formed
  manifest of at most :data:`MANIFEST_MAX` bytes. Trees of any depth are
  removed iteratively (:func:`cachesvc.fsutil.remove_tree`).

This module does not peel compression (``codec`` does) nor decide when to
evict (the store does, and calls :meth:`Unpacker.remove`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar, TypeVarTuple

from cachesvc.digest import HEX, Digest
from cachesvc.fsutil import remove_tree
from cachesvc.readpath.package import Package
from cachesvc.store.blob import READ_FLAGS
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import Extracted
from cachesvc.unpack.worker import Budget, Workers

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
MANIFEST_SUFFIX = ".json"
MANIFEST_MAX = 64 * 1024
TREE_MODE = 0o755

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


class UnpackJSON(TypedDict):
    """The contract's body for an unpacked package, and its manifest."""

    digest: str
    path: str
    files: int
    bytes: int
    layers: list[str]


@dataclass(frozen=True)
class UnpackResult:
    """An unpacked package: where it is and what it holds."""

    digest: Digest
    path: Path
    files: int
    bytes: int
    layers: tuple[str, ...]

    def as_json(self) -> UnpackJSON:
        """The contract's body: ``{"digest", "path", "files", "bytes", "layers"}``."""
        return {
            "digest": str(self.digest),
            "path": str(self.path),
            "files": self.files,
            "bytes": self.bytes,
            "layers": list(self.layers),
        }


@dataclass(frozen=True)
class _Unpacking:
    """The extraction of a digest running now; callers join it."""

    task: asyncio.Task[UnpackResult]


@dataclass(frozen=True)
class _Removing:
    """The removal of a digest's tree running now; callers wait it out."""

    task: asyncio.Task[None]


_Flight = _Unpacking | _Removing


class Unpacker:
    """Unpacked trees under one ``code_dir``; see the module docstring for guarantees."""

    def __init__(
        self,
        code_dir: Path,
        limits: Limits | None = None,
        workers: int = 2,
        budget: Budget | None = None,
    ) -> None:
        self.code_dir = Path(code_dir)
        self.code_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.workers = Workers(workers, budget)
        self._flights: dict[Digest, _Flight] = {}
        self.disk = ThreadPoolExecutor(2, thread_name_prefix="cachesvc-unpack-disk")
        """This unpacker's own threads for its disk work (never the default pool)."""

    def path_for(self, digest: Digest) -> Path:
        """Where the package's tree lives once unpacked."""
        return self.code_dir / digest.hex

    async def start(self) -> None:
        """Start the workers' fork server now rather than on the first unpack."""
        await self.workers.start()

    async def __aenter__(self) -> Unpacker:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def unpack(self, digest: Digest, package: Path | Package) -> UnpackResult:
        """Unpack once and answer what is there; concurrent callers share the work.

        ``package`` is a path holding the verified bytes of ``digest``, or the
        :class:`~cachesvc.readpath.package.Package` being fetched: the worker then
        extracts while the bytes arrive, into a temp dir that becomes
        ``<hex>/`` only after the package's sha256 verdict (a bad one leaves
        nothing). A caller's cancellation does not cancel the shared extraction.
        """
        while (flight := self._flights.get(digest)) is not None:
            if isinstance(flight, _Unpacking):
                return await asyncio.shield(flight.task)
            await asyncio.wait([flight.task])
        source = Path(package) if isinstance(package, str) else package
        unpacking = _Unpacking(asyncio.ensure_future(self._unpack(digest, source)))
        self._start(digest, unpacking)
        return await asyncio.shield(unpacking.task)

    async def remove(self, digest: Digest) -> None:
        """Remove the tree and its manifest after any extraction in flight; no-op if absent."""
        while (flight := self._flights.get(digest)) is not None:
            await asyncio.wait([flight.task])
        removing = _Removing(asyncio.ensure_future(self._io(self._remove_sync, digest)))
        self._start(digest, removing)
        await asyncio.shield(removing.task)

    async def aclose(self) -> None:
        """Kill running workers, then wait for every extraction and removal in flight
        (their errors are dropped)."""
        await self.workers.aclose()
        tasks = [flight.task for flight in self._flights.values()]
        await asyncio.gather(*tasks, return_exceptions=True)
        self.disk.shutdown(wait=False)

    def sweep_temp(self) -> int:
        """Remove what is not a finished tree with its manifest; return how many entries.

        Temp leftovers of any depth, trees without a valid manifest, manifests
        without a tree, and digest-named links, files and fifos are logged and
        removed; links are never followed; names that are not ours are left
        alone. Never raises. Call at startup, before any :meth:`unpack` (it
        would remove work in progress). Blocking.
        """
        try:
            with os.scandir(self.code_dir) as entries:
                names = [entry.name for entry in entries]
        except OSError as exc:
            log.error("unpack: cannot list the code dir %s: %s", self.code_dir, exc)
            return 0
        removed = sum(self._sweep_temp_entry(name) for name in names)
        hexes = {hex_ for name in names if (hex_ := _digest_hex(name)) is not None}
        for hex_ in sorted(hexes):
            removed += self._sweep_digest(hex_)
        return removed

    def _sweep_temp_entry(self, name: str) -> int:
        if name.startswith(TEMP_PREFIX):
            log.warning("unpack: removing leftover %s", self.code_dir / name)
            return 1 if remove_tree(self.code_dir / name) else 0
        if _digest_hex(name) is None:
            log.info("unpack: leaving %s alone (not a name of ours)", self.code_dir / name)
        return 0

    def _sweep_digest(self, hex_: str) -> int:
        """Keep a valid tree with its manifest; remove whatever else wears the name."""
        digest = Digest.parse(hex_)
        try:
            if self._valid(digest) is not None:
                return 0
        except Exception:  # never let one entry stop a start
            log.exception("unpack: checking %s", self.path_for(digest))
        found = [p for p in (self.path_for(digest), self._manifest_path(digest)) if _exists(p)]
        log.warning("unpack: removing %s (no valid tree with its manifest)", found)
        self._remove_sync(digest)
        return len(found)

    def _start(self, digest: Digest, flight: _Flight) -> None:
        """Register ``flight`` as the digest's one flight until its task ends."""
        self._flights[digest] = flight

        def done(task: asyncio.Task[object]) -> None:
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            if not task.cancelled():
                task.exception()  # retrieved here: every caller may have gone

        flight.task.add_done_callback(done)

    async def _io(self, fn: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.disk, fn, *args)

    async def _unpack(self, digest: Digest, package: Path | Package) -> UnpackResult:
        existing = await self._io(self._existing, digest)
        if existing is not None:
            return existing
        tmp = await self._io(self._make_temp, digest)
        try:
            found = await self.workers.extract(package, tmp, self.limits)
            result = UnpackResult(digest, self.path_for(digest), *found)
            return await self._io(self._commit, tmp, result)
        except BaseException:
            await self._io(remove_tree, tmp)
            raise

    def _make_temp(self, digest: Digest) -> Path:
        prefix = f"{TEMP_PREFIX}{digest.hex[:16]}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.code_dir))

    def _commit(self, tmp: Path, result: UnpackResult) -> UnpackResult:
        """Write the manifest, then rename the temp tree into place; if another
        process won the rename, keep theirs."""
        self._write_manifest(result)
        os.chmod(tmp, TREE_MODE)
        try:
            os.rename(tmp, result.path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            remove_tree(tmp)
        return result

    def _existing(self, digest: Digest) -> UnpackResult | None:
        """The manifest of an unpacked tree; anything else with its name is removed."""
        if not _exists(self.path_for(digest)):
            return None
        result = self._valid(digest)
        if result is None:
            log.warning("unpack: %s has no valid manifest: extracting again", digest.short)
            self._remove_sync(digest)
        return result

    def _valid(self, digest: Digest) -> UnpackResult | None:
        """The result recorded for a real 0755 tree and its well-formed manifest, else None."""
        try:
            tree = os.lstat(self.path_for(digest))
            data = json.loads(_read_regular(self._manifest_path(digest), MANIFEST_MAX))
        except (OSError, ValueError, RecursionError):  # RecursionError: [[[[... nested JSON
            return None
        if not stat.S_ISDIR(tree.st_mode) or stat.S_IMODE(tree.st_mode) != TREE_MODE:
            return None
        return _result_of(digest, self.path_for(digest), data)

    def _manifest_path(self, digest: Digest) -> Path:
        return self.code_dir / (digest.hex + MANIFEST_SUFFIX)

    def _write_manifest(self, result: UnpackResult) -> None:
        body = json.dumps(result.as_json()).encode()
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=MANIFEST_SUFFIX, dir=self.code_dir)
        with open(fd, "wb") as out:
            out.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self._manifest_path(result.digest))

    def _remove_sync(self, digest: Digest) -> None:
        """Remove the tree (renamed aside first, so it vanishes at once) and the manifest."""
        trash = self.code_dir / f"{TEMP_PREFIX}rm-{digest.hex[:16]}-{os.urandom(4).hex()}"
        try:
            os.rename(self.path_for(digest), trash)
        except FileNotFoundError:
            trash = self.path_for(digest)  # nothing to rename; still try the manifest
        except OSError as exc:
            log.error("unpack: cannot move %s aside: %s", self.path_for(digest), exc)
            trash = self.path_for(digest)
        remove_tree(trash)
        remove_tree(self._manifest_path(digest))


def _digest_hex(name: str) -> str | None:
    """The hex of a code-dir name of ours, ``<hex>`` or ``<hex>.json``; else None."""
    hex_ = name.removesuffix(MANIFEST_SUFFIX)
    return hex_ if HEX.fullmatch(hex_) else None


def _exists(path: Path) -> bool:
    """True when anything (a link included, never followed) has this name."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``OSError`` or
    ``ValueError`` for a link, a fifo, a directory or anything larger."""
    fd = os.open(path, READ_FLAGS)
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise ValueError(f"{path} is not a regular file of at most {limit} bytes")
        return file.read(limit + 1)[:limit]


def _result_of(digest: Digest, path: Path, data: object) -> UnpackResult | None:
    """The result a manifest records, if it is one for ``digest``."""
    if not isinstance(data, dict) or data.get("digest") != str(digest):
        return None
    found = Extracted.from_json(data)
    return None if found is None else UnpackResult(digest, path, *found)
