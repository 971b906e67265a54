"""The package digest: the one place a digest string is validated.

A :class:`Digest` is ``sha256:<64 lowercase hex>`` of a package's bytes exactly
as stored in the origin. Everything below the HTTP/CLI edge takes a ``Digest``,
never a ``str``. This module does not hash bodies (the store does that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cachesvc.errors import InvalidDigest

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
