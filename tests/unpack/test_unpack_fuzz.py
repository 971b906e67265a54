"""Fuzzing unpack with packages that start valid and go wrong (see ``tests/mutants.py``).

Two properties, each run on every drawn package:

* through a real agent (an in-process aiohttp app on loopback, ``file://``
  origin): ``POST /pkg/{d}/unpack`` is answered 200, 413 or 422 with the
  contract's JSON within a time bound; nothing appears outside the code dir
  (a sibling directory is snapshotted), the code dir holds only finished
  trees (no links, no setuid bits, no temp leftovers), ``/healthz`` answers
  and a cold GET of another package is still served;
* in this process, :func:`cachesvc.unpack.extract.extract` raises nothing but
  :class:`TooLarge`, :class:`UnsafeArchive` or :class:`UnsupportedFormat`
  (fast, so it tries many more cases).

``make test`` runs a short, derandomised budget (about 20 s here). The long
run, documented in the Makefile::

    make fuzz FUZZ_MINUTES=30    # rounds of HYPOTHESIS_PROFILE=long, niced

runs rounds of ``FUZZ_EXAMPLES`` cases through HTTP (default 300) and ten
times as many in-process, each round with fresh random cases and its own
statistics, until the time is up or a round fails; failures are kept in
``.hypothesis/`` and replayed first by the next round.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import event, given

from cachesvc.digest import Digest
from cachesvc.errors import TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.fsutil import remove_tree
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import Extracted, extract
from cachesvc.unpack.feed import GrowingFile
from tests import mutants
from tests.codedir_mayhem import snapshot
from tests.fuzzing import LONG, budget
from tests.servers import Stack, digest_of

T = TypeVar("T")

UNPACK_TIMEOUT = 10.0
ANSWER_BOUND = UNPACK_TIMEOUT + 30.0  # the budget, plus a loaded machine's slack
CODES = {413: {"too_large"}, 422: {"unsafe_archive", "unsupported_format"}}

pytestmark = [pytest.mark.timeout(0 if LONG else 300), pytest.mark.slow]  # fuzzing: tens of seconds


class LiveAgent:
    """A real agent app serving on loopback from a thread of its own, so that
    hypothesis drives it from plain synchronous test code."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.origin = root / "origin"
        self.code = root / "stack" / "agent-0-code"
        self.sibling = root / "stack" / "sibling"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-agent")
        self.stack = Stack(f"file://{self.origin}", None, root / "stack")
        self.url = ""
        self._cold = 0

    def __enter__(self) -> LiveAgent:
        self.sibling.mkdir(parents=True)
        (self.sibling / "keep.txt").write_text("outside the code dir")
        (self.sibling / "dir").mkdir()
        self._thread.start()
        self.url = self._run(self.stack.start_agent(peers=[], unpack_timeout=UNPACK_TIMEOUT))
        self.outside = self.listing()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._run(self.stack.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    def publish(self, data: bytes) -> Digest:
        digest = digest_of(data)
        blob = self.origin / "blobs" / "sha256" / digest.hex
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        return digest

    def request(self, method: str, path: str) -> tuple[int, bytes, float]:
        started = time.monotonic()
        req = urllib.request.Request(
            self.url + path, method=method, data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(req, timeout=ANSWER_BOUND) as resp:
                return resp.status, resp.read(), time.monotonic() - started
        except urllib.error.HTTPError as err:
            return err.code, err.read(), time.monotonic() - started

    def cold_package(self) -> bytes:
        self._cold += 1
        return os.urandom(4096) + self._cold.to_bytes(8, "big")

    def listing(self) -> dict[str, object]:
        """What lies outside the code dir: the stack root's names and the sibling tree."""
        names = sorted(os.listdir(self.root / "stack"))
        return {"names": names, "sibling": snapshot(self.sibling)}


@pytest.fixture(scope="module")
def live() -> Iterator[LiveAgent]:
    root = Path(tempfile.mkdtemp(prefix="cachesvc-fuzz-"))
    try:
        with LiveAgent(root) as agent:
            yield agent
    finally:
        remove_tree(root)  # not shutil.rmtree: whatever a case left, of any depth


def check_code_dir(code: Path) -> None:
    """Only finished trees and their manifests, no temp leftovers."""
    for name in set(os.listdir(code)) - {".lock"}:  # the agent's own lock file
        assert not name.startswith(".tmp-"), f"temp leftover {name}"
        info = os.lstat(code / name)
        if name.endswith(".json"):
            assert stat.S_ISREG(info.st_mode), name
        else:
            assert stat.S_ISDIR(info.st_mode), name
            check_tree(code / name)


def check_tree(tree: Path) -> None:
    """Inside a tree: plain files and directories only, never setuid, setgid or
    sticky. Iterative (Python 3.11's ``os.walk`` recurses)."""
    pending = [str(tree)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), entry.path
                assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), entry.path
                if stat.S_ISDIR(mode):
                    pending.append(entry.path)


@given(case=mutants.packages())
@budget(short=120)
def test_any_mutated_package_is_answered_and_hurts_nothing(
    live: LiveAgent, case: tuple[str, bytes]
) -> None:
    kind, data = case
    digest = live.publish(data)
    status, body, took = live.request("POST", f"/pkg/{digest}/unpack")
    doc = json.loads(body)
    event(f"{kind}: {status} {doc.get('error', 'ok')}")
    if "took over" in str(doc.get("detail", "")):
        event(f"{kind}: killed at the time budget")

    assert status in (200, 413, 422), doc
    assert status == 200 or doc["error"] in CODES[status], doc
    assert took < ANSWER_BOUND
    check_code_dir(live.code)
    if status == 200:
        assert doc["path"] == str(live.code / digest.hex)
    else:
        assert digest.hex not in os.listdir(live.code)
    assert live.listing() == live.outside
    assert live.request("GET", "/healthz")[0] == 200
    cold = live.cold_package()
    status, served, _ = live.request("GET", f"/pkg/{live.publish(cold)}")
    assert (status, served == cold) == (200, True)


@given(case=mutants.packages())
@budget(short=400, scale=10)
def test_extract_raises_nothing_but_contract_errors(case: tuple[str, bytes]) -> None:
    kind, data = case
    root = Path(tempfile.mkdtemp(prefix="cachesvc-fuzz-"))
    try:
        (root / "pkg").write_bytes(data)
        (root / "out").mkdir()
        for arriving in (False, True):  # read whole, and read as it arrives (a feed)
            (root / "out").mkdir(exist_ok=True)
            try:
                found = extract_either(root / "pkg", root / "out", arriving)
                event(f"{kind}: ok")
                assert found.files >= 0
            except (TooLarge, UnsafeArchive, UnsupportedFormat) as exc:
                event(f"{kind}: {exc.code}")
            assert sorted(os.listdir(root)) == ["out", "pkg"]
            check_tree(root / "out")
            remove_tree(root / "out")
    finally:
        remove_tree(root)


def extract_either(package: Path, dest: Path, arriving: bool) -> Extracted:
    """``extract`` of the file, or of the same bytes through a feed that says
    they are all readable (the growing-file path of a cold unpack)."""
    if not arriving:
        return extract(package, dest, Limits())
    read, write = os.pipe()
    fd = os.open(package, os.O_RDONLY)
    try:
        os.write(write, b"%d\n" % package.stat().st_size)
        os.close(write)
        return extract(GrowingFile(fd, read, package.stat().st_size), dest, Limits())
    finally:
        os.close(fd)
        os.close(read)
