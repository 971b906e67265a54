"""HTTP/1.1 on the wire, as a client may send it: raw sockets against a real
agent, every case on both paths a request can take (the fast path for a hot
L1 entry, aiohttp's for the same entry asked with a query string). Responses
are parsed by h11, one after another, so each must be framed correctly.

Not here, because aiohttp's own parser answers them wrongly (they cannot be
fixed without replacing the server): a request pipelined after one that
closes the connection (``Connection: close``, or HTTP/1.0) makes aiohttp
answer ``400 Data after Connection: close`` instead of the closing request;
a client that half-closes after sending gets no answer from aiohttp (its
handler closes on EOF). The fast path answers both correctly, and is tested.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import NamedTuple

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachesvc.digest import Digest
from cachesvc.serve.service import CORE
from tests.conftest import OriginFixture
from tests.http import get
from tests.servers import Stack, metric, metrics_of, payload

SIZE = 20_000
PATHS = ["fast", "aiohttp"]  # a plain hot GET; the same with a query: aiohttp's


class Answer(NamedTuple):
    status: int
    version: bytes
    headers: dict[bytes, bytes]
    body: bytes


class Hot(NamedTuple):
    """An agent with one package open in its store, and how to ask for it."""

    agent: str
    digest: Digest
    data: bytes

    def target(self, path: str) -> str:
        return f"/pkg/{self.digest}" + ("?x=1" if path == "aiohttp" else "")


@pytest.fixture
async def hot(file_stack: Stack, file_origin: OriginFixture) -> Hot:
    agent = await file_stack.start_agent(peers=[])
    data = payload(SIZE, seed=21)
    digest = await file_origin.put(data)
    assert (await get(f"{agent}/pkg/{digest}"))[2] == data
    await file_stack.apps[agent][CORE].flights.wait_idle()  # kept: the next GET opens it
    assert (await get(f"{agent}/pkg/{digest}"))[2] == data
    return Hot(agent, digest, data)


def request(method: str, target: str, version: str = "1.1", *fields: str) -> bytes:
    lines = [f"{method} {target} HTTP/{version}", "Host: x", *fields, "", ""]
    return "\r\n".join(lines).encode()


def parse(data: bytes, methods: list[str]) -> tuple[list[Answer], bytes]:
    """The complete responses at the start of ``data`` (one per method asked,
    in order; HEAD answers have no body), and what follows them."""
    answers: list[Answer] = []
    for method in methods:
        if not data:
            break
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(data)
        answer = one_response(conn)
        if answer is None:
            break
        answers.append(answer)
        data = conn.trailing_data[0]
    return answers, data


def one_response(conn: h11.Connection) -> Answer | None:
    """The next response h11 parses from ``conn``, None if incomplete."""
    head: h11.Response | None = None
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return None
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Answer(head.status_code, head.http_version, dict(head.headers), body)


async def exchange(
    agent: str, data: bytes, methods: list[str], *, until_eof: bool = True, shut: bool = False
) -> list[Answer]:
    """Send ``data`` in one write, then read the answers: to EOF (bounded: a
    server that keeps the connection open fails the test), or until one per
    method arrived. Nothing may follow the answers."""
    host, port = agent.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        if shut:
            writer.write_eof()
        received = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
            received += chunk
            answers, rest = parse(received, methods)
            if not chunk or (not until_eof and len(answers) == len(methods)):
                break
        assert rest == b"", f"bytes after {len(answers)} whole answers: {rest[:200]!r}"
        return answers
    finally:
        writer.close()


async def fast_hits(agent: str) -> float:
    return metric(await metrics_of(agent), "cachesvc_fast_hits_total")


# -- pipelining, closing ------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_three_pipelined_gets_are_answered_in_order_and_whole(hot: Hot, path: str) -> None:
    before = await fast_hits(hot.agent)
    get_ = request("GET", hot.target(path))
    last = request("GET", hot.target(path), "1.1", "Connection: close")
    answers = await exchange(hot.agent, get_ + get_ + last, ["GET"] * 3)
    assert [(a.status, a.body) for a in answers] == [(200, hot.data)] * 3
    assert answers[-1].headers[b"connection"] == b"close"
    assert await fast_hits(hot.agent) == before + (3 if path == "fast" else 0)


@pytest.mark.parametrize("path", PATHS)
async def test_a_head_pipelined_between_gets_is_answered_without_a_body(
    hot: Hot, path: str
) -> None:
    target = hot.target(path)
    data = request("GET", target) + request("HEAD", target)
    data += request("GET", target, "1.1", "Connection: close")
    answers = await exchange(hot.agent, data, ["GET", "HEAD", "GET"])
    assert [(a.status, a.body) for a in answers] == [(200, hot.data), (200, b""), (200, hot.data)]
    assert answers[1].headers[b"content-length"] == str(SIZE).encode()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "version, fields", [("1.1", ["Connection: close"]), ("1.0", []), ("1.0", ["Connection: close"])]
)
async def test_a_closing_request_is_answered_then_the_connection_closes(
    hot: Hot, path: str, version: str, fields: list[str]
) -> None:
    data = request("GET", hot.target(path), version, *fields)
    (answer,) = await exchange(hot.agent, data, ["GET"])
    assert (answer.status, answer.version, answer.body) == (200, version.encode(), hot.data)


async def test_requests_pipelined_after_a_close_are_not_read_on_the_fast_path(hot: Hot) -> None:
    target = hot.target("fast")
    data = request("GET", target, "1.1", "Connection: close") + request("GET", target) * 2
    (answer,) = await exchange(hot.agent, data, ["GET"] * 3)
    assert (answer.status, answer.body) == (200, hot.data)


async def test_a_client_that_half_closes_after_sending_is_answered_on_the_fast_path(
    hot: Hot,
) -> None:
    data = request("GET", hot.target("fast")) * 2
    answers = await exchange(hot.agent, data, ["GET"] * 2, shut=True)
    assert [(a.status, a.body) for a in answers] == [(200, hot.data)] * 2


# -- bodies and framing ---------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_a_get_carrying_a_body_has_it_consumed_not_parsed_as_the_next_request(
    hot: Hot, path: str
) -> None:
    smuggled = request("GET", "/pkg/nope")  # were it parsed: a 400 invalid_digest
    first = request("GET", hot.target(path), "1.1", f"Content-Length: {len(smuggled)}")
    data = first + smuggled + request("GET", hot.target(path), "1.1", "Connection: close")
    answers = await exchange(hot.agent, data, ["GET"] * 3)
    assert [(a.status, a.body) for a in answers] == [(200, hot.data)] * 2


def refused_heads() -> Iterator[tuple[str, list[str] | bytes]]:
    """(name, extra header fields or a whole raw head with {target}) of
    requests every HTTP/1.1 server must refuse."""
    yield "two content lengths", ["Content-Length: 0", "Content-Length: 5"]
    yield "two equal content lengths", ["Content-Length: 0", "Content-Length: 0"]
    yield "content length and chunked", ["Content-Length: 5", "Transfer-Encoding: chunked"]
    yield "an unknown transfer coding", ["Transfer-Encoding: gzip"]
    yield "chunked not last", ["Transfer-Encoding: chunked, gzip"]
    yield "a control byte in a name", ["X-A\x01b: 1"]
    yield "a NUL in a value", ["X-A: a\x00b"]
    yield "a space before the colon", ["X-A : 1"]
    yield "obsolete line folding", ["X-A: 1", "  folded"]
    yield "no host", b"GET {target} HTTP/1.1\r\n\r\n"
    yield "two hosts", ["Host: y"]
    yield "bare LF line ends", b"GET {target} HTTP/1.1\nHost: x\n\n"
    yield "an oversize request line", b"GET {target}/" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n"
    yield "an oversize header field", ["X-Pad: " + "a" * 9000]
    yield "a header flood", [f"X-H{i}: v" for i in range(200)]
    yield "a huge header flood", [f"X-H{i}: v" for i in range(20_000)]


REFUSED = dict(refused_heads())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", list(REFUSED))
async def test_an_ambiguous_or_malformed_request_is_refused_then_the_connection_closed(
    hot: Hot, path: str, case: str
) -> None:
    """A 4xx, then EOF: never a 200, a hang, a 5xx, or the request after it
    (a hot GET pipelined behind it) answered."""
    shape = REFUSED[case]
    target = hot.target(path)
    if isinstance(shape, bytes):
        bad = shape.replace(b"{target}", target.encode())
    else:
        bad = request("GET", target, "1.1", *shape)
    before = await fast_hits(hot.agent)
    (answer,) = await exchange(hot.agent, bad + request("GET", target), ["GET"] * 2)
    assert 400 <= answer.status < 500 and hot.data not in answer.body
    assert await fast_hits(hot.agent) == before


@pytest.mark.parametrize("path", PATHS)
async def test_a_head_ended_by_bare_lfs_alone_is_refused_not_waited_for(
    hot: Hot, path: str
) -> None:
    """With nothing behind it, no CRLF CRLF ever comes: the fast path must not
    wait for one (it did, until the connection idled out)."""
    bad = f"GET {hot.target(path)} HTTP/1.1\nHost: x\n\n".encode()
    (answer,) = await exchange(hot.agent, bad, ["GET"])
    assert answer.status == 400


# -- a property over request shapes -------------------------------------------------------


class Shape(NamedTuple):
    path: str
    requests: list[tuple[str, str, bool]]  # method, version, ranged
    last: str | None  # the last request's Connection field, if any

    def closes(self) -> bool:
        return self.last == "close" or (self.last is None and self.requests[-1][1] == "1.0")


shapes = st.builds(
    Shape,
    st.sampled_from(PATHS),
    st.lists(
        st.tuples(st.sampled_from(["GET", "HEAD"]), st.sampled_from(["1.0", "1.1"]), st.booleans()),
        min_size=1,
        max_size=3,
    ),
    st.sampled_from([None, "close", "keep-alive"]),
)


def wire(shape: Shape, target: str) -> bytes:
    """The requests in one write: all but the last keep the connection (a
    request pipelined after a closing one is aiohttp's 400, see the docstring)."""
    out = b""
    for i, (method, version, ranged) in enumerate(shape.requests):
        last = i == len(shape.requests) - 1
        fields = ["Range: bytes=10-99"] if ranged else []
        if last and shape.last is not None:
            fields.append(f"Connection: {shape.last}")
        elif not last and version == "1.0":
            fields.append("Connection: keep-alive")
        out += request(method, target, version, *fields)
    return out


def check(answers: list[Answer], shape: Shape, data: bytes) -> None:
    assert len(answers) == len(shape.requests)
    for answer, (method, version, ranged) in zip(answers, shape.requests, strict=True):
        assert answer.version == version.encode()
        ranged = ranged and method == "GET"  # RFC 9110 §14.2: a HEAD's Range is ignored
        want = data[10:100] if ranged else data
        assert answer.status == (206 if ranged else 200)
        assert answer.body == (b"" if method == "HEAD" else want)
        assert answer.headers[b"content-length"] == str(len(want)).encode()


async def test_every_request_shape_gets_one_framed_right_answer_per_request(hot: Hot) -> None:
    loop = asyncio.get_running_loop()

    async def converse(shape: Shape) -> None:
        methods = [method for method, _, _ in shape.requests]
        data = wire(shape, hot.target(shape.path))
        answers = await exchange(hot.agent, data, methods, until_eof=shape.closes())
        check(answers, shape, hot.data)

    @settings(
        max_examples=25,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(shapes)
    def prop(shape: Shape) -> None:
        asyncio.run_coroutine_threadsafe(converse(shape), loop).result(timeout=60)

    await asyncio.to_thread(prop)
