"""Hostile packages and a hostile code dir through a real agent on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cachesvc.digest import Digest
from cachesvc.errors import ConfigError
from node_agent.packages import UNPACKER
from tests import hostile
from tests.archives import tar_bytes, tar_member
from tests.codedir_mayhem import planted, snapshot
from tests.conftest import OriginFixture
from tests.http import get, post_json, request
from tests.servers import Stack, eventually, payload

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]  # seconds of hostile unpacking

ANSWER_TIMEOUT = 90.0  # seconds: an answer, however hostile the package


async def unpack(agent: str, digest: Digest) -> tuple[int, Any]:
    """(status, JSON answer) of POST /pkg/{digest}/unpack."""
    return await post_json(f"{agent}/pkg/{digest}/unpack", timeout=ANSWER_TIMEOUT)


REFUSED = {
    # The old parser looped forever on this one, on a default-pool thread.
    "PAX record of length 0": (hostile.pax_length_zero(), "unsupported_format", "corrupt tar"),
    # ... and read the rest of the archive into memory for this one.
    "PAX size -1": (hostile.pax_size_minus_one(), "unsupported_format", "negative size"),
    # The name rule itself must say no (a later check would refuse it too).
    "a/../../escape.txt": (
        tar_bytes([tar_member("a/../../escape.txt", b"bad")]),
        "unsafe_archive",
        "member path with '..'",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_a_hostile_package_is_422_at_once_naming_its_rule_and_leaves_nothing(
    file_stack: Stack, file_origin: OriginFixture, case: str
) -> None:
    package, error, rule = REFUSED[case]
    agent = await file_stack.start_agent(peers=[])
    digest = await file_origin.put(package)
    status, doc = await unpack(agent, digest)
    assert (status, doc["error"]) == (422, error)
    assert rule in str(doc["detail"])
    assert file_stack.code_entries() == set()


async def test_a_pax_mtime_of_1e400_unpacks_instead_of_a_500(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[])
    digest = await file_origin.put(hostile.pax_mtime_overflow())
    status, doc = await unpack(agent, digest)
    assert status == 200, doc
    assert (Path(str(doc["path"])) / "a.txt").read_bytes() == b"hello"


async def test_a_package_that_hangs_the_parser_is_413_within_its_budget(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[], unpack_timeout=2.0)
    digest = await file_origin.put(hostile.digit_bomb())  # minutes of tarfile CPU
    started = time.monotonic()
    status, doc = await unpack(agent, digest)
    assert (status, doc["error"]) == (413, "too_large")
    assert "took over 2 s" in str(doc["detail"])
    assert time.monotonic() - started < 60
    assert file_stack.code_entries() == set()


async def test_hostile_unpacks_at_once_never_stall_a_cold_get_of_another_package(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    """Store I/O runs on the default thread pool; a hanging parser used to hold
    its threads (six on this machine) and every cold GET then stalled."""
    agent = await file_stack.start_agent(peers=[], unpack_workers=2, unpack_timeout=5.0)
    bombs = [await file_origin.put(hostile.digit_bomb(headers=30 + i)) for i in range(4)]
    loops = [
        await file_origin.put(hostile.pax_length_zero() + bytes(512 * (i + 1))) for i in range(8)
    ]
    unpacks = [asyncio.ensure_future(unpack(agent, d)) for d in bombs + loops]
    workers = file_stack.apps[agent][UNPACKER].workers
    await eventually(lambda: len(workers.pids()) == 2, "both workers chewing", step=0.01)

    cold = payload(1 << 20, seed=7)
    digest = await file_origin.put(cold)
    started = time.monotonic()
    status, _, body = await request("GET", f"{agent}/pkg/{digest}", timeout=ANSWER_TIMEOUT)
    assert (status, body == cold) == (200, True)
    assert (
        time.monotonic() - started < 10
    )  # prompt: it needs no unpack worker and no starved thread
    assert (await get(f"{agent}/healthz")).status == 200

    answers = await asyncio.gather(*unpacks)
    assert (
        sorted((status, doc["error"]) for status, doc in answers)
        == [(413, "too_large")] * 4 + [(422, "unsupported_format")] * 8
    )
    assert file_stack.code_entries() == set()


async def test_an_agent_starts_on_a_code_dir_full_of_mayhem_and_keeps_only_what_is_valid(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    code, outside = file_stack.code_dir(), file_stack.root / "outside"
    good = tar_bytes([tar_member("handler.py", b"print(1)\n")])
    digest = await file_origin.put(good)
    first = await file_stack.start_agent(peers=[], name="agent-0")
    status, before = await unpack(first, digest)
    assert status == 200
    await file_stack.stop(first)
    with planted(code, outside) as mayhem:
        outside_before = snapshot(outside)

        agent = await file_stack.start_agent(peers=[], name="agent-0")

        left = file_stack.code_entries()
        assert left == {digest.hex, f"{digest.hex}.json"} | mayhem.kept
        assert not (left & mayhem.doomed)
        assert snapshot(outside) == outside_before
        assert (await get(f"{agent}/healthz")).status == 200
        status, again = await unpack(agent, digest)
        assert (status, again) == (200, before)
        other = await file_origin.put(tar_bytes([tar_member("other.py", b"print(2)\n")]))
        status, doc = await unpack(agent, other)
        assert status == 200
        assert (Path(str(doc["path"])) / "other.py").read_bytes() == b"print(2)\n"


async def test_unusable_unpack_settings_stop_the_start_with_one_line(file_stack: Stack) -> None:
    with pytest.raises(ConfigError, match="--unpack-workers 0"):
        await file_stack.start_agent(peers=[], unpack_workers=0)
    with pytest.raises(ConfigError, match="--unpack-timeout 0"):
        await file_stack.start_agent(peers=[], unpack_timeout=0.0)
