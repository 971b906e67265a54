"""Signed GETs and HEADs of objects on a custom S3 endpoint (MinIO, SeaweedFS,
moto; path-style ``{endpoint}/{bucket}/{key}``), without botocore's
per-request pipeline. Used for :class:`~cachesvc.upstream.origin.S3Origin`'s
blob reads only; on AWS itself (no endpoint) aiobotocore stays (regions,
virtual hosting, redirects).

* Signed by botocore's own SigV4 signer and credentials (refreshed as botocore
  refreshes them); one shared aiohttp session; bodies read as received.
* Failures are botocore ``ClientError`` s (code and message from the XML
  error body; a HEAD's code is its status), so the origin maps them in one place.
* Connection failures and 5xx are tried three times, 0.1 s and 0.4 s apart,
  only before the first body byte.

Why: aiobotocore spent ~1.5 ms of CPU per GET before the first byte (py-spy,
over half a peer's CPU per miss).
"""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import ClientError, NoCredentialsError

ATTEMPTS = 3
BACKOFF = (0.1, 0.4)  # seconds before the second and third attempt
ERROR_BODY_MAX = 64 << 10
READ_BUFSIZE = 4 << 20


class SignedReads:
    """GET/HEAD of ``{endpoint}/{bucket}/{key}``, signed; one per origin."""

    def __init__(
        self, endpoint: str, bucket: str, region: str, credentials: Any, timeout: float
    ) -> None:
        self._base = f"{endpoint.rstrip('/')}/{quote(bucket)}/"
        self._region = region
        self._credentials = credentials  # botocore (refreshable) credentials, or None
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64),
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=min(5.0, self._timeout), sock_read=self._timeout
                ),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def get(
        self, key: str, headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer to a signed GET of ``key`` (2xx only: else ``ClientError``)."""
        resp = await self._send("GET", key, headers or {})
        try:
            yield resp
        finally:
            resp.release()

    async def head(self, key: str) -> Mapping[str, str]:
        """The headers of a signed HEAD of ``key`` (2xx only: else ``ClientError``)."""
        resp = await self._send("HEAD", key, {})
        resp.release()
        return resp.headers

    async def _send(
        self, method: str, key: str, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(BACKOFF[attempt - 1])
            url = self._base + quote(key)
            signed = await self._sign(method, url, headers)
            try:
                async with asyncio.timeout(self._timeout):
                    resp = await self._client().request(method, url, headers=signed)
            except (aiohttp.ClientConnectionError, OSError):
                if attempt + 1 < ATTEMPTS:
                    continue
                raise
            if resp.status < 300:
                return resp
            error = await _client_error(resp, method)
            if resp.status < 500 or attempt + 1 == ATTEMPTS:
                raise error
        raise AssertionError("unreachable")

    async def _sign(self, method: str, url: str, headers: Mapping[str, str]) -> dict[str, str]:
        if self._credentials is None:
            raise NoCredentialsError()
        frozen = await self._credentials.get_frozen_credentials()
        request = AWSRequest(method=method, url=url, headers=dict(headers))
        S3SigV4Auth(frozen, "s3", self._region).add_auth(request)
        return dict(request.headers.items())


async def _client_error(resp: aiohttp.ClientResponse, method: str) -> ClientError:
    """botocore's error for a non-2xx answer: code and message from the store's
    XML body (a HEAD has none: the code is the status, as botocore does)."""
    code, message = str(resp.status), resp.reason or ""
    try:
        if method != "HEAD":
            async with asyncio.timeout(2):
                body = await resp.content.read(ERROR_BODY_MAX)
            root = ET.fromstring(body)
            code = root.findtext("Code") or code
            message = root.findtext("Message") or message
    except (aiohttp.ClientError, OSError, TimeoutError, ET.ParseError):
        pass
    finally:
        resp.release()
    metadata = {"HTTPStatusCode": resp.status}
    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": metadata},
                       "GetObject" if method == "GET" else "HeadObject")  # fmt: skip
