"""The compile script: run by a function's runtime interpreter, never imported by the agent.

``RUNTIME -I -S compile_child.py ROOT MEMORY CPU FSIZE MAX_SOURCE NICE ALLOWANCE`` confines
itself first (``PR_SET_PDEATHSIG``, nice, ``RLIMIT_AS``, ``RLIMIT_CPU``,
``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core dumps; hard = soft), and only then
reads its job: JSON strings on stdin, one a line, each a source path relative
to ROOT. It compiles them in that order with :func:`py_compile.compile` into
``__pycache__/<name>.<cache tag>.pyc`` (unchecked-hash pycs: the tree is
immutable, so mtimes play no part), and reports on stdout, one line each::

    > I            about to compile file I
    + I BYTES      compiled: a pyc of BYTES
    - I REASON     skipped (a syntax error, over MAX_SOURCE bytes, out of memory, ...)

Once its pycs pass ALLOWANCE bytes in all, it skips the rest.

It never executes what it compiles. It uses only the standard library of the
interpreter running it (``-I -S``: no site, no environment, no user paths), so
the pycs carry that interpreter's magic number. A compile stuck in C or a crash
is the parent's to handle (:mod:`cachesvc.unpack.bytecode` kills the child and
resumes after the file last announced).
"""

from __future__ import annotations

import ctypes
import json
import os
import py_compile
import resource
import signal
import stat
import sys

_PR_SET_PDEATHSIG = 1
REASON_MAX = 160


def confine(memory: int, cpu: int, fsize: int, nice: int) -> None:
    """The limits, before any tenant file is opened; hard = soft, so they stay."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.nice(nice)
    _nice_autogroup(nice)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-size pyc fails with EFBIG
    for limit, value in (
        (resource.RLIMIT_AS, memory),
        (resource.RLIMIT_FSIZE, fsize),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def _nice_autogroup(nice: int) -> None:
    """The same nice value for this session's autogroup. The child leads a session of
    its own, and where the kernel groups sessions (``sched_autogroup``), a process's
    nice weighs only within its group: without this, a nice-19 compile took an equal
    share of the CPU from a function's first start (measured: its start 1.4x slower)."""
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(nice))
    except OSError:  # no autogroups here: the nice value above is enough
        pass


def compile_one(root: str, rel: str, max_source: int) -> int | str:
    """Compile one source; the size of its pyc, else why it was skipped."""
    path = os.path.join(root, rel)
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size > max_source:
        return f"over {max_source} bytes"
    pyc = py_compile.compile(
        path,
        dfile=rel,
        doraise=True,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return os.lstat(pyc).st_size if pyc is not None else "not compiled"


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    root, memory, cpu, fsize, max_source, nice, allowance = argv[1], *map(int, argv[2:8])
    confine(memory, cpu, fsize, nice)
    files = [json.loads(line) for line in sys.stdin.buffer.read().splitlines() if line]
    for index, rel in enumerate(files):
        report(f"> {index}")
        if allowance <= 0:
            report(f"- {index} over the limit on bytecode bytes")
            continue
        try:
            reason = compile_one(root, str(rel), max_source)
        except MemoryError:
            reason = "out of memory"
        except RecursionError:
            reason = "nested too deeply"
        except py_compile.PyCompileError as exc:
            msg = getattr(exc.exc_value, "msg", "")
            reason = f"{exc.exc_type_name}: {msg}" if msg else exc.exc_type_name
        except (SyntaxError, ValueError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a compiler bug on a crafted file: skip it, go on
            reason = f"{type(exc).__name__}"
        if isinstance(reason, int):
            allowance -= reason
            report(f"+ {index} {reason}")
        else:
            report(f"- {index} {' '.join(reason.split())[:REASON_MAX]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
