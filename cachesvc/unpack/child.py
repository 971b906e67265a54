"""An unpack worker's whole life, inside the forked child: confine, extract, answer, exit.

The fork server (:mod:`cachesvc.unpack.forkserver`) imports this module once
and runs :func:`main` in each child; :mod:`cachesvc.unpack.worker` sends the
:class:`Job` and reads the answer.

Guarantees: the limits are set before the first byte of the package is read,
hard = soft (the worker cannot raise them again); the answer is one JSON
object of at most :data:`DETAIL_MAX` characters of detail, written to the
answer pipe, whatever the extraction raised (a bug of ours or a parser's
included: the parent never hangs on a silent worker).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachesvc.errors import CachesvcError, TooLarge
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import Extracted, extract
from cachesvc.unpack.feed import GrowingFile

DETAIL_MAX = 1000
"""Characters of an error's detail sent back."""
FILES_MAX = 64
"""``RLIMIT_NOFILE`` of a worker."""


@dataclass(frozen=True)
class Job:
    """What the parent sends the worker (as JSON: the worker unpickles nothing)."""

    dest: str
    limits: Limits
    memory: int  # RLIMIT_AS, bytes
    cpu_seconds: int  # RLIMIT_CPU soft limit (SIGXCPU); the hard one is a second more
    nice: int
    size: int | None = None  # a package still arriving: its size (read through a feed)

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Job:
        fields = json.loads(data)
        return cls(**{**fields, "limits": Limits(**fields["limits"])})


def main(data: bytes, fds: list[int]) -> None:
    """Run the job; ``fds`` are the answer pipe, the package, and for a package
    still arriving the read end of its feed."""
    job = Job.decode(data)
    reply, package, *feed = fds
    _confine(job)
    try:
        found = _extract(job, package, feed[0] if feed else None)
        answer: dict[str, Any] = {"files": found.files, "bytes": found.bytes}
        answer["layers"] = list(found.layers)
    except CachesvcError as exc:
        answer = {"error": exc.code, "detail": str(exc)[:DETAIL_MAX]}
    except MemoryError:
        detail = f"unpacking needs over {job.memory} bytes of memory (--unpack-memory)"
        answer = {"error": TooLarge.code, "detail": detail}
    except BaseException as exc:  # a bug of ours or a parser's: say so, never hang the parent
        traceback.print_exc(limit=20)
        answer = {"error": CachesvcError.code, "detail": f"unpack failed: {exc!r}"[:DETAIL_MAX]}
    with open(reply, "wb", closefd=True) as out:
        out.write(json.dumps(answer).encode())


def _extract(job: Job, package: int, feed: int | None) -> Extracted:
    """Read the whole file; one still arriving is read as it grows, then to its
    end (the verdict) before the answer."""
    if feed is None or job.size is None:
        return extract(Path(f"/proc/self/fd/{package}"), Path(job.dest), job.limits)
    growing = GrowingFile(package, feed, job.size)
    found = extract(growing, Path(job.dest), job.limits)
    growing.drain()
    return found


def _confine(job: Job) -> None:
    os.nice(job.nice)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-size write fails with EFBIG
    for limit, value in (
        (resource.RLIMIT_AS, job.memory),
        (resource.RLIMIT_FSIZE, job.limits.max_decoded_size),
        (resource.RLIMIT_NOFILE, FILES_MAX),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(limit, (value, value))
    cpu = job.cpu_seconds
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
