"""Bytecode for a runtime: a tree's sources compiled by that runtime's own interpreter,
confined, file by file.

Public API::

    await Runtime.probe(name, path) -> Runtime      # cache tag and magic number, asked of it
    Runtime.pyc_of(rel) -> str                      # where its pyc of a source goes
    await compile_files(runtime, root, files, budget) -> CompileReport
    CompileBudget(timeout, per_file, memory, max_source, nice)

Guarantees:

* **Made by the runtime named.** The compile runs as a child of that
  interpreter (``-I -S`` and :mod:`cachesvc.unpack.compile_child`, our own
  small script): the pycs carry its magic number and cache tag. They are
  unchecked-hash pycs: valid whatever the mtimes, in a tree that never changes.
  This process never imports, compiles or runs a tenant file.
* **Confined like an unpack.** The child sets ``RLIMIT_AS``, ``RLIMIT_CPU``,
  ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core dumps and its nice value before
  it opens a tenant file. Sources over ``max_source`` bytes are skipped unread.
* **A hostile source is skipped, the rest compiled.** A syntax error, a
  compiler error (too deep, out of memory) is reported by the child and
  skipped; a file that holds the compiler over ``per_file`` seconds, or a
  child that crashes on one, is killed and the work resumes after that file
  with a new child. Every skip is counted with its reason. The whole job is
  bounded by ``timeout``; what it did not reach is skipped as "over budget".
* **Untrusted answers.** The child's lines are parsed strictly and bounded;
  nonsense counts as a crash of the file it was on.

This module does not choose which files to compile nor where the tree lives
(:mod:`cachesvc.unpack.hostcompile` and :mod:`cachesvc.publish.bytecode` do).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cachesvc.errors import CachesvcError
from cachesvc.unpack.codec import GiB, MiB

CHILD_SCRIPT = Path(__file__).with_name("compile_child.py")
PROBE = (
    "import sys, importlib.util; "
    "print(sys.implementation.cache_tag, importlib.util.MAGIC_NUMBER.hex())"
)
PROBE_TIMEOUT = 30.0
LINE_MAX = 4096
CHILD_ENV = {"LC_ALL": "C.UTF-8"}
"""The whole environment of a compile child: none of the agent's (its tokens)."""
SKIPS_KEPT = 100
"""Skipped files named in a report (all are counted)."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LINE = re.compile(rb"([>+-]) (\d{1,9})(?: (.{0,400}))?")


class CompileFailed(CachesvcError):
    """The runtime could not run the compile script at all (not a tenant's fault)."""


@dataclass(frozen=True)
class Runtime:
    """A function runtime of this host: its name, interpreter, cache tag and magic number."""

    name: str
    path: Path
    cache_tag: str
    magic: bytes

    @classmethod
    async def probe(cls, name: str, path: Path) -> Runtime:
        """Ask the interpreter for its cache tag and magic number; :class:`CompileFailed`
        when it cannot run or answers nonsense."""
        if not NAME.fullmatch(name):
            raise CompileFailed(f"runtime name {name!r}: letters, digits, '.', '_', '-'")
        try:
            out = await _run_probe(path)
            tag, magic = out.decode().split()
            return cls(name, path, _checked_tag(tag), bytes.fromhex(magic))
        except (OSError, ValueError, TimeoutError) as exc:
            raise CompileFailed(f"cannot ask {path} for its cache tag: {exc}") from exc

    def pyc_of(self, rel: str) -> str:
        """The relative path of this runtime's pyc for the source ``rel``."""
        head, _, tail = rel.rpartition("/")
        pyc = f"__pycache__/{tail.removesuffix('.py')}.{self.cache_tag}.pyc"
        return f"{head}/{pyc}" if head else pyc


def _checked_tag(tag: str) -> str:
    if not NAME.fullmatch(tag):
        raise ValueError(f"cache tag {tag!r} is not a plain name")
    return tag


async def _run_probe(path: Path) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        str(path), "-I", "-S", "-c", PROBE,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env=CHILD_ENV, cwd="/",
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise ValueError(f"exited with status {proc.returncode}")
    return out[:200]


@dataclass(frozen=True)
class CompileBudget:
    """What one compile job may use.

    ``timeout``: the whole job (the agent's ``--unpack-timeout``); ``per_file``:
    one source, 20 s (the largest module of the corpus, 1.3 MiB, compiles in
    0.3 s here); ``memory``: the child's address space (``--unpack-memory``);
    ``max_source``: larger sources are skipped unread (8 MiB; the runtime
    compiles such a module itself, as without bytecode); ``max_pyc_bytes``:
    the pycs one job may write in all (the agent's ``--max-unpacked-size``);
    past it the rest is skipped.
    """

    timeout: float = 300.0
    per_file: float = 20.0
    memory: int = GiB
    max_source: int = 8 * MiB
    nice: int = 10
    max_pyc_bytes: int = 4 * GiB

    def __post_init__(self) -> None:
        if min(self.timeout, self.per_file, self.memory, self.max_source, self.max_pyc_bytes) <= 0:
            raise ValueError("CompileBudget values must be positive")
        if not 0 <= self.nice <= 19:
            raise ValueError("CompileBudget.nice must be 0 to 19")

    def argv(self, runtime: Runtime, root: Path, written: int) -> list[str]:
        """The child's command line; ``written``: pyc bytes this job already wrote."""
        cpu = int(2 * self.timeout) + 1
        fsize = 8 * self.max_source  # a pyc may be larger than its source
        allowance = max(self.max_pyc_bytes - written, 0)
        limits = (self.memory, cpu, fsize, self.max_source, self.nice, allowance)
        return [str(runtime.path), "-I", "-S", str(CHILD_SCRIPT), str(root), *map(str, limits)]


@dataclass
class CompileReport:
    """What a compile job did: files compiled, files skipped (the first
    :data:`SKIPS_KEPT` named, with why), children started, seconds."""

    compiled: int = 0
    skipped: int = 0
    pyc_bytes: int = 0
    skips: list[tuple[str, str]] = field(default_factory=list)
    children: int = 0
    seconds: float = 0.0

    def skip(self, rel: str, reason: str) -> None:
        self.skipped += 1
        if len(self.skips) < SKIPS_KEPT:
            self.skips.append((rel, reason))

    def add(self, other: CompileReport) -> None:
        self.compiled += other.compiled
        self.pyc_bytes += other.pyc_bytes
        self.children += other.children
        self.seconds += other.seconds
        for rel, reason in other.skips:
            self.skip(rel, reason)
        self.skipped += other.skipped - len(other.skips)


async def compile_files(
    runtime: Runtime, root: Path, files: Sequence[str], budget: CompileBudget
) -> CompileReport:
    """Compile ``files`` (paths relative to ``root``, in this order) for ``runtime``.

    Never raises for a tenant's file: each is compiled or counted as skipped.
    Raises :class:`CompileFailed` when a fresh child cannot even start its
    first file (a broken runtime). Cancelling kills the child.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + budget.timeout
    report = CompileReport()
    done = 0
    while done < len(files):
        if loop.time() >= deadline:
            for rel in files[done:]:
                report.skip(rel, f"over the budget of {budget.timeout:g} s")
            break
        report.children += 1
        done += await _one_child(runtime, root, files[done:], budget, deadline, report)
    report.seconds = loop.time() - start
    return report


async def _one_child(
    runtime: Runtime,
    root: Path,
    files: Sequence[str],
    budget: CompileBudget,
    deadline: float,
    report: CompileReport,
) -> int:
    """Run one child over ``files``; return how many it settled (at least one)."""
    proc = await asyncio.create_subprocess_exec(
        *budget.argv(runtime, root, report.pyc_bytes),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, limit=LINE_MAX, start_new_session=True,
        env=CHILD_ENV, cwd="/",
    )  # fmt: skip
    _lower_priority(proc.pid, budget.nice)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"".join(json.dumps(rel).encode() + b"\n" for rel in files))
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        return await _follow(proc.stdout, files, budget, deadline, report)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


def _lower_priority(pid: int, nice: int) -> None:
    """Lower the new child's priority at once, before its interpreter has started (the
    child sets it again, to be sure, before it reads a tenant file)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        with open(f"/proc/{pid}/autogroup", "w") as group:  # see compile_child
            group.write(str(nice))


async def _follow(
    out: asyncio.StreamReader,
    files: Sequence[str],
    budget: CompileBudget,
    deadline: float,
    report: CompileReport,
) -> int:
    """Read the child's reports until it ends, stalls on a file or talks nonsense."""
    loop = asyncio.get_running_loop()
    current: int | None = None  # the file announced and not yet settled
    settled = 0
    file_deadline = deadline
    while True:
        wait = min(file_deadline, deadline) - loop.time()
        try:
            line = await asyncio.wait_for(out.readline(), max(wait, 0))
        except TimeoutError:
            why = (f"over the budget of {budget.timeout:g} s" if loop.time() >= deadline
                   else f"took over {budget.per_file:g} s")  # fmt: skip
            return _culprit(files, current, settled, report, why)
        except ValueError:  # a line over LINE_MAX
            return _culprit(files, current, settled, report, "the compiler answered nonsense")
        parsed = _parse(line)
        if parsed is None:
            why = "the compiler crashed" if not line else "the compiler answered nonsense"
            return _culprit(files, current, settled, report, why)
        kind, index, reason = parsed
        if kind == ">" and current is None and index == settled < len(files):
            current, file_deadline = index, loop.time() + budget.per_file
        elif kind in "+-" and current == index:
            if kind == "+":
                report.compiled += 1
                report.pyc_bytes += int(reason) if reason.isdigit() else 0
            else:
                report.skip(files[index], reason or "skipped")
            current, settled, file_deadline = None, settled + 1, deadline
            if settled == len(files):
                return settled
        else:
            return _culprit(files, current, settled, report, "the compiler answered nonsense")


def _parse(line: bytes) -> tuple[str, int, str] | None:
    match = _LINE.fullmatch(line.rstrip(b"\n"))
    if match is None:
        return None
    reason = (match.group(3) or b"").decode("utf-8", "replace")
    return match.group(1).decode(), int(match.group(2)), reason


def _culprit(
    files: Sequence[str], current: int | None, settled: int, report: CompileReport, why: str
) -> int:
    """Skip the file the child was on; return how many files are settled."""
    if current is None:
        if settled == 0:
            raise CompileFailed(f"the compile child ended before its first file ({why})")
        return settled
    report.skip(files[current], why)
    return settled + 1
