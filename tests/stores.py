"""A real content-addressed store as tests fill and damage it: ``put`` bytes
through a verified ingest, make a read-only blob ``writable`` to damage it,
and make reads of one file ``failing`` with an OS error (the one place the
tests patch ``os``: an injected disk fault)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from cachesvc.digest import Digest
from cachesvc.store.blob import READ_FLAGS, Blob
from cachesvc.store.castore import Store
from cachesvc.store.recheck import Recheck
from tests.servers import digest_of

KiB = 1024


def writable(path: Path) -> Path:
    """Blobs are read-only (0444); root ignores that, but a test must not rely on it."""
    path.chmod(0o644)
    return path


async def put(store: Store, data: bytes, digest: Digest | None = None) -> None:
    """Ingest ``data`` in 100 KiB writes and commit it (under ``digest``, its
    own unless given: a wrong one fails the commit)."""
    ingest = await store.begin(digest or digest_of(data), len(data))
    try:
        for i in range(0, len(data), 100 * KiB):
            await ingest.write(data[i : i + 100 * KiB])
        await store.commit(await ingest.verify())
    finally:
        await ingest.close()


@contextmanager
def failing(name: str, call: str, err: int) -> Iterator[None]:
    """Inject ``err`` into ``os.open`` (reads only) or ``os.pread`` of the file ``name``."""
    real = getattr(os, call)

    def fake(*args: Any, **kw: Any) -> Any:
        target = args[0] if call == "open" else os.readlink(f"/proc/self/fd/{args[0]}")
        reading = call == "pread" or args[1] == READ_FLAGS
        if reading and str(target).endswith(name):
            raise OSError(err, os.strerror(err), str(target))
        return real(*args, **kw)

    with mock.patch(f"os.{call}", fake):
        yield


async def hashed(store: Store, blob: Blob, found_by: str) -> Recheck:
    """A recheck of the leased ``blob`` stepped to its last byte: its verdict is
    ready, nothing is settled yet (the caller settles and closes it)."""
    check = store.recheck(blob, found_by=found_by)
    while await check.step():
        pass
    return check
