"""The peer-list parser (the one validator of --peers, --advertise and warm --peers),
and the membership that follows a DNS name into the ring (resolver injected)."""

from __future__ import annotations

import pytest

from cachesvc.upstream.membership import Membership, parse_base_url, parse_peers, peer_list
from cachesvc.upstream.ring import Ring


@pytest.mark.parametrize(
    ("spec", "static", "dns"),
    [
        ("", [], None),
        ("http://10.0.0.5:8701", ["http://10.0.0.5:8701"], None),
        ("http://a:1/, http://b.example:2,", ["http://a:1", "http://b.example:2"], None),
        ("http://[fd00::5]:8701", ["http://[fd00::5]:8701"], None),
        ("https://peer.example:443", ["https://peer.example:443"], None),
        ("dns+http://cachesvc-peer.ns.svc.cluster.local:8701", [],
         ("cachesvc-peer.ns.svc.cluster.local", 8701)),
    ],
)  # fmt: skip
def test_well_formed_peer_lists_parse(
    spec: str, static: list[str], dns: tuple[str, int] | None
) -> None:
    assert parse_peers(spec) == (static, dns)


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("http://h:notaport", "port 'notaport' is not a number from 1 to 65535"),
        ("http://x", "no port"),
        ("http://h:1/path", "a path, query or fragment ('/path') is not allowed"),
        ("http://h:1?q=1", "a path, query or fragment ('?q=1') is not allowed"),
        ("http://h:1#top", "a path, query or fragment ('#top') is not allowed"),
        ("h:1", "no scheme"),
        ("ftp://h:1", "scheme ftp:// is not http:// or https://"),
        ("http://user:pw@h:1", "user info ('user:pw') is not allowed"),
        ("http://:1", "no host"),
        ("http://h_1:1", "host 'h_1' is not an IP address or host name"),
        ("http://10.0.0.300:1", "host '10.0.0.300' is not an IP address or host name"),
        ("http://[nope]:1", "host '[nope]' is not an IP address or host name"),
        ("http://h:0", "port '0' is not a number from 1 to 65535"),
        ("http://h:65536", "port '65536' is not a number from 1 to 65535"),
        ("http://a:1,b:2", "entry 'b:2': no scheme"),
        ("http://a:1,http://a:1/", "'http://a:1' is listed twice"),
        ("dns+http://peers", "no port"),
        ("dns+https://peers:1", "scheme dns+https:// is not dns+http://"),
        ("dns+http://peers:1,http://a:1", "'dns+http://peers:1' must be the only entry"),
    ],
)
def test_malformed_peer_lists_are_refused_saying_what_is_wrong(spec: str, why: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_peers(spec)
    assert str(caught.value) == f"{why}; use http://HOST:PORT,... or dns+http://NAME:PORT"


def test_the_checked_list_is_what_the_ring_is_built_from() -> None:
    spec = peer_list(" http://a:1/ ,http://b:2 ")
    assert spec == "http://a:1,http://b:2"
    ring = Ring()
    Membership(ring, spec)
    assert sorted(ring.nodes) == ["http://a:1", "http://b:2"]


def test_a_base_url_drops_its_trailing_slash_and_refuses_a_path() -> None:
    assert parse_base_url("http://127.0.0.1:8700/") == "http://127.0.0.1:8700"
    with pytest.raises(ValueError, match=r"^a path, query or fragment \('/pkg'\) is not allowed"):
        parse_base_url("http://127.0.0.1:8700/pkg")


class Answers:
    """A resolver that gives scripted DNS answers in turn: a list of peer
    URLs, or an exception to raise (the lookup failed)."""

    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, name: str, port: int) -> list[str]:
        self.asked.append((name, port))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


DNS = "dns+http://cachesvc-peer.ns.svc:8701"
A, B, C = "http://10.0.0.1:8701", "http://10.0.0.2:8701", "http://10.0.0.3:8701"


async def test_a_dns_membership_follows_each_answer_into_the_ring() -> None:
    ring = Ring()
    resolver = Answers([A, B], [B, C])
    membership = Membership(ring, DNS, resolver=resolver)
    await membership.refresh()
    assert ring.nodes == (A, B)
    await membership.refresh()
    assert ring.nodes == (B, C)
    assert resolver.asked == [("cachesvc-peer.ns.svc", 8701)] * 2


@pytest.mark.parametrize(
    "bad",
    [[], OSError("Name or service not known"), TimeoutError()],
    ids=["no-addresses", "lookup-error", "lookup-timeout"],
)
async def test_an_empty_or_failed_lookup_keeps_the_last_membership(
    bad: list[str] | Exception,
) -> None:
    """A DNS hiccup (or a moment with no ready pod) must not empty the ring:
    every agent would then skip the peers and go to the origin."""
    ring = Ring()
    membership = Membership(ring, DNS, resolver=Answers([A, B], bad, [A, C]))
    await membership.refresh()
    await membership.refresh()
    assert ring.nodes == (A, B)
    await membership.refresh()  # and the next good answer is taken
    assert ring.nodes == (A, C)


async def test_a_static_membership_never_resolves_nor_changes() -> None:
    ring = Ring()
    resolver = Answers()
    membership = Membership(ring, f"{A},{B}", resolver=resolver)
    await membership.start()
    await membership.refresh()
    await membership.close()
    assert ring.nodes == (A, B) and resolver.asked == []
