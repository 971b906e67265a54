from __future__ import annotations

import hashlib

import pytest

from cachesvc.digest import Digest, compare
from cachesvc.errors import DigestMismatch, InvalidDigest

HEX = "ab" * 32


def test_digest_parses_with_and_without_prefix() -> None:
    assert Digest.parse(f"sha256:{HEX}") == Digest.parse(HEX)
    assert str(Digest.parse(HEX)) == f"sha256:{HEX}"
    assert Digest.parse(HEX).etag == f'"sha256:{HEX}"'


@pytest.mark.parametrize(
    "text",
    [
        HEX.upper(),
        HEX[:-1],
        HEX + "a",
        f"sha512:{HEX}",
        f"SHA256:{HEX}",
        f" {HEX}",
        f"{HEX[:32]}/{HEX[32:]}",
        "",
        "sha256:",
        f"sha256:sha256:{HEX}",
        HEX[:-1] + "\n",
    ],
)
def test_digest_refuses_anything_else(text: str) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_compare_accepts_bytes_that_hash_to_the_digest() -> None:
    compare(Digest(hashlib.sha256(b"package").hexdigest()), hashlib.sha256(b"package"), "ingest")


def test_compare_refuses_other_bytes_saying_what_was_checked_and_what_they_hash_to() -> None:
    expected = Digest(hashlib.sha256(b"package").hexdigest())
    actual = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(
        DigestMismatch, match=rf"^recheck {expected.short}: .*sha256:{actual[:12]}$"
    ):
        compare(expected, hashlib.sha256(b"other"), "recheck")
