"""Rot under a running agent: the scrubber finds it within one interval, the
entry is dropped, and the next GET is served the right bytes (refetched); a
blob cut short is never opened for serving."""

from __future__ import annotations

import os

from tests.conftest import OriginFixture
from tests.http import fetch, get_json
from tests.servers import Stack, eventually, flip_byte, metric, metrics_of, payload

MiB = 1 << 20


async def wait_for_commit(agent: str) -> None:
    """The fill answers before it renames and indexes the blob: wait for that (bounded: 30 s)."""

    async def committed() -> bool:
        return bool((await get_json(f"{agent}/stats"))[1]["entries"] == 1)

    await eventually(committed, "the fill committed", step=0.05)


async def wait_for_passes(agent: str, n: int) -> str:
    """Metrics text once ``n`` more full scrub passes have finished (bounded: 30 s)."""
    start = metric(await metrics_of(agent), "cachesvc_scrub_passes_total")

    async def after_passes() -> str | None:
        text = await metrics_of(agent)
        return text if metric(text, "cachesvc_scrub_passes_total") >= start + n else None

    return await eventually(after_passes, f"{n} more scrub passes", step=0.05)


async def test_a_byte_flipped_under_a_running_agent_is_found_and_refetched(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    data = payload(2 * MiB, seed=5)
    digest = await file_origin.put(data)
    agent = await file_stack.start_agent(peers=[], scrub_interval=0.05)
    assert await fetch(f"{agent}/pkg/{digest}") == (200, "ORIGIN", data)
    await wait_for_commit(agent)

    blob = file_stack.root / "agent-0" / "blobs" / "sha256" / digest.hex
    flip_byte(blob, MiB)

    # Two passes end after the flip: the second started after it and read every entry.
    text = await wait_for_passes(agent, 2)
    assert metric(text, "cachesvc_corrupt_total", found_by="scrub") == 1
    assert metric(text, "cachesvc_scrub_bytes_total") >= len(data)
    assert not blob.exists()
    assert await fetch(f"{agent}/pkg/{digest}") == (200, "ORIGIN", data)
    assert await fetch(f"{agent}/pkg/{digest}") == (200, "L1", data)


async def test_a_blob_cut_short_while_closed_is_dropped_and_refetched(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    data = payload(4 * MiB, seed=6)
    digest = await file_origin.put(data)
    agent = await file_stack.start_agent(peers=[])
    assert await fetch(f"{agent}/pkg/{digest}") == (200, "ORIGIN", data)  # served from the fill
    await wait_for_commit(agent)
    blob = file_stack.root / "agent-0" / "blobs" / "sha256" / digest.hex

    def cut(_settings: object) -> None:  # while the agent (and its handle) is closed
        blob.chmod(0o644)
        os.truncate(blob, MiB)

    await file_stack.restart(agent, cut)
    assert await fetch(f"{agent}/pkg/{digest}") == (200, "ORIGIN", data)
    text = await metrics_of(agent)
    assert metric(text, "cachesvc_corrupt_total", found_by="startup") == 1
