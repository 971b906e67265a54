"""Hostile tar packages built byte by byte: PAX records tarfile would never write."""

from __future__ import annotations

import lzma
import struct
import tarfile
import zlib

import zstandard

END = bytes(1024)
"""The two zero blocks that end a tar."""


def block(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A ustar header for ``info`` and ``data`` padded to whole blocks."""
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def pax(records: bytes, kind: bytes = tarfile.XHDTYPE) -> bytes:
    """A PAX extended header ("x", or "g" for global) holding ``records`` verbatim."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = kind, len(records)
    return block(info, records)


def record(key: str, value: str) -> bytes:
    """One well-formed ``"<len> key=value\\n"`` record."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def member(name: str = "a.txt", data: bytes = b"hello", **fields: object) -> bytes:
    """A regular file member (or another type through ``fields``)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_600_000_000
    for key, value in fields.items():
        setattr(info, key, value)
    return block(info, data)


def pax_length_zero() -> bytes:
    """A PAX record whose length field is 0: the old parser looped on it forever."""
    return pax(b"0 path=x\n") + member() + END


def pax_size_minus_one() -> bytes:
    """PAX ``size=-1``: the old parser read the rest of the archive into memory."""
    return pax(record("size", "-1")) + member("a.txt", b"") + bytes(4 * 1024 * 1024) + END


def pax_mtime_overflow() -> bytes:
    """PAX ``mtime=1e400``: an infinite time; the old parser answered 500."""
    return pax(record("mtime", "1e400")) + member() + END


def digit_bomb(headers: int = 40, digits: int = 60_000) -> bytes:
    """tar.zst of ``headers`` members, each behind a PAX header of ``digits`` digits.

    Python 3.11.7's PAX parser is quadratic on a run of digits
    (CVE-2024-6232): 60,000 digits cost it 4-8 s of CPU here, so this
    package of a few KiB keeps a parser busy for minutes.
    """
    body = b"".join(pax(b"1" * digits) + member(f"f{i}") for i in range(headers)) + END
    return zstandard.ZstdCompressor(level=3).compress(body)


def xz_with_a_4_gib_dictionary(data: bytes) -> bytes:
    """``data`` in xz whose block header asks for a 4 GiB dictionary, which the
    decoder allocates up front (made with a 1 MiB one, then the header patched)."""
    lzma2 = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]
    raw = bytearray(lzma.compress(data, lzma.FORMAT_XZ, lzma.CHECK_CRC32, filters=lzma2))
    start, size = 12, (raw[12] + 1) * 4  # the block header follows the stream header
    header = raw[start : start + size]
    at = header.index(b"\x21\x01", 2)  # filter id LZMA2, one byte of properties
    header[at + 2] = 40  # the largest dictionary: 4 GiB - 1
    header[-4:] = struct.pack("<I", zlib.crc32(bytes(header[:-4])))
    raw[start : start + size] = header
    return bytes(raw)
