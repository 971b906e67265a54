"""Unpack workers: every package is extracted by its own short-lived process, within a budget.

An archive is hostile input read by parsers we do not own (``tarfile``,
``zipfile``, C decoders), and Python 3.11.7's ``tarfile`` can be made to burn
CPU (CVE-2024-6232: a 64 KiB PAX header of digits costs 4.4 s here, and they
chain) or memory. A thread running such a parser cannot be stopped. So the
agent never parses an archive itself: :class:`Workers` runs each extraction
in a fresh process forked from a ``multiprocessing`` forkserver (about 6 ms a
package here; a fresh interpreter costs 75 ms) and answers for it.

Guarantees:

* **Bounded.** At most ``count`` workers run at once; at most
  ``count * QUEUE_PER_WORKER`` callers wait for one (more are
  :class:`Overloaded`). Each worker is killed when its wall-clock
  ``Budget.timeout`` runs out (then :class:`TooLarge` "took over N s"), and
  runs under ``RLIMIT_AS`` (``Budget.memory``), ``RLIMIT_CPU`` (twice the
  timeout: the decoder's read-ahead thread may use a second core),
  ``RLIMIT_FSIZE`` (the largest inner archive), ``RLIMIT_NOFILE`` (64) and no
  core dumps, at ``nice`` 10 so serving keeps the CPU. It dies with its
  parent (``PR_SET_PDEATHSIG``; the forkserver exits with the agent).
* **Never on the default thread pool.** Starting a worker (a few blocking
  milliseconds) runs on this object's own threads; waiting is a file
  descriptor watched by the event loop. Store I/O and fills never wait for
  an unpack.
* **Answers, never raises anything else.** :meth:`Workers.extract` returns the
  worker's :class:`Extracted` or raises a contract error: what the worker
  reported (:class:`TooLarge`, :class:`UnsafeArchive`,
  :class:`UnsupportedFormat`), :class:`TooLarge` for a worker killed by its
  time, CPU or memory limit, :class:`UnsupportedFormat` for one that crashed
  on the package (e.g. SIGSEGV in a decoder). The worker's answer is read as
  bounded JSON, never unpickled: a worker is as untrusted as its input.
* **One process per package.** Nothing a hostile package does to its worker
  outlives that package.

The caller owns ``dest``: after a failure it may hold partial output (or a
killed worker's), which the caller removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import logging
import multiprocessing
import os
import resource
import signal
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerProcess, set_spawning_popen
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from cachesvc.errors import (
    CachesvcError,
    Overloaded,
    TooLarge,
    UnsafeArchive,
    UnsupportedFormat,
)
from cachesvc.readpath.package import Package
from cachesvc.unpack.codec import GiB, Limits
from cachesvc.unpack.extract import Extracted, extract
from cachesvc.unpack.feed import Feed, GrowingFile, readable_ends

log = logging.getLogger(__name__)

QUEUE_PER_WORKER = 32
"""Callers that may wait for each worker before new ones are refused (503)."""

NICE = 10
"""Added to a worker's nice value: when the CPU is short, serving goes first."""
ANSWER_MAX = 16 * 1024
"""Largest answer read from a worker; details are cut well below it."""

DETAIL_MAX = 1000
KILL_WAIT = 10.0
"""Seconds to wait for a SIGKILLed worker to be reaped before giving up on it."""

_PR_SET_PDEATHSIG = 1
_CTX = multiprocessing.get_context("forkserver")
_ERRORS: dict[str, type[CachesvcError]] = {
    cls.code: cls for cls in (TooLarge, UnsafeArchive, UnsupportedFormat)
}


@dataclass(frozen=True)
class Budget:
    """What one package may use: wall-clock seconds and address space.

    ``timeout`` (``--unpack-timeout``, 300 s): a package at the default limits
    is 4 GiB written (10-40 s at this machine's disk speeds), or 100,000 files
    (36 s measured here with the machine loaded and the worker niced), or an
    xz layer of real data at 50-100 MiB/s (under 90 s); 300 s leaves three
    times the worst of these, and is how long one hostile package can hold
    one worker. ``memory`` (``--unpack-memory``, 1 GiB of address space): a
    worker starts at about 110 MiB; a zstd window (at most 128 MiB), xz -9's
    64 MiB dictionary or a 100,000-entry zip directory (about 100 MiB of
    records plus their objects) fit with room.
    """

    timeout: float = 300.0
    memory: int = GiB
    nice: int = NICE

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.memory <= 0:
            raise ValueError("Budget.timeout and Budget.memory must be positive")
        if not 0 <= self.nice <= 19:
            raise ValueError("Budget.nice must be 0 to 19")

    @property
    def cpu_seconds(self) -> int:
        return int(2 * self.timeout) + 1


@dataclass(frozen=True)
class _Job:
    """What the parent sends the worker (pickled parent -> child only)."""

    dest: str
    limits: Limits
    budget: Budget
    size: int | None = None  # a package still arriving: its size (read through a feed)


class _InheritedFd:
    """An open file descriptor handed to the worker through the forkserver."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        # DupFd must be made while the Process is being pickled for launch.
        return (_InheritedFd._rebuild, (reduction.DupFd(self.fd),))

    @staticmethod
    def _rebuild(dup: Any) -> _InheritedFd:
        return _InheritedFd(dup.detach())


class _Popen(popen_forkserver.Popen):
    """The stdlib's forkserver launch, except that the worker does not re-run the
    agent's ``__main__`` first (multiprocessing's "safe importing of main").

    A worker then holds this module only, and an agent started as a script or
    with ``python -m`` pays no import per package. Rejected: preloading
    ``__main__`` into the forkserver (it does not cover ``python -m`` mains,
    and loads the whole agent into every worker).
    """

    def _launch(self, process_obj: BaseProcess) -> None:
        prep_data = spawn.get_preparation_data(process_obj.name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        # From here on exactly as popen_forkserver.Popen._launch (Python 3.11).
        fds = self._fds  # type: ignore[attr-defined]
        self.sentinel, w = forkserver.connect_to_new_process(fds)
        _parent_w = os.dup(w)
        close_fds = util.close_fds  # type: ignore[attr-defined]
        self.finalizer = util.Finalize(self, close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: BaseProcess) -> _Popen:  # noqa: N802 (multiprocessing's name)
        return _Popen(process_obj)


class Workers:
    """A bounded set of unpack worker processes; see the module docstring."""

    def __init__(
        self, count: int = 2, budget: Budget | None = None, queue: int | None = None
    ) -> None:
        if count < 1:
            raise ValueError("Workers needs at least one worker")
        self.count = count
        self.budget = budget or Budget()
        self.queue = count * QUEUE_PER_WORKER if queue is None else queue
        self.started = 0
        self._slots = asyncio.Semaphore(count)
        self._waiting = 0
        self._running: set[BaseProcess] = set()
        self._closing = False
        self._threads = ThreadPoolExecutor(count, thread_name_prefix="cachesvc-unpack-start")

    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [proc.pid for proc in self._running if proc.pid is not None]

    async def start(self) -> None:
        """Start the forkserver now (a fresh interpreter, ~0.2 s), not on the first unpack."""
        await asyncio.get_running_loop().run_in_executor(self._threads, _ensure_forkserver)

    async def aclose(self) -> None:
        """Kill the running workers (their callers get an error) and stop the threads."""
        self._closing = True
        for proc in list(self._running):
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def extract(self, package: Path | Package, dest: Path, limits: Limits) -> Extracted:
        """Extract ``package`` into the existing empty ``dest`` in a worker process:
        a verified file, or a :class:`~cachesvc.readpath.package.Package` whose bytes are
        still arriving (the worker reads them as they do: :mod:`cachesvc.unpack.feed`;
        a failure of its fetch is raised as such).

        Raises :class:`Overloaded` when too many callers already wait.
        """
        if self._slots.locked() and self._waiting >= self.queue:
            raise Overloaded(f"{self._waiting} unpacks are already waiting for a worker")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            if isinstance(package, Path):
                job = _Job(str(dest), limits, self.budget)
                return await self._run(job, lambda: _spawn_path(package, job), None)
            return await self._run_fed(package, _Job(str(dest), limits, self.budget, package.size))
        finally:
            self._slots.release()

    async def _run_fed(self, package: Package, job: _Job) -> Extracted:
        """A worker reading the package file as it grows, told how far it may read."""
        async with contextlib.aclosing(readable_ends(package)) as ends:
            first = await anext(ends, None)
            if first is None:
                raise UnsupportedFormat(f"{package.digest.short} is empty: no archive")
            fd, end = first
            control, write = os.pipe()
            try:
                feed = await Feed.open(write)
            except BaseException:
                os.close(write)
                os.close(control)
                raise
            try:
                feed.readable(end)
                pump = _pump(ends, feed)
                return await self._run(job, lambda: _spawn_fd(fd, control, job), pump)
            finally:
                feed.close()
                os.close(control)

    async def _run(
        self,
        job: _Job,
        spawn: Callable[[], tuple[BaseProcess, Connection]],
        pump: Coroutine[Any, Any, None] | None,
    ) -> Extracted:
        if self._closing:
            raise Overloaded("the agent is shutting down")
        loop = asyncio.get_running_loop()
        proc, answers = await loop.run_in_executor(self._threads, spawn)
        self.started += 1
        self._running.add(proc)
        feeding = asyncio.ensure_future(pump) if pump is not None else None
        try:
            if self._closing:  # aclose ran while this one was starting
                proc.kill()
            timed_out = not await _exited(proc, self.budget.timeout, feeding)
            if timed_out or (feeding is not None and not feeding.done()):
                proc.kill()
                await _exited(proc, KILL_WAIT)
            if feeding is not None and feeding.done() and feeding.exception() is not None:
                raise feeding.exception()  # type: ignore[misc]  # the fetch failed: say so
            return self._outcome(proc, answers, timed_out)
        finally:
            if feeding is not None:
                feeding.cancel()
                await asyncio.gather(feeding, return_exceptions=True)
            self._running.discard(proc)
            answers.close()
            _close(proc)

    def _outcome(self, proc: BaseProcess, answers: Connection, timed_out: bool) -> Extracted:
        if self._closing:
            raise Overloaded("the agent is shutting down")
        if timed_out:
            raise TooLarge(f"unpacking took over {self.budget.timeout:g} s (--unpack-timeout)")
        answer = _read_answer(answers)
        if answer is not None:
            return _decode(answer)
        raise _death(proc.exitcode, self.budget)


async def _pump(ends: AsyncIterator[tuple[int, int]], feed: Feed) -> None:
    """Tell the worker every new readable end; the last (the whole package)
    comes only after the verdict. Raises the fetch's failure."""
    async for _fd, end in ends:
        feed.readable(end)


async def _exited(
    proc: BaseProcess, timeout: float, feeding: asyncio.Future[None] | None = None
) -> bool:
    """Wait until the process has exited (its sentinel is readable), or its feed
    failed; False on timeout."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ready(*_: object) -> None:
        if not done.done():
            done.set_result(None)

    def fed(task: asyncio.Future[None]) -> None:
        if task.cancelled() or task.exception() is not None:
            ready()

    loop.add_reader(proc.sentinel, ready)
    if feeding is not None:
        feeding.add_done_callback(fed)
    try:
        await asyncio.wait_for(done, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(proc.sentinel)
        if feeding is not None:
            feeding.remove_done_callback(fed)


def _close(proc: BaseProcess) -> None:
    if proc.exitcode is None:  # a worker we could not reap: leave it to multiprocessing
        log.error("unpack worker pid %s did not exit after SIGKILL", proc.pid)
        return
    proc.close()


def _read_answer(answers: Connection) -> dict[str, Any] | None:
    """The worker's JSON answer, if it sent one (bounded; never unpickled)."""
    try:
        if not answers.poll():
            return None
        answer = json.loads(answers.recv_bytes(ANSWER_MAX))
    except (OSError, EOFError, ValueError) as exc:
        log.error("unpack worker sent no usable answer: %s", exc)
        return None
    return answer if isinstance(answer, dict) else None


def _decode(answer: dict[str, Any]) -> Extracted:
    """An :class:`Extracted` or the contract error the worker named."""
    if "error" in answer:
        cls = _ERRORS.get(str(answer["error"]), CachesvcError)
        raise cls(str(answer.get("detail", ""))[:DETAIL_MAX])
    extracted = Extracted.from_json(answer)
    if extracted is None:
        raise CachesvcError(f"unpack worker answered nonsense: {str(answer)[:200]}")
    return extracted


def _death(exitcode: int | None, budget: Budget) -> CachesvcError:
    """The contract error for a worker that exited without an answer."""
    if exitcode == -signal.SIGXCPU:
        return TooLarge(f"unpacking used over {budget.cpu_seconds} s of CPU")
    if exitcode == -signal.SIGKILL:  # not ours: the CPU hard limit or the OOM killer
        return TooLarge("the unpack worker was killed (over its CPU or memory limit)")
    if exitcode is not None and exitcode < 0:
        name = signal.strsignal(-exitcode) or f"signal {-exitcode}"
        with contextlib.suppress(ValueError):
            name = signal.Signals(-exitcode).name
        log.error("unpack worker crashed with %s", name)
        return UnsupportedFormat(f"the unpack worker crashed on this package ({name})")
    log.error("unpack worker exited with status %s and no answer", exitcode)
    return CachesvcError(f"the unpack worker exited with status {exitcode} and no answer")


# ---- parent side, blocking (on Workers' own threads) ----


def _ensure_forkserver() -> None:
    _CTX.set_forkserver_preload([__name__])
    forkserver.ensure_running()


def _spawn_path(package: Path, job: _Job) -> tuple[BaseProcess, Connection]:
    """Start a worker on ``job`` with ``package`` open; return it and its answer pipe."""
    fd = os.open(package, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _spawn_fd(fd, None, job)
    finally:
        os.close(fd)


def _spawn_fd(fd: int, control: int | None, job: _Job) -> tuple[BaseProcess, Connection]:
    """Start a worker on ``job`` with the package's open ``fd`` (and, for a package
    still arriving, the read end of its feed); return it and its answer pipe."""
    _ensure_forkserver()
    answers, reply = _CTX.Pipe(duplex=False)
    feed = _InheritedFd(control) if control is not None else None
    proc = _Process(
        target=_child,
        args=(job, _InheritedFd(fd), feed, reply),
        name="cachesvc-unpack",
        daemon=True,
    )
    try:
        proc.start()
    finally:
        reply.close()
    return proc, answers


# ---- the worker process ----


def _child(job: _Job, package: _InheritedFd, feed: _InheritedFd | None, reply: Connection) -> None:
    """The worker's whole life: confine itself, extract, answer in JSON, exit."""
    _confine(job)
    try:
        found = _extract(job, package, feed)
        answer: dict[str, Any] = {"files": found.files, "bytes": found.bytes}
        answer["layers"] = list(found.layers)
    except CachesvcError as exc:
        answer = {"error": exc.code, "detail": str(exc)[:DETAIL_MAX]}
    except MemoryError:
        answer = {"error": TooLarge.code, "detail": _memory_detail(job.budget)}
    except BaseException as exc:  # a bug of ours or a parser's: say so, never hang the parent
        traceback.print_exc(limit=20)
        answer = {"error": CachesvcError.code, "detail": f"unpack failed: {exc!r}"[:DETAIL_MAX]}
    reply.send_bytes(json.dumps(answer).encode())


def _extract(job: _Job, package: _InheritedFd, feed: _InheritedFd | None) -> Extracted:
    """Read the whole file; one still arriving is read as it grows, then to its
    end (the verdict) before the answer."""
    if feed is None or job.size is None:
        return extract(Path(f"/proc/self/fd/{package.fd}"), Path(job.dest), job.limits)
    growing = GrowingFile(package.fd, feed.fd, job.size)
    found = extract(growing, Path(job.dest), job.limits)
    growing.drain()
    return found


def _memory_detail(budget: Budget) -> str:
    return f"unpacking needs over {budget.memory} bytes of memory (--unpack-memory)"


def _confine(job: _Job) -> None:
    """Limits set before the first byte of the package is read; hard = soft, so the
    worker cannot raise them again."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.nice(job.budget.nice)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-size write fails with EFBIG
    cpu = job.budget.cpu_seconds
    for limit, value in (
        (resource.RLIMIT_AS, job.budget.memory),
        (resource.RLIMIT_FSIZE, job.limits.max_decoded_size),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
