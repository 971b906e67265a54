from __future__ import annotations

import pytest

from cachesvc.digest import Digest
from cachesvc.errors import InvalidDigest

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
