"""Unpack workers: every package is extracted by its own short-lived process, within a budget.

An archive is hostile input read by parsers we do not own (``tarfile``,
``zipfile``, C decoders), and Python 3.11.7's ``tarfile`` can be made to burn
CPU (CVE-2024-6232: a 64 KiB PAX header of digits costs 4.4 s here, and they
chain) or memory. A thread running such a parser cannot be stopped. So the
agent never parses an archive itself: :class:`Workers` runs each extraction
in a fresh process forked from a fork server (:mod:`cachesvc.unpack.forkserver`;
about 6 ms a package here, a fresh interpreter costs 150-200 ms) and answers
for it. The worker's side is :mod:`cachesvc.unpack.child`.

Guarantees:

* **Bounded.** At most ``count`` workers run at once; at most
  ``count * QUEUE_PER_WORKER`` callers wait for one (more are
  :class:`Overloaded`). Each worker is killed when its wall-clock
  ``Budget.timeout`` runs out (then :class:`TooLarge` "took over N s"), and
  runs under ``RLIMIT_AS`` (``Budget.memory``), ``RLIMIT_CPU`` (twice the
  timeout: the decoder's read-ahead thread may use a second core),
  ``RLIMIT_FSIZE`` (the largest inner archive), ``RLIMIT_NOFILE`` (64) and no
  core dumps, at ``nice`` 10 so serving keeps the CPU. It dies with the fork
  server, which exits with the agent.
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
  bounded JSON from a pipe, never unpickled: a worker is as untrusted as its
  input.
* **One process per package.** Nothing a hostile package does to its worker
  outlives that package.

The caller owns ``dest``: after a failure it may hold partial output (or a
killed worker's), which the caller removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from cachesvc.unpack.child import DETAIL_MAX, Job
from cachesvc.unpack.codec import GiB, Limits
from cachesvc.unpack.extract import Extracted
from cachesvc.unpack.feed import Feed, readable_ends
from cachesvc.unpack.forkserver import Child, ForkServer

log = logging.getLogger(__name__)

REFUSALS = (TooLarge, UnsafeArchive, UnsupportedFormat)
"""What a worker answers about a package (413, 422), as opposed to a fault of this host."""

QUEUE_PER_WORKER = 32
"""Callers that may wait for each worker before new ones are refused (503)."""

NICE = 10
"""Added to a worker's nice value: when the CPU is short, serving goes first."""
ANSWER_MAX = 16 * 1024
"""Largest answer read from a worker; details are cut well below it (``DETAIL_MAX``)."""
KILL_WAIT = 10.0
"""Seconds to wait for a SIGKILLed worker to be reaped before giving up on it."""

_SERVER = ForkServer("cachesvc.unpack.child")
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
        self._running: set[Child] = set()
        self._closing = False
        self._threads = ThreadPoolExecutor(count, thread_name_prefix="cachesvc-unpack-start")

    def pids(self) -> list[int]:
        """The process ids of the workers running now."""
        return [child.pid for child in self._running]

    async def start(self) -> None:
        """Start the fork server now (a fresh interpreter, ~0.2 s), not on the first unpack."""
        await asyncio.get_running_loop().run_in_executor(self._threads, _SERVER.ensure_running)

    async def aclose(self) -> None:
        """Kill the running workers (their callers get an error) and stop the threads."""
        self._closing = True
        for child in list(self._running):
            child.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def extract(self, package: Path | Package, dest: Path, limits: Limits) -> Extracted:
        """Extract ``package`` into the existing empty ``dest`` in a worker process:
        a verified file, or a :class:`~cachesvc.readpath.package.Package` whose bytes are
        still arriving (the worker reads them as they do: :mod:`cachesvc.unpack.feed`;
        a failure of its fetch is raised as such).

        A refusal (413, 422) of a package still arriving is raised only after
        the package's verdict: bytes that fail their digest are the upstream's
        fault (its error is raised instead), never the package's.

        Raises :class:`Overloaded` when too many callers already wait.
        """
        try:
            return await self._in_a_slot(package, dest, limits)
        except REFUSALS as refusal:
            if not isinstance(package, Path):
                await self._verdict_before(package, refusal)
            raise

    async def _verdict_before(self, package: Package, refusal: CachesvcError) -> None:
        """Wait (within the unpack budget, the worker's slot given back) until
        the package is verified; raise its failure if it is not. A verdict that
        takes longer leaves the refusal standing."""
        try:
            await asyncio.wait_for(package.complete(), self.budget.timeout)
        except TimeoutError:
            log.warning("unpack %s: refused (%s) before its verdict, which took over %g s",
                        package.digest.short, refusal, self.budget.timeout)  # fmt: skip
        except CachesvcError as failure:
            raise failure from refusal

    async def _in_a_slot(self, package: Path | Package, dest: Path, limits: Limits) -> Extracted:
        if self._slots.locked() and self._waiting >= self.queue:
            raise Overloaded(f"{self._waiting} unpacks are already waiting for a worker")
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            if isinstance(package, Path):
                job = self._job(dest, limits, None)
                return await self._run(lambda: _spawn_path(package, job), None)
            return await self._run_fed(package, self._job(dest, limits, package.size))
        finally:
            self._slots.release()

    def _job(self, dest: Path, limits: Limits, size: int | None) -> Job:
        budget = self.budget
        return Job(str(dest), limits, budget.memory, budget.cpu_seconds, budget.nice, size)

    async def _run_fed(self, package: Package, job: Job) -> Extracted:
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
                return await self._run(lambda: _spawn_fd(fd, control, job), pump)
            finally:
                feed.close()
                os.close(control)

    async def _run(
        self,
        spawn: Callable[[], tuple[Child, int]],
        pump: Coroutine[Any, Any, None] | None,
    ) -> Extracted:
        if self._closing:
            raise Overloaded("the agent is shutting down")
        loop = asyncio.get_running_loop()
        proc, answers = await loop.run_in_executor(self._threads, spawn)  # answers: a pipe
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
            os.close(answers)
            _close(proc)

    def _outcome(self, proc: Child, answers: int, timed_out: bool) -> Extracted:
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


async def _exited(proc: Child, timeout: float, feeding: asyncio.Future[None] | None = None) -> bool:
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


def _close(proc: Child) -> None:
    if proc.exitcode is None:
        log.error("unpack worker pid %s did not exit after SIGKILL", proc.pid)
    proc.close()  # the fork server kills one still running


def _read_answer(answers: int) -> dict[str, Any] | None:
    """The worker's JSON answer, if it sent one (bounded; never unpickled).
    Call once the worker has exited: the pipe then holds all it wrote."""
    data = b""
    try:
        os.set_blocking(answers, False)
        with contextlib.suppress(BlockingIOError):  # a worker killed with its server
            while len(data) <= ANSWER_MAX and (chunk := os.read(answers, ANSWER_MAX + 1)):
                data += chunk
        if len(data) > ANSWER_MAX:
            raise ValueError(f"an answer of over {ANSWER_MAX} bytes")
        answer = json.loads(data) if data else None
    except (OSError, ValueError) as exc:
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


def _spawn_path(package: Path, job: Job) -> tuple[Child, int]:
    """Start a worker on ``job`` with ``package`` open; return it and its answer pipe."""
    fd = os.open(package, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _spawn_fd(fd, None, job)
    finally:
        os.close(fd)


def _spawn_fd(fd: int, control: int | None, job: Job) -> tuple[Child, int]:
    """Start a worker on ``job`` with the package's open ``fd`` (and, for a package
    still arriving, the read end of its feed); return it and its answer pipe."""
    answers, reply = os.pipe()
    try:
        fds = [reply, fd] if control is None else [reply, fd, control]
        return _SERVER.launch(job.encode(), fds), answers
    except BaseException:
        os.close(answers)
        raise
    finally:
        os.close(reply)
