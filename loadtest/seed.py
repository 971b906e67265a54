"""Seeding the origin for a load-test run.

Packages are random bytes (incompressible; cachesvc serves ``/pkg`` without
looking inside), published with ``cachesvc.publish.upload`` straight to the S3 server
(not through the counting proxy, so seeding never shows up as origin GETs),
and made public-read so the origin and nginx baselines can GET them unsigned.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import boto3

from cachesvc.publish.upload import publish
from cachesvc.upstream.origin import blob_key, make_origin

TENANT = "loadtest"
T = TypeVar("T")
WARM_TENANT = "loadtest-warm"  # only the warm scenario's packages: warm touches nothing else


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            block = os.urandom(min(left, 1 << 22))
            f.write(block)
            left -= len(block)


async def publish_random(
    origin: Any, s3: Any, bucket: str, role: str, index: int, size: int, workdir: Path
) -> dict[str, Any]:
    """Publish one package of ``size`` random bytes; returns its manifest entry."""
    path = workdir / f"{role}-{index}.bin"
    await asyncio.to_thread(write_random, path, size)
    tenant = WARM_TENANT if role == "warm" else TENANT
    try:
        result = await publish(origin, path, tenant, f"{role}-{index:03d}", "v1")
    finally:
        path.unlink()
    key = blob_key(result.digest)
    await asyncio.to_thread(s3.put_object_acl, Bucket=bucket, Key=key, ACL="public-read")
    return {"hex": result.digest.hex, "size": result.size}


async def bounded_gather(jobs: list[Coroutine[Any, Any, T]], limit: int = 8) -> list[T]:
    """Run ``jobs`` at most ``limit`` at a time; results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await job

    return list(await asyncio.gather(*(one(j) for j in jobs)))


async def seed(
    bucket: str, endpoint: str, plan: Mapping[str, Sequence[int]], workdir: Path
) -> dict[str, Any]:
    """Publish ``plan`` (role → package sizes) into ``s3://bucket``; returns the manifest."""
    origin = make_origin(f"s3://{bucket}", endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    manifest: dict[str, Any] = {}
    try:
        for role, sizes in plan.items():
            pkgs = await bounded_gather(
                [
                    publish_random(origin, s3, bucket, role, i, n, workdir)
                    for i, n in enumerate(sizes)
                ]
            )
            manifest[role] = {"tenant": WARM_TENANT, "packages": pkgs} if role == "warm" else pkgs
    finally:
        await origin.close()
    return manifest
