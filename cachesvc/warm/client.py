"""The client of the operator warm API, for ``cachesvc warm`` and
``cachesvc publish --warm``: one job per target (``POST /warm`` with the
operator token), each followed (``GET /warm/{job}?items=none``) until it ends,
one progress bar for all of them, and a summary table with the failed items.

The progress bar is plain text: redrawn in place with ``\\r`` when its stream is
a terminal, otherwise one line every :data:`LINE_EVERY` seconds. A target that
stops answering for :data:`LOST_AFTER` polls in a row counts as lost.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from cachesvc.upstream.membership import parse_peers, resolve_all

POLL_EVERY = 0.25
LINE_EVERY = 2.0
LOST_AFTER = 8  # consecutive failed polls before a target counts as lost
SHOWN_FAILURES = 5  # failed items listed per target


@dataclass
class Outcome:
    """What one target did with its job."""

    target: str
    state: str = "pending"  # done, failed, unreachable, refused, lost, timeout
    total: int = 0
    done: int = 0
    fetched: int = 0
    cached: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.state == "done" and self.failed == 0

    def update(self, job: dict[str, Any]) -> None:
        for name in ("total", "done", "fetched", "cached", "skipped", "failed", "bytes"):
            setattr(self, name, int(job.get(name, 0)))


async def peer_targets(spec: str) -> list[str]:
    """``--peers`` as the services read it: static URLs, or every address of a DNS name."""
    static, dns = parse_peers(spec)
    if dns is None:
        if not static:
            raise ValueError("no peers given")
        return static
    urls = await resolve_all(*dns)
    if not urls:
        raise ValueError(f"{dns[0]} resolves to no address")
    return urls


async def warm_targets(
    targets: list[str], body: dict[str, Any], token: str, timeout: float
) -> list[Outcome]:
    """Run one job per target at once, with a progress bar on stderr."""
    outcomes = [Outcome(t) for t in targets]
    headers = {"Authorization": f"Bearer {token}"}
    client_timeout = aiohttp.ClientTimeout(total=30, sock_connect=5)
    async with aiohttp.ClientSession(timeout=client_timeout, headers=headers) as session:
        progress = Progress(outcomes, sys.stderr)
        drawing = asyncio.get_running_loop().create_task(progress.run())
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(_one(session, o, body) for o in outcomes))
        except TimeoutError:
            for o in outcomes:
                if o.state == "pending":
                    o.state = "timeout"
                    o.errors.append(f"not finished after {timeout:g}s")
        finally:
            drawing.cancel()
            progress.finish()
    return outcomes


async def _one(session: aiohttp.ClientSession, outcome: Outcome, body: dict[str, Any]) -> None:
    start = time.monotonic()
    try:
        job_url = await _post(session, outcome, body)
        if job_url is not None:
            await _poll(session, outcome, job_url)
    finally:
        outcome.seconds = time.monotonic() - start


async def _post(
    session: aiohttp.ClientSession, outcome: Outcome, body: dict[str, Any]
) -> str | None:
    url = f"{outcome.target}/warm"
    try:
        async with session.post(url, json=body) as resp:
            answer = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        outcome.state = "unreachable"
        outcome.errors.append(f"POST {url}: {type(exc).__name__}: {exc}")
        return None
    if resp.status != 202:
        outcome.state = "refused"
        outcome.errors.append(
            f"POST {url}: {resp.status} {answer.get('error')}: {answer.get('detail')}"
        )
        return None
    outcome.total = int(answer.get("total", 0))
    return f"{outcome.target}/warm/{answer['job']}"


async def _poll(session: aiohttp.ClientSession, outcome: Outcome, job_url: str) -> None:
    misses, last = 0, ""
    while misses < LOST_AFTER:
        await asyncio.sleep(POLL_EVERY)
        try:
            job = await _get_json(session, f"{job_url}?items=none")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            misses += 1
            last = f"GET {job_url}: {type(exc).__name__}: {exc}"
            continue
        misses = 0
        outcome.update(job)
        if job["state"] != "running":
            await _finish(session, outcome, job_url, job["state"])
            return
    outcome.state = "lost"
    outcome.errors.append(f"lost contact after {LOST_AFTER} failed polls: {last}")


async def _finish(
    session: aiohttp.ClientSession, outcome: Outcome, job_url: str, state: str
) -> None:
    outcome.state = state
    if not outcome.failed:
        return
    try:
        job = await _get_json(session, f"{job_url}?items=failed")
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        outcome.errors.append(f"GET {job_url}: {exc}")
        return
    outcome.errors += [f"{i['digest']}: {i['error']}" for i in job.get("items", [])]


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as resp:
        answer: dict[str, Any] = await resp.json(content_type=None)
        if resp.status != 200:
            raise ValueError(f"{resp.status} {answer.get('error')}: {answer.get('detail')}")
        return answer


# -- output ------------------------------------------------------------------------


class Progress:
    """One bar for all targets on a text stream; in place on a terminal."""

    def __init__(self, outcomes: list[Outcome], stream: TextIO, width: int = 30) -> None:
        self._outcomes = outcomes
        self._stream = stream
        self._width = width
        self._tty = stream.isatty()
        self._last_line = ""

    def line(self) -> str:
        total = sum(o.total for o in self._outcomes)
        done = sum(o.done for o in self._outcomes)
        finished = sum(1 for o in self._outcomes if o.state != "pending")
        filled = self._width * done // total if total else 0
        bar = "#" * filled + "." * (self._width - filled)
        moved = human_bytes(sum(o.bytes for o in self._outcomes))
        return (
            f"warm [{bar}] {done}/{total} items, {moved}, {finished}/{len(self._outcomes)} targets"
        )

    async def run(self) -> None:
        every = POLL_EVERY if self._tty else LINE_EVERY
        while True:
            await asyncio.sleep(every)
            self.draw()

    def draw(self) -> None:
        text = self.line()
        if self._tty:
            self._stream.write("\r" + text.ljust(len(self._last_line)))
        elif text != self._last_line:
            self._stream.write(text + "\n")
        self._last_line = text
        self._stream.flush()

    def finish(self) -> None:
        self.draw()
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


COLUMNS = ("target", "state", "fetched", "cached", "not owner", "failed", "bytes", "time")


def summary_rows(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        (o.target, o.state, str(o.fetched), str(o.cached), str(o.skipped), str(o.failed),
         human_bytes(o.bytes), f"{o.seconds:.1f}s")
        for o in outcomes
    ]  # fmt: skip
    total = ("total", "ok" if all(o.ok for o in outcomes) else "FAILED")
    sums = [
        sum(getattr(o, n) for o in outcomes) for n in ("fetched", "cached", "skipped", "failed")
    ]
    slowest = max((o.seconds for o in outcomes), default=0.0)
    rows.append(
        total
        + tuple(map(str, sums))
        + (human_bytes(sum(o.bytes for o in outcomes)), f"{slowest:.1f}s")
    )
    return rows


def print_summary(outcomes: list[Outcome], stream: TextIO) -> None:
    """The table, then up to :data:`SHOWN_FAILURES` errors per target."""
    rows = [COLUMNS, *summary_rows(outcomes)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    for row in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=stream)
    for o in outcomes:
        for error in o.errors[:SHOWN_FAILURES]:
            print(f"{o.target}: {error}", file=stream)
        if len(o.errors) > SHOWN_FAILURES:
            print(f"{o.target}: ... and {len(o.errors) - SHOWN_FAILURES} more", file=stream)
