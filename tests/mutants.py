"""Hypothesis strategies for packages that start valid and then go wrong.

``packages()`` draws a tar, a tar.zst, a tar.gz, a zip or a zstd-over-zip
package built from members whose every field may be hostile (names, types,
sizes that lie, modes, timestamps, link fields, PAX records with wrong
lengths and odd values, GNU long names), then mutates the bytes (header
fields overwritten with the checksum fixed up or not, random flips,
truncation), before or after the compression layer.
"""

from __future__ import annotations

import io
import tarfile
import warnings
import zipfile
import zlib

import zstandard
from hypothesis import strategies as st

PARTS = ["a", "b", "lib", "..", ".", "", "ü", "x" * 120, "\\", "C:", "n\x00l", "/", "é" * 90]
PAX_KEYS = [
    "path", "size", "mtime", "linkpath", "uid", "gid", "uname", "atime", "ctime",
    "hdrcharset", "comment", "SCHILY.xattr.user.k", "GNU.sparse.major",
    "GNU.sparse.minor", "GNU.sparse.map", "GNU.sparse.size", "GNU.sparse.name",
    "GNU.sparse.realsize", "GNU.sparse.numblocks", "GNU.sparse.offset",
]  # fmt: skip
ODD_VALUES = [
    "-1", "0", "1e400", "-1e400", "nan", "inf", "9" * 40, "1.5", "", "BINARY", "0x10",
    "../../evil", "/etc/passwd", "a/../../b", "1,2,3", "\udcff", " ", "=",
]  # fmt: skip
TAR_TYPES = [
    tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
    tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
    tarfile.GNUTYPE_SPARSE, b"V", b"Z", b"M", b"N",
]  # fmt: skip
# (offset, length) of ustar header fields: name, mode, uid, gid, size, mtime,
# chksum, type, linkname, magic, version, uname, gname, devmajor, devminor, prefix.
TAR_FIELDS = [
    (0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (148, 8), (156, 1),
    (157, 100), (257, 6), (263, 2), (265, 32), (297, 32), (329, 8), (337, 8), (345, 155),
]  # fmt: skip
# Fields of zip records: (signature, offset, width) of local headers, central
# headers and the end record (counts, sizes, offsets, methods, flags, attrs).
ZIP_FIELDS = [
    (b"PK\x03\x04", 6, 2), (b"PK\x03\x04", 8, 2), (b"PK\x03\x04", 18, 4),
    (b"PK\x03\x04", 22, 4), (b"PK\x03\x04", 26, 2), (b"PK\x03\x04", 28, 2),
    (b"PK\x01\x02", 8, 2), (b"PK\x01\x02", 10, 2), (b"PK\x01\x02", 20, 4),
    (b"PK\x01\x02", 24, 4), (b"PK\x01\x02", 28, 2), (b"PK\x01\x02", 30, 2),
    (b"PK\x01\x02", 38, 4), (b"PK\x01\x02", 42, 4), (b"PK\x05\x06", 8, 2),
    (b"PK\x05\x06", 10, 2), (b"PK\x05\x06", 12, 4), (b"PK\x05\x06", 16, 4),
    (b"PK\x05\x06", 20, 2),
]  # fmt: skip
EDGE_INTS = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]

names = st.one_of(
    st.lists(st.sampled_from(PARTS), min_size=1, max_size=6).map("/".join),
    st.integers(1, 2100).map(lambda depth: "d/" * depth + "f"),
    st.text(max_size=300),
)


def numeric(value: int, width: int) -> bytes:
    """A tar number field: octal when it fits, else GNU base-256 (negatives too)."""
    digits = width - 1
    if 0 <= value < 8**digits:
        return f"{value:0{digits}o}".encode() + b"\x00"
    raw = (value % (1 << 8 * (width - 1))).to_bytes(width - 1, "big")  # 256 ** (width - 1)
    return (b"\xff" if value < 0 else b"\x80") + raw


def fix_checksum(header: bytearray) -> None:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}".encode() + b"\x00 "


@st.composite
def pax_records(draw: st.DrawFn) -> bytes:
    """PAX records with odd keys and values, each with its right length or a wrong one."""
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.one_of(st.sampled_from(PAX_KEYS), st.text(max_size=12)))
        value = draw(st.one_of(st.sampled_from(ODD_VALUES), st.text(max_size=40)))
        right = record_bytes(key, value)
        if draw(st.integers(0, 3)) == 0:
            right = str(draw(st.integers(0, 99))).encode() + right[right.index(b" ") :]
        out += right
    return out


def record_bytes(key: str, value: str) -> bytes:
    """``"<len> key=value\n"`` with the length that counts itself."""
    body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


@st.composite
def tar_member(draw: st.DrawFn) -> bytes:
    """Maybe a PAX or GNU long-name header, then one member whose fields may all lie."""
    out = b""
    if draw(st.booleans()):
        kind = draw(st.sampled_from([tarfile.XHDTYPE, tarfile.XGLTYPE]))
        out += _header_and_data("././@PaxHeader", kind, draw(pax_records()))
    if draw(st.integers(0, 5)) == 0:
        kind = draw(st.sampled_from([tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK]))
        long_name = draw(names).encode("utf-8", "surrogateescape") + b"\x00"
        out += _header_and_data("././@LongLink", kind, long_name)
    data = draw(st.binary(max_size=2048))
    info = tarfile.TarInfo("placeholder")
    info.type = draw(st.sampled_from(TAR_TYPES))
    info.linkname = draw(st.sampled_from(["", "../..", "/etc/passwd", "a", "x" * 99]))
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    raw_name = draw(names).encode("utf-8", "surrogateescape")[:100]
    header[0:100] = raw_name.ljust(100, b"\x00")  # NULs and all: ustar ends names at one
    size = draw(st.one_of(st.just(len(data)), st.integers(-(2**40), 2**40)))
    mtime = draw(st.one_of(st.integers(-(2**33), 2**34), st.integers(-(2**80), 2**80)))
    header[124:136], header[136:148] = numeric(size, 12), numeric(mtime, 12)
    header[100:108] = numeric(draw(st.integers(0, 0o7777)), 8)
    fix_checksum(header)
    return out + bytes(header) + data + bytes(-len(data) % 512)


def _header_and_data(name: str, kind: bytes, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


@st.composite
def seed_tar(draw: st.DrawFn) -> bytes:
    """A valid tar (ustar, GNU or PAX) of ordinary files, for mutations to start from."""
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as archive:
        for name, data, mode in _ordinary_files(draw):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ordinary_files(draw: st.DrawFn) -> list[tuple[str, bytes, int]]:
    count = draw(st.integers(1, 4))
    deep = "p/" * 60 + "q" * 90  # past 100 bytes: ustar prefix, PAX or GNU long names
    pool = ["handler.py", "lib/util.py", "ünï/cødé.txt", deep, "bin/run"]
    return [
        (pool[i], draw(st.binary(max_size=600)), 0o755 if i == 4 else 0o644) for i in range(count)
    ]


@st.composite
def tars(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        raw = draw(seed_tar())
    else:
        raw = b"".join(draw(st.lists(tar_member(), max_size=5)))
        raw += b"" if draw(st.integers(0, 9)) == 0 else bytes(1024)
    return draw(mutated(raw, tar=True))


@st.composite
def zips(draw: st.DrawFn) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a case worth trying
        for _ in range(draw(st.integers(0, 4))):
            info = zipfile.ZipInfo(draw(names).replace("\x00", "") or "x")
            info.compress_type = draw(
                st.sampled_from(
                    [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
                )
            )
            kind = draw(st.sampled_from([0, 0o100000, 0o040000, 0o120000, 0o010000, 0o020000]))
            info.external_attr = (kind | draw(st.integers(0, 0o7777))) << 16
            info.create_system = 3
            archive.writestr(info, draw(st.binary(max_size=2048)))
    return draw(mutated(buf.getvalue(), tar=False))


@st.composite
def mutated(draw: st.DrawFn, raw: bytes, tar: bool) -> bytes:
    """``raw`` with header fields overwritten, bytes flipped, maybe truncated."""
    data = bytearray(raw)
    for _ in range(draw(st.integers(0, 3))):
        (_tar_field if tar else _zip_field)(draw, data)
    for _ in range(draw(st.integers(0, 3))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    if data and draw(st.integers(0, 6)) == 0:
        del data[draw(st.integers(0, len(data))) :]
    return bytes(data)


def _tar_field(draw: st.DrawFn, data: bytearray) -> None:
    headers = len(data) // 512
    if not headers:
        return
    at = 512 * draw(st.integers(0, headers - 1))
    offset, width = draw(st.sampled_from(TAR_FIELDS))
    value = draw(
        st.one_of(
            st.binary(min_size=width, max_size=width),
            st.integers(-(2**60), 2**60).map(lambda v: numeric(v, width) if width > 1 else b"0"),
        )
    )
    data[at + offset : at + offset + width] = value[:width].ljust(width, b"\x00")
    if draw(st.booleans()):
        header = data[at : at + 512]
        fix_checksum(header)
        data[at : at + 512] = header


def _zip_field(draw: st.DrawFn, data: bytearray) -> None:
    signature, offset, width = draw(st.sampled_from(ZIP_FIELDS))
    spots = [i for i in range(len(data) - 3) if data[i : i + 4] == signature]
    if not spots:
        return
    at = draw(st.sampled_from(spots)) + offset
    value = draw(st.one_of(st.sampled_from(EDGE_INTS), st.integers(0, 2 ** (8 * width) - 1)))
    data[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")


@st.composite
def packages(draw: st.DrawFn) -> tuple[str, bytes]:
    """(kind, package bytes): a tar, tar.zst, tar.gz, zip or zip.zst that went wrong."""
    kind = draw(st.sampled_from(["tar", "tar.zst", "tar.gz", "zip", "zip.zst"]))
    inner = draw(tars() if kind.startswith("tar") else zips())
    if kind.endswith(".zst"):
        outer = zstandard.ZstdCompressor(level=1).compress(inner)
    elif kind.endswith(".gz"):
        compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
        outer = compressor.compress(inner) + compressor.flush()
    else:
        return kind, inner
    if draw(st.integers(0, 4)) == 0:  # sometimes the compressed bytes go wrong too
        outer = draw(mutated(outer, tar=False))
    return kind, outer
