"""Host-made bytecode through a real agent: ``--runtime``, the unpack hint, the status route."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tests.archives import make_zip
from tests.conftest import OriginFixture
from tests.http import get_json, post_json
from tests.pysources import package_files
from tests.servers import Stack, eventually, metric, metrics_of

RUNTIME = f"python3.11={sys.executable}"


async def test_an_agent_with_a_runtime_compiles_an_unpacked_tree_after_answering(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[], runtimes=(RUNTIME,))
    files = package_files(30, 30)
    digest = await file_origin.put(make_zip(files))
    status, body = await post_json(f"{agent}/pkg/{digest}/unpack?modules=handler,app.core")
    assert status == 200
    tree = Path(body["path"])

    async def finished() -> dict[str, Any] | None:
        _status, state = await get_json(f"{agent}/pkg/{digest}/bytecode")
        return state if state["state"] == "done" else None

    state = await eventually(finished, "the host compile finished")
    assert state["hints"] == ["handler", "app.core"] and state["swaps"] == 2
    rt = state["runtimes"]["python3.11"]
    assert (rt["cache_tag"], rt["compiled"], rt["skipped"]) == (sys.implementation.cache_tag, 63, 1)
    assert rt["skips"][0][0] == "app/broken.py"
    assert (tree / f"app/core/__pycache__/m3.{rt['cache_tag']}.pyc").is_file()
    text = await metrics_of(agent)
    assert (
        metric(text, "cachesvc_bytecode_files_total", runtime="python3.11", outcome="compiled")
        == 63
    )
    assert (
        metric(text, "cachesvc_bytecode_files_total", runtime="python3.11", outcome="skipped") == 1
    )


async def test_a_bad_hint_is_refused_before_any_work(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[], runtimes=(RUNTIME,))
    digest = await file_origin.put(make_zip(package_files(1, 1)))
    status, body = await post_json(f"{agent}/pkg/{digest}/unpack?modules=../etc/passwd")
    assert status == 400 and body["error"] == "invalid_request"
    assert not (file_stack.root / "agent-0-code" / digest.hex).exists()


async def test_an_agent_without_runtimes_compiles_nothing(
    file_stack: Stack, file_origin: OriginFixture
) -> None:
    agent = await file_stack.start_agent(peers=[])
    digest = await file_origin.put(make_zip(package_files(1, 1)))
    status, body = await post_json(f"{agent}/pkg/{digest}/unpack?modules=handler")
    assert status == 200
    assert not list(Path(body["path"]).rglob("*.pyc"))
    status, body = await get_json(f"{agent}/pkg/{digest}/bytecode")
    assert status == 400 and "--runtime" in body["detail"]
