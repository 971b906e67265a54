"""The package digest: :class:`Digest`, the one validator of ``sha256:<64 lowercase
hex>``, and :func:`compare`, the one place a computed sha256 is checked against
the expected one (ingest, re-hash, adoption; no switch skips it). Below the
HTTP/CLI edge functions take a ``Digest``, never a ``str``. Hashes no bodies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from cachesvc.errors import DigestMismatch, InvalidDigest

HEX = re.compile(r"[0-9a-f]{64}")  # a sha256 in lowercase hex, and nothing else
PREFIX = "sha256:"


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated sha256 digest. Construct it only through :meth:`parse`."""

    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Accept ``sha256:<hex>`` or bare ``<hex>``; 64 lowercase hex digits only.

        Raises :class:`InvalidDigest` for anything else: upper case, another
        algorithm, wrong length, stray characters (``/``, ``%``, whitespace).
        """
        hex_part = text[len(PREFIX) :] if text.startswith(PREFIX) else text
        if not HEX.fullmatch(hex_part):
            shown = text if len(text) <= 80 else text[:77] + "..."
            raise InvalidDigest(f"{shown!r} is not sha256:<64 lowercase hex>")
        return cls(hex_part)

    def __str__(self) -> str:
        return PREFIX + self.hex

    @property
    def short(self) -> str:
        """``sha256:ab12cd34ef56`` for log lines."""
        return PREFIX + self.hex[:12]

    @property
    def etag(self) -> str:
        """The strong HTTP entity tag, ``"sha256:<hex>"``."""
        return f'"{self}"'


class Hashed(Protocol):
    """A sha256 over a package's bytes (``hashlib.sha256()`` after its updates)."""

    def hexdigest(self) -> str: ...


def compare(digest: Digest, hashed: Hashed, what: str) -> None:
    """The one comparison of computed and expected sha256 in cachesvc.
    Raises :class:`DigestMismatch` (``what``: ingest, recheck, adopt, ...)."""
    actual = hashed.hexdigest()
    if actual != digest.hex:
        raise DigestMismatch(f"{what} {digest.short}: bytes hash to sha256:{actual[:12]}")
