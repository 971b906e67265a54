"""Bytecode made once per host: unpacked trees compiled for this host's runtimes.

Public API::

    HostCompiler(code_dir, runtimes, budget, on_report=None)
        .schedule(digest, tree, hints=())   # after an unpack answered; never waits
        .status(digest) -> dict             # what the job did (the agent's route)
        await .wait(digest)                 # until its job ended (tests, benchmarks)
        .cancel(digest)                     # cancel its job (the package is evicted)
        await .aclose()
    plan(root, runtimes, hints) -> list of phases, each {runtime name: [sources]}
    check_module(name) -> str               # a hint, or ValueError

How: for each phase (first the sources of the hinted modules, the modules a
start imports; then the rest), a linked copy of the served tree is made
beside it (:func:`cachesvc.unpack.swap.link_tree`), each runtime compiles its
missing pycs into the copy (:func:`cachesvc.unpack.bytecode.compile_files`),
and the copy is exchanged with the served tree
(:func:`cachesvc.unpack.swap.exchange`); the old one is then removed.

Guarantees:

* **The first start never waits.** A job starts after the unpack answered
  and runs one phase at a time for the whole host, at nice 19: a start
  running beside it keeps its CPU. (Measured: the hinted phase at nice 10 took
  CPU from the first start on a busy host; at 19 it waits for a free core.)
* **Never half-compiled, never disturbed.** A served tree changes only by an
  exchange with a complete copy: a phase's pycs appear all at once; sources
  are the same inodes, so a runtime reading the old tree reads the same bytes.
* **Only what the package lacks.** A source that already has a pyc for a
  runtime's cache tag (published bytecode) is left alone; package files are
  never replaced. The pycs are unchecked-hash, of the source bytes in the
  tree, which never change.
* **Trusted by this host alone.** Pycs live only in this host's code dir;
  the agent serves packages, never trees, so they never reach another host.
* **Bounded.** Hostile sources are skipped and counted (see
  :mod:`cachesvc.unpack.bytecode`). This module's disk work runs on its own
  thread, never the default pool. A job cancelled (eviction, shutdown) kills
  its child and removes its copy; leftovers of a crash are ``.tmp-*`` names
  the unpacker's sweep removes at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cachesvc.digest import Digest
from cachesvc.fsutil import remove_tree
from cachesvc.unpack.bytecode import CompileBudget, CompileReport, Runtime, compile_files
from cachesvc.unpack.swap import exchange, link_tree

log = logging.getLogger(__name__)

BACKGROUND_NICE = 19
"""Every host compile's nice value: it only uses CPU that starts leave free."""
MAX_HINTS = 64
SHOWN_SKIPS = 10
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,15}")
SHADOW_PREFIX = ".tmp-bc-"
"""Copies being compiled: ``.tmp-*``, so the unpacker's start-up sweep removes leftovers."""

Phase = dict[str, list[str]]


def check_module(name: str) -> str:
    """``name`` when it is a dotted module name (``pandas``, ``a.b_c``), else ValueError."""
    if not _MODULE.fullmatch(name):
        raise ValueError(f"not a module name: {name[:100]!r}")
    return name


def plan(root: Path, runtimes: Sequence[Runtime], hints: Sequence[str]) -> list[Phase]:
    """The phases of a tree's compile: with hints, the hinted modules' sources (a
    package's whole directory, and its parents' ``__init__.py``), then the rest;
    per runtime, only the sources without its pyc. Blocking."""
    sources = _sources(root)
    wanted = _hint_matcher(hints)
    groups = [[s for s in sources if wanted(s)], [s for s in sources if not wanted(s)]]
    if not hints:
        groups = [sources]
    return [{rt.name: [s for s in group if not _exists(root / rt.pyc_of(s))] for rt in runtimes}
            for group in groups]  # fmt: skip


def _sources(root: Path) -> list[str]:
    """Every regular ``*.py`` file under ``root`` (not in ``__pycache__``), sorted."""
    found: list[str] = []
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(os.path.join(root, rel)) as entries:
            for entry in entries:
                sub = f"{rel}/{entry.name}" if rel else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode) and entry.name != "__pycache__":
                    todo.append(sub)
                elif stat.S_ISREG(mode) and entry.name.endswith(".py"):
                    found.append(sub)
    return sorted(found)


def _hint_matcher(hints: Sequence[str]) -> Callable[[str], bool]:
    exact: set[str] = set()
    prefixes: list[str] = []
    for hint in hints:
        parts = hint.split(".")
        exact.update("/".join(parts[:n]) + "/__init__.py" for n in range(1, len(parts)))
        exact.add("/".join(parts) + ".py")
        prefixes.append("/".join(parts) + "/")
    return lambda rel: rel in exact or rel.startswith(tuple(prefixes))


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    return True


@dataclass
class _Job:
    tree: Path
    hints: tuple[str, ...]
    state: str = "queued"  # queued, compiling, done, failed, cancelled, gone
    swaps: int = 0
    reports: dict[str, CompileReport] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None


class HostCompiler:
    """Background compiles of unpacked trees for this host's runtimes; see the module
    docstring for guarantees."""

    def __init__(
        self,
        code_dir: Path,
        runtimes: Sequence[Runtime],
        budget: CompileBudget | None = None,
        on_report: Callable[[Runtime, CompileReport], None] | None = None,
    ) -> None:
        self.code_dir = Path(code_dir)
        self.runtimes = tuple(runtimes)
        self.budget = budget or CompileBudget()
        self._on_report = on_report
        self._jobs: dict[Digest, _Job] = {}
        self._ending: set[asyncio.Task[None]] = set()
        self._slot = asyncio.Semaphore(1)
        self._disk = ThreadPoolExecutor(
            1, thread_name_prefix="cachesvc-bytecode-disk", initializer=_background_thread
        )

    def schedule(self, digest: Digest, tree: Path, hints: Sequence[str] = ()) -> None:
        """Start compiling ``tree`` in the background unless a job for ``digest`` is
        queued, running or done in this process. Never waits."""
        job = self._jobs.get(digest)
        if job is not None and job.state not in ("failed", "cancelled", "gone"):
            return
        job = self._jobs[digest] = _Job(Path(tree), tuple(hints))
        job.task = asyncio.get_running_loop().create_task(self._run(digest, job))

    def status(self, digest: Digest) -> dict[str, Any]:
        """The job's state (``none`` without one) and, per runtime, what it did."""
        job = self._jobs.get(digest)
        body: dict[str, Any] = {"digest": str(digest), "state": "none", "runtimes": {}}
        if job is None:
            return body
        body.update(state=job.state, swaps=job.swaps, hints=list(job.hints))
        for rt in self.runtimes:
            report = job.reports.get(rt.name, CompileReport())
            body["runtimes"][rt.name] = {
                "cache_tag": rt.cache_tag,
                "compiled": report.compiled,
                "skipped": report.skipped,
                "skips": [list(s) for s in report.skips[:SHOWN_SKIPS]],
                "seconds": round(report.seconds, 3),
            }
        return body

    async def wait(self, digest: Digest) -> None:
        """Until the job for ``digest`` (if any) has ended, however it ended."""
        job = self._jobs.get(digest)
        if job is not None and job.task is not None:
            await asyncio.wait([job.task])

    def cancel(self, digest: Digest) -> None:
        """Cancel the job for ``digest`` and drop its record; its child is killed and
        its copy removed as the job unwinds (:meth:`aclose` waits for that)."""
        job = self._jobs.pop(digest, None)
        if job is not None and job.task is not None:
            job.task.cancel()
            self._ending.add(job.task)
            job.task.add_done_callback(self._ending.discard)

    async def aclose(self) -> None:
        """Cancel every job and wait for them to clean up."""
        for digest in list(self._jobs):
            self.cancel(digest)
        if self._ending:
            await asyncio.wait(list(self._ending))
        self._disk.shutdown(wait=False)

    async def _run(self, digest: Digest, job: _Job) -> None:
        try:
            phases = await self._io(plan, job.tree, self.runtimes, job.hints)
            for phase in phases:
                async with self._slot:
                    job.state = "compiling"
                    await self._phase(job, phase, replace(self.budget, nice=BACKGROUND_NICE))
            job.state = "done"
        except asyncio.CancelledError:
            job.state = "cancelled"
            raise
        except FileNotFoundError:  # the tree was evicted meanwhile: nothing to compile
            job.state = "gone"
        except Exception:
            job.state = "failed"
            log.exception("bytecode: compiling %s failed", digest.short)

    async def _phase(self, job: _Job, phase: Phase, budget: CompileBudget) -> None:
        """Compile one phase into a linked copy, then exchange it with the served tree."""
        if not any(phase.values()):
            return
        # Named here, made on the one disk thread: the removal below runs after the
        # making on that thread, even when the job is cancelled in between.
        shadow = self.code_dir / f"{SHADOW_PREFIX}{job.tree.name[:16]}-{secrets.token_hex(6)}"
        try:
            await self._io(_make_shadow, job.tree, shadow)
            for rt in self.runtimes:
                report = await compile_files(rt, shadow, phase[rt.name], budget)
                job.reports.setdefault(rt.name, CompileReport()).add(report)
                if self._on_report is not None:
                    self._on_report(rt, report)
            if await self._io(_swap, shadow, job.tree):
                job.swaps += 1
        finally:
            await asyncio.shield(self._io(remove_tree, shadow))

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)


def _background_thread() -> None:
    """This thread at nice 19 too (Linux nice is per thread): listing, linking and removing
    thousands of entries is the agent's share of a compile, and a first start running
    beside it comes first (measured: at nice 0 it made first starts up to 1.3x slower
    on a busy host)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def _make_shadow(tree: Path, shadow: Path) -> None:
    """A 0755 directory of links to ``tree``'s files, to compile into."""
    os.mkdir(shadow, 0o700)
    link_tree(tree, shadow)
    os.chmod(shadow, 0o755)


def _swap(shadow: Path, tree: Path) -> bool:
    """Exchange; False when the served tree is gone (evicted meanwhile)."""
    try:
        exchange(shadow, tree)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False
    return True
