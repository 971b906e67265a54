"""The origin, where every package lives for good: the :class:`Origin` protocol
over one layout (``blobs/sha256/<hex>``,
``tenants/<tenant>/<function>/<version>.json``), as :class:`S3Origin`
(``s3://BUCKET[/PREFIX]``, aioboto3; blob reads on a custom endpoint through
:mod:`cachesvc.upstream.s3reads`) and :class:`FileOrigin` (``file:///DIR``,
the default of ``cachesvc up``). Neither verifies nor keeps bytes.

* Bodies are streamed, never read whole.
* Every S3 call has a timeout; retries are bounded (botocore's standard mode,
  2 attempts; s3reads' 3 before the first body byte).
* Every botocore/OS failure is mapped in one place (:func:`_mapped`) to
  ``NotFound``, ``UpstreamTimeout`` or ``UpstreamError``, saying what we asked
  and what the store said, with a hint when it refused our credentials.
* :meth:`Origin.probe` never raises; readiness caches its answer.
* ``FileOrigin`` writes atomically (temp beside the target, then rename).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlparse

import aiohttp

from cachesvc.config import parse_origin
from cachesvc.digest import Digest
from cachesvc.errors import CachesvcError, NotFound, UpstreamError, UpstreamTimeout
from cachesvc.upstream.s3reads import SignedReads
from cachesvc.upstream.source import Body, Opened

CHUNK = 1 << 20


@dataclass(frozen=True)
class Probe:
    """One check of the origin. ``refused``: it answered and said no (credentials,
    permissions, no such bucket or directory), as opposed to not answering."""

    ok: bool
    refused: bool = False
    reason: str = ""  # "" when ok; else "origin <url>: <what it said>"


PROBE_OK = Probe(True)


class Origin(Protocol):
    url: str

    async def start(self) -> None: ...

    async def probe(self) -> Probe:
        """Whether the origin answers and accepts us; never raises."""

    def open(self, digest: Digest, offset: int = 0) -> Opened:
        """The body from byte ``offset``; :class:`NotFound` if absent."""

    async def head(self, digest: Digest) -> int:
        """The package's size; :class:`NotFound` if absent."""

    async def read_text(self, key: str) -> str: ...

    async def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the origin root), sorted."""

    async def put_file(self, key: str, path: Path) -> None: ...

    async def put_text(self, key: str, text: str) -> None: ...

    async def close(self) -> None: ...


def blob_key(digest: Digest) -> str:
    return f"blobs/sha256/{digest.hex}"


def make_origin(url: str, s3_endpoint: str | None = None, timeout: float = 30.0) -> Origin:
    """``s3://bucket[/prefix]`` or ``file:///dir`` (checked by
    :func:`cachesvc.config.parse_origin`, as the ``--origin`` flags are) →
    an :class:`Origin`."""
    try:
        parsed = urlparse(parse_origin(url))
    except ValueError as exc:
        raise ValueError(f"--origin {url!r}: {exc}") from None
    if parsed.scheme == "s3":
        return S3Origin(parsed.netloc, parsed.path.strip("/"), s3_endpoint, timeout)
    return FileOrigin(Path(parsed.path), timeout)


# Error codes with which an S3 store refuses who we are or what we may do.
CREDENTIAL_CODES = frozenset(
    ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "ExpiredToken",
     "InvalidToken", "TokenRefreshRequired", "NoCredentialsError", "PartialCredentialsError")
)  # fmt: skip
CREDENTIAL_HINT = (
    "check the origin credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_SESSION_TOKEN or the AWS config files) and what they may do on the bucket"
)


def describe(exc: BaseException) -> tuple[str, bool]:
    """What the origin said, for people, and whether it was a refusal (it answered
    4xx, or we had no credentials to send) rather than no answer or a 5xx.

    botocore's ``ClientError`` text ("An error occurred (X) when calling the Y
    operation: ...") is rebuilt as ``X: message`` with a hint on refusals of
    our credentials. A HEAD answer has no body, so its 403 has no code: say so.
    """
    response: dict[str, Any] = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", "")) or type(exc).__name__
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = str(response.get("Error", {}).get("Message", "")) if response else str(exc)
    if isinstance(exc, TimeoutError):
        return "no answer in time", False
    if code == "403" and status == 403:
        code, message = "403 Forbidden", "a HEAD answer carries no error code"
    text = f"{code}: {message}" if message and message != code else code
    credentials = code in CREDENTIAL_CODES or status == 403
    if credentials:
        text += f" ({CREDENTIAL_HINT})"
    return text, credentials or 400 <= status < 500


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Map botocore and OS failures to contract errors, with what we were doing."""
    try:
        yield
    except CachesvcError:
        raise
    except FileNotFoundError as exc:
        raise NotFound(f"{what}: not in the origin") from exc
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{what}: origin timed out") from exc
    except Exception as exc:
        name = type(exc).__name__
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            raise NotFound(f"{what}: not in the origin") from exc
        if "Timeout" in name:
            raise UpstreamTimeout(f"{what}: origin timed out ({name})") from exc
        text, refused = describe(exc)
        raise UpstreamError(f"{what}: origin {'refused' if refused else 'failed'}: {text}") from exc


class S3Origin:
    """An S3-compatible bucket. Call :meth:`start` before use (the app's cleanup_ctx does)."""

    def __init__(self, bucket: str, prefix: str, endpoint: str | None, timeout: float) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint = endpoint
        self.timeout = timeout
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self._client: Any = None  # aioboto3's S3 client and its __aexit__: untyped
        self._exit: Any = None
        self._reads: SignedReads | None = None  # blob reads on a custom endpoint

    async def start(self) -> None:
        import aioboto3
        from botocore.config import Config

        config = Config(
            connect_timeout=min(5.0, self.timeout),
            read_timeout=self.timeout,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint else {},
            max_pool_connections=64,
        )
        session = aioboto3.Session()
        ctx = session.client("s3", endpoint_url=self.endpoint, config=config)
        self._client = await ctx.__aenter__()
        self._exit = ctx.__aexit__
        if self.endpoint:
            region = self._client.meta.region_name or "us-east-1"
            credentials = await session.get_credentials()
            self._reads = SignedReads(self.endpoint, self.bucket, region, credentials, self.timeout)

    async def close(self) -> None:
        if self._reads is not None:
            await self._reads.close()
            self._reads = None
        if self._exit is not None:
            await self._exit(None, None, None)
            self._client = self._exit = None

    async def _ready(self) -> Any:
        if self._client is None:
            await self.start()
        return self._client

    async def probe(self) -> Probe:
        """One ListObjectsV2 of at most one key under the prefix: the endpoint
        answers, accepts our signature, and the bucket exists. Never raises.

        Not HeadBucket: a HEAD answer has no body, so its 403 could not say
        SignatureDoesNotMatch from AccessDenied. Listing needs the List
        permission, which the services need anyway (warm lists references)."""
        try:
            client = await self._ready()
            async with asyncio.timeout(self.timeout):
                await client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except Exception as exc:
            text, refused = describe(exc)
            return Probe(False, refused, f"origin {self.url}: {text}")
        return PROBE_OK

    @asynccontextmanager
    async def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[Body]:
        client = await self._ready()
        if self._reads is not None:
            async with self._open_signed(digest, offset) as body:
                yield body
            return
        key = self.prefix + blob_key(digest)
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        with _mapped(f"GET {self.url}/{blob_key(digest)}"):
            async with asyncio.timeout(self.timeout):
                resp = await client.get_object(Bucket=self.bucket, Key=key, **extra)
            size = _total_size(resp)
            stream = resp["Body"]
            try:
                yield Body(size, offset, self._chunks(stream, digest))
            finally:
                stream.close()

    @asynccontextmanager
    async def _open_signed(self, digest: Digest, offset: int) -> AsyncIterator[Body]:
        """The blob through :class:`SignedReads` (custom endpoints)."""
        assert self._reads is not None
        what = f"GET {self.url}/{blob_key(digest)}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with _mapped(what):
            async with self._reads.get(self.prefix + blob_key(digest), headers) as resp:
                size = _signed_size(resp, offset, what)
                yield Body(size, offset, self._signed_chunks(resp, digest))

    async def _signed_chunks(
        self, resp: aiohttp.ClientResponse, digest: Digest
    ) -> AsyncIterator[bytes]:
        with _mapped(f"read {self.url}/{blob_key(digest)}"):
            while chunk := (await resp.content.readchunk())[0]:  # as received, no join
                yield chunk

    # stream: botocore's StreamingBody (untyped)
    async def _chunks(self, stream: Any, digest: Digest) -> AsyncIterator[bytes]:
        with _mapped(f"read {self.url}/{blob_key(digest)}"):
            async for chunk in stream.iter_chunks(CHUNK):
                yield chunk

    async def head(self, digest: Digest) -> int:
        client = await self._ready()
        key = self.prefix + blob_key(digest)
        with _mapped(f"HEAD {self.url}/{blob_key(digest)}"):
            async with asyncio.timeout(self.timeout):
                try:
                    if self._reads is not None:
                        return int((await self._reads.head(key))["Content-Length"])
                    resp = await client.head_object(Bucket=self.bucket, Key=key)
                except Exception as exc:
                    await self._explain_refusal(exc, key)
                    raise
            return int(resp["ContentLength"])

    async def _explain_refusal(self, exc: Exception, key: str) -> None:
        """A HEAD refused with a bare 403 (no body, so no error code): ask for the
        first byte once, and raise *that* answer's error, which names the cause
        (SignatureDoesNotMatch, AccessDenied...). Costs a request only on refusal."""
        response: dict[str, Any] = getattr(exc, "response", None) or {}
        if response.get("Error", {}).get("Code") != "403":
            return
        resp = await self._client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
        resp["Body"].close()  # allowed after all: let the HEAD's own error stand

    async def read_text(self, key: str) -> str:
        client = await self._ready()
        with _mapped(f"GET {self.url}/{key}"):
            async with asyncio.timeout(self.timeout):
                resp = await client.get_object(Bucket=self.bucket, Key=self.prefix + key)
                async with resp["Body"] as stream:
                    data: bytes = await stream.read()
            return data.decode()

    async def list_keys(self, prefix: str) -> list[str]:
        client = await self._ready()
        keys: list[str] = []
        with _mapped(f"LIST {self.url}/{prefix}"):
            paginator = client.get_paginator("list_objects_v2")
            async with asyncio.timeout(self.timeout * 4):
                async for page in paginator.paginate(
                    Bucket=self.bucket, Prefix=self.prefix + prefix
                ):
                    keys += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        return sorted(keys)

    async def put_file(self, key: str, path: Path) -> None:
        client = await self._ready()
        with _mapped(f"PUT {self.url}/{key}"), open(path, "rb") as f:
            await client.upload_fileobj(f, self.bucket, self.prefix + key)

    async def put_text(self, key: str, text: str) -> None:
        client = await self._ready()
        with _mapped(f"PUT {self.url}/{key}"):
            await client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=text.encode())


def _signed_size(resp: aiohttp.ClientResponse, offset: int, what: str) -> int:
    """The whole package's size from a signed GET's answer; a store that
    ignored our range would send the wrong bytes from the wrong place."""
    if not offset:
        if resp.content_length is None:
            raise UpstreamError(f"{what}: the origin sent no Content-Length")
        return int(resp.content_length)
    total = range_total(resp.headers.get("Content-Range", ""), offset)
    if resp.status != 206 or total is None:
        got = f"{resp.status} {resp.headers.get('Content-Range')!r}"
        raise UpstreamError(f"{what}: asked from byte {offset}, got {got}")
    return total


def range_total(content_range: str, offset: int) -> int | None:
    """The whole size in ``Content-Range: bytes {offset}-b/total``, the answer
    to a ``Range: bytes={offset}-``; None if it answers something else."""
    total = content_range.rsplit("/", 1)[-1]
    if not content_range.startswith(f"bytes {offset}-") or not total.isdigit():
        return None
    return int(total)


def _total_size(resp: dict[str, Any]) -> int:  # botocore's GetObject answer
    content_range = resp.get("ContentRange")  # "bytes a-b/total" on ranged GETs
    if content_range:
        return int(content_range.rsplit("/", 1)[1])
    return int(resp["ContentLength"])


class FileOrigin:
    """The origin layout in a local directory; reads run in threads."""

    def __init__(self, root: Path, timeout: float = 30.0) -> None:
        self.root = root
        self.timeout = timeout
        self.url = f"file://{root}"

    async def start(self) -> None:
        """Nothing to open. The directory is not created here: a service pointed
        at a mistyped path must say so (:meth:`probe`), not serve an empty origin.
        Writers (``publish``) create what they write."""
        return None

    async def close(self) -> None:
        return None

    async def probe(self) -> Probe:
        """The directory exists and can be listed. Never raises."""
        try:
            await asyncio.to_thread(_list_one, self.root)
        except OSError as exc:
            return Probe(False, True, f"origin {self.url}: cannot list {self.root}: {exc.strerror}")
        return PROBE_OK

    @asynccontextmanager
    async def open(self, digest: Digest, offset: int = 0) -> AsyncIterator[Body]:
        path = self.root / blob_key(digest)
        with _mapped(f"open {path}"):
            f = await asyncio.to_thread(open, path, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            yield Body(size, offset, self._chunks(f, path))
        finally:
            f.close()

    async def _chunks(self, f: BinaryIO, path: Path) -> AsyncIterator[bytes]:
        with _mapped(f"read {path}"):
            while chunk := await asyncio.to_thread(f.read, CHUNK):
                yield chunk

    async def head(self, digest: Digest) -> int:
        path = self.root / blob_key(digest)
        with _mapped(f"stat {path}"):
            return (await asyncio.to_thread(path.stat)).st_size

    async def read_text(self, key: str) -> str:
        with _mapped(f"read {self.root / key}"):
            return await asyncio.to_thread((self.root / key).read_text)

    async def list_keys(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            base = self.root / prefix
            if not base.is_dir():
                return []
            return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

        return await asyncio.to_thread(walk)

    async def put_file(self, key: str, path: Path) -> None:
        await asyncio.to_thread(self._put, key, None, path)

    async def put_text(self, key: str, text: str) -> None:
        await asyncio.to_thread(self._put, key, text.encode(), None)

    def _put(self, key: str, data: bytes | None, src: Path | None) -> None:
        """Atomic: write beside the target, then rename."""
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        with open(tmp, "wb") as out:
            if data is not None:
                out.write(data)
            else:
                assert src is not None
                with open(src, "rb") as f:
                    while block := f.read(CHUNK):
                        out.write(block)
        os.replace(tmp, target)


def _list_one(root: Path) -> None:
    with os.scandir(root) as entries:
        next(entries, None)


def read_reference(text: str, key: str) -> dict[str, Any]:
    """Parse a package reference JSON; raise :class:`UpstreamError` when malformed."""
    try:
        ref = json.loads(text)
        Digest.parse(ref["digest"])
        int(ref.get("size", 0))
    except (ValueError, KeyError, TypeError, CachesvcError) as exc:
        raise UpstreamError(f"reference {key} is malformed: {exc}") from exc
    return dict(ref)
