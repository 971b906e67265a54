"""The index of an indexed package: its format, and the strict parser of it.

An indexed package is a plain ``tar.zst`` (``tar --zstd -xf`` reads it) whose
every tar header run, file and 512 KiB chunk of a large file is its own zstd
frame, followed by two zstd *skippable* frames that every zstd decoder passes
over: the index, then a fixed footer. See docs/INDEXED.md for the layout and
the trust chain; in short::

    [frames of the tar] [index frame: magic, size, zstd(JSON)] [footer: 32 bytes]

The footer (:data:`FOOTER`) locates the index frame; the index lists, for
every entry, its path, type, mode, mtime, size, the sha256 of its bytes and
the frames that hold it (offset and length in the package, and for a file of
several chunks the sha256 of each chunk). The index frame is trusted only
through its own sha256 (:class:`IndexRef`, carried by the package reference
beside the package digest): :func:`parse` compares it before decoding a byte.

Guarantees of :func:`parse` (and :func:`load`):

* **The digest first.** Bytes that do not hash to the trusted index digest
  raise :class:`DigestMismatch` before they are decoded, and so does a tail
  whose footer disagrees with the :class:`IndexRef` (wrong bytes from a tier).
* **Bounded.** The index frame is at most :data:`MAX_INDEX_FRAME` bytes and
  decodes to at most :data:`MAX_INDEX_JSON`, read by ``json`` (never by hand);
  entries, unpacked bytes and the ratio are held to :class:`Limits` like an
  unpack, before anything is mounted. Over a bound: :class:`TooLarge`.
* **Unpack's rules.** Paths go through :func:`~cachesvc.unpack.tree.member_parts`
  (no NUL, no absolute path, no ``..``, name and depth limits: else
  :class:`UnsafeArchive` or :class:`UnsupportedFormat`), must be canonical and
  UTF-8, unique, and come after their directory; only files and directories
  (links, devices and fifos are :class:`UnsafeArchive`); modes are those an
  unpack writes (files 0644 or 0755, directories 0755).
* **Consistent frames.** Every frame lies inside the package's tar frames
  (before the index), frames never overlap and come in package order, a
  file has exactly ``ceil(size / chunk_size)`` of them, and the package size
  is what the footer and the index say.
* **Only contract errors**: anything else in the bytes (bad JSON, duplicate
  keys, wrong types, unknown keys or versions) is :class:`UnsupportedFormat`.

This module does not fetch or decode file bytes (:mod:`cachesvc.unpack.chunks`
does) and does not write packages (:mod:`cachesvc.publish.indexed` does).
Blocking: call from a thread.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from cachesvc.digest import HEX, Digest, compare
from cachesvc.errors import DigestMismatch, TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.unpack.codec import KiB, Limits, MiB
from cachesvc.unpack.frames import compress_frame, decode_frame, frame_header
from cachesvc.unpack.tree import MTIME_RANGE, member_parts, show

FORMAT, VERSION = "cachesvc.index", 1
INDEX_MAGIC = 0x184D2A5C
"""zstd skippable frame magic of the index frame (0x184D2A50-5F are skippable)."""
FOOTER_MAGIC = 0x184D2A5D
FOOTER_TAG = b"CSVCIX01"
FOOTER = struct.Struct("<II8sQQ")
"""The last 32 bytes: skippable magic, payload size 24, tag, index offset, index length."""
SKIPPABLE = struct.Struct("<II")
MAX_INDEX_FRAME = 16 * MiB
"""The index frame's bytes, its skippable header included."""
MAX_INDEX_JSON = 32 * MiB
"""About 120,000 entries of typical paths; the JSON of a bigger index is refused."""
CHUNK_SIZES = (4 * KiB, 16 * MiB)
"""Chunk sizes an index may use (the writer's is 512 KiB)."""
FILE_MODES, DIR_MODE = (0o644, 0o755), 0o755
_LINKISH = {"symlink", "link", "hardlink", "char", "block", "device", "fifo", "socket"}
_TOP_KEYS = {"format", "version", "chunk_size", "data_size", "entries"}
_DIR_KEYS = {"path", "type", "mode", "mtime"}
_FILE_KEYS = _DIR_KEYS | {"size", "sha256", "chunks"}


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"


@dataclass(frozen=True)
class Chunk:
    """``size`` bytes of a file from ``start``, held by the zstd frame at
    ``offset`` (``length`` bytes) in the package; ``sha256`` of those bytes."""

    offset: int
    length: int
    start: int
    size: int
    sha256: Digest


@dataclass(frozen=True)
class Entry:
    """A file or directory of the package. Directories have no sha256 and no chunks."""

    path: str
    kind: Kind
    mode: int
    mtime: int
    size: int = 0
    sha256: Digest | None = None
    chunks: tuple[Chunk, ...] = ()


@dataclass(frozen=True)
class IndexRef:
    """What the reference carries beside the package digest: the index frame's
    sha256 and length (a reader fetches the last ``size + FOOTER.size`` bytes)."""

    digest: Digest
    size: int

    def __post_init__(self) -> None:
        if self.size > MAX_INDEX_FRAME:
            raise TooLarge(f"an index frame of {self.size} bytes, over {MAX_INDEX_FRAME}")
        if self.size <= SKIPPABLE.size:
            raise UnsupportedFormat(f"an index frame of {self.size} bytes holds no index")

    @property
    def tail(self) -> int:
        """Bytes at the end of the package that hold the index frame and footer."""
        return self.size + FOOTER.size


@dataclass(frozen=True)
class Index:
    """A parsed, checked index: entries in package order, findable by path."""

    chunk_size: int
    data_size: int
    entries: tuple[Entry, ...]
    _by_path: dict[str, Entry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_path", {entry.path: entry for entry in self.entries})

    def entry(self, path: str) -> Entry | None:
        return self._by_path.get(path)

    @property
    def files(self) -> Iterator[Entry]:
        return (entry for entry in self.entries if entry.kind is Kind.FILE)


# ---- writing ----


def encode(index: Index, level: int = 19) -> bytes:
    """The index frame: a skippable frame holding the index JSON in one zstd frame."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "chunk_size": index.chunk_size,
        "data_size": index.data_size,
        "entries": [_entry_json(entry) for entry in index.entries],
    }
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    if len(text) > MAX_INDEX_JSON:
        raise TooLarge(f"the index of {len(index.entries)} entries is over {MAX_INDEX_JSON} bytes")
    payload = compress_frame(text, level)
    if len(payload) + SKIPPABLE.size > MAX_INDEX_FRAME:
        raise TooLarge(f"the index of {len(index.entries)} entries is over {MAX_INDEX_FRAME} bytes")
    return SKIPPABLE.pack(INDEX_MAGIC, len(payload)) + payload


def _entry_json(entry: Entry) -> dict[str, object]:
    doc: dict[str, object] = {"path": entry.path, "type": entry.kind.value}
    doc |= {"mode": entry.mode, "mtime": entry.mtime}
    if entry.kind is Kind.FILE:
        many = len(entry.chunks) > 1
        chunks = [[c.offset, c.length, *([c.sha256.hex] if many else [])] for c in entry.chunks]
        assert entry.sha256 is not None  # a file always has one
        doc |= {"size": entry.size, "sha256": entry.sha256.hex, "chunks": chunks}
    return doc


def footer(index_offset: int, index_length: int) -> bytes:
    """The fixed footer that ends the package and locates its index frame."""
    payload = FOOTER.size - SKIPPABLE.size
    return FOOTER.pack(FOOTER_MAGIC, payload, FOOTER_TAG, index_offset, index_length)


# ---- reading ----


def load(tail: bytes, package_size: int, trusted: IndexRef, limits: Limits) -> Index:
    """The index of a package of ``package_size`` bytes whose last bytes are
    ``tail`` (at least ``trusted.tail`` of them): the footer locates the index
    frame, which must be ``trusted`` (length and sha256) before it is parsed.

    Tail bytes that are not what ``trusted`` describes (short, no footer, a
    footer that disagrees) are :class:`DigestMismatch`: wrong bytes from
    whichever tier sent them. An index that hashes right but breaks a rule is
    the package's fault: :class:`UnsupportedFormat` and the others."""
    if len(tail) < trusted.tail or package_size < len(tail):
        raise DigestMismatch(f"index tail: {len(tail)} bytes, need {trusted.tail}")
    try:
        offset, length = read_footer(tail[-FOOTER.size :], package_size)
    except (UnsupportedFormat, TooLarge) as exc:
        raise DigestMismatch(f"index {trusted.digest.short}: the tail is not its: {exc}") from exc
    if length != trusted.size:
        raise DigestMismatch(f"index {trusted.digest.short}: footer says {length} bytes, "
                             f"the reference {trusted.size}")  # fmt: skip
    return parse(tail[-trusted.tail : -FOOTER.size], trusted.digest, offset, package_size, limits)


def read_footer(last: bytes, package_size: int) -> tuple[int, int]:
    """(offset, length) of the index frame from the package's last 32 bytes."""
    if len(last) != FOOTER.size:
        raise UnsupportedFormat(f"index footer: {len(last)} bytes, not {FOOTER.size}")
    magic, payload, tag, offset, length = FOOTER.unpack(last)
    if (magic, payload, tag) != (FOOTER_MAGIC, FOOTER.size - SKIPPABLE.size, FOOTER_TAG):
        raise UnsupportedFormat("not an indexed package: no index footer at its end")
    if length > MAX_INDEX_FRAME:
        raise TooLarge(f"index frame of {length} bytes, over {MAX_INDEX_FRAME}")
    if offset + length + FOOTER.size != package_size:
        raise UnsupportedFormat(f"index footer: frame at {offset}+{length} does not end "
                                f"where a {package_size}-byte package's footer starts")  # fmt: skip
    return offset, length


def parse(frame: bytes, trusted: Digest, offset: int, package_size: int, limits: Limits) -> Index:
    """The index in ``frame`` (the package's bytes from ``offset`` to its footer),
    checked against ``trusted`` first, then against every rule of the module."""
    compare(trusted, hashlib.sha256(frame), "index")
    if package_size > limits.max_package_size:
        raise TooLarge(f"package is {package_size} bytes, over {limits.max_package_size}")
    if len(frame) < SKIPPABLE.size or offset + len(frame) + FOOTER.size != package_size:
        raise UnsupportedFormat("index frame does not fit the package")
    magic, size = SKIPPABLE.unpack_from(frame)
    if magic != INDEX_MAGIC or size != len(frame) - SKIPPABLE.size:
        raise UnsupportedFormat("index frame: wrong magic or size")
    payload = frame[SKIPPABLE.size :]
    header = frame_header(payload, "index")
    decoded = header.content_size
    if decoded > MAX_INDEX_JSON:
        raise TooLarge(f"index decodes to {decoded} bytes, over {MAX_INDEX_JSON}")
    doc = _json(decode_frame(payload, decoded, "index", header))
    return _Checker(limits, offset, package_size).index(doc)


def _json(data: bytes) -> object:
    """``data`` as JSON: UTF-8, no duplicate keys, no NaN or Infinity."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique,
                          parse_constant=_no_constant)  # fmt: skip
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError too
        raise UnsupportedFormat(f"index is not JSON: {str(exc)[:200]}") from exc


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise UnsupportedFormat("index has a duplicate key")
    return doc


def _no_constant(name: str) -> object:
    raise UnsupportedFormat(f"index has {name}")


class _Checker:
    """Turns the JSON document into an :class:`Index`, enforcing every rule once."""

    def __init__(self, limits: Limits, data_size: int, package_size: int) -> None:
        self.limits = limits
        self.data_size = data_size
        self.package_size = package_size
        self.chunk_size = 0
        self.end = 0  # where the last frame seen ends: frames come in package order
        self.total = 0
        self.kinds: dict[str, Kind] = {}

    def index(self, doc: object) -> Index:
        top = _object(doc, "index", _TOP_KEYS)
        if (top["format"], top["version"]) != (FORMAT, VERSION):
            raise UnsupportedFormat(f"index format {show(str(top['format']))} "
                                    f"version {show(str(top['version']))}")  # fmt: skip
        if _int(top["data_size"], "data_size", 0, self.data_size) != self.data_size:
            raise UnsupportedFormat("index data_size does not match where its frame starts")
        self.chunk_size = _int(top["chunk_size"], "chunk_size", *CHUNK_SIZES)
        entries = top["entries"]
        if not isinstance(entries, list):
            raise UnsupportedFormat("index entries: not a list")
        if len(entries) > self.limits.max_files:
            raise TooLarge(f"index has over {self.limits.max_files} entries")
        return Index(self.chunk_size, self.data_size, tuple(map(self.entry, entries)))

    def entry(self, doc: object) -> Entry:
        kind = str(_object(doc, "entry", None).get("type"))  # any JSON value, hashable now
        if kind in _LINKISH:
            raise UnsafeArchive(f"index entry of type {show(str(kind))}: links, devices and "
                                "fifos are refused")  # fmt: skip
        if kind not in (Kind.FILE.value, Kind.DIR.value):
            raise UnsupportedFormat(f"index entry of unknown type {show(str(kind))}")
        raw = _object(doc, "entry", _FILE_KEYS if kind == "file" else _DIR_KEYS)
        path = self.path(raw["path"], Kind(kind))
        mtime = _int(raw["mtime"], f"mtime of {show(path)}", MTIME_RANGE[0], MTIME_RANGE[1] - 1)
        if kind == "dir":
            _int(raw["mode"], f"mode of {show(path)}", DIR_MODE, DIR_MODE)
            return Entry(path, Kind.DIR, DIR_MODE, mtime)
        mode = _int(raw["mode"], f"mode of {show(path)}", 0, 0o7777)
        if mode not in FILE_MODES:
            raise UnsupportedFormat(f"mode {mode:o} of {show(path)}: files are 644 or 755")
        return self.file(path, mode, mtime, raw)

    def path(self, value: object, kind: Kind) -> str:
        if not isinstance(value, str):
            raise UnsupportedFormat("index entry path: not a string")
        parts = member_parts(value)
        if not parts or "/".join(parts) != value:
            raise UnsupportedFormat(f"index path {show(value)} is not canonical")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise UnsupportedFormat(f"index path {show(value)} is not UTF-8") from exc
        if value in self.kinds:
            raise UnsafeArchive(f"duplicate index entry {show(value)}")
        parent = "/".join(parts[:-1])
        if parent and self.kinds.get(parent) is not Kind.DIR:
            raise UnsupportedFormat(f"index entry {show(value)} before its directory")
        self.kinds[value] = kind
        return value

    def file(self, path: str, mode: int, mtime: int, raw: dict[str, object]) -> Entry:
        size = _int(raw["size"], f"size of {show(path)}", 0, 2**63)
        self.total += size
        if self.total > self.limits.max_unpacked_size:
            raise TooLarge(f"index unpacks to over {self.limits.max_unpacked_size} bytes")
        if not self.limits.ratio_allows(self.total, self.package_size):
            raise TooLarge(f"index unpacks over {self.limits.max_ratio}x the package")
        sha256 = _digest(raw["sha256"], path)
        chunks = self.chunks(raw["chunks"], path, size, sha256)
        return Entry(path, Kind.FILE, mode, mtime, size, sha256, chunks)

    def chunks(self, value: object, path: str, size: int, whole: Digest) -> tuple[Chunk, ...]:
        count = -(-size // self.chunk_size)
        if not isinstance(value, list) or len(value) != count:
            raise UnsupportedFormat(f"chunks of {show(path)}: not a list of {count}")
        width = 3 if count > 1 else 2  # a file of one chunk: the chunk's sha256 is the file's
        out = []
        for number, item in enumerate(value):
            if not isinstance(item, list) or len(item) != width:
                raise UnsupportedFormat(f"chunk {number} of {show(path)}: not {width} fields")
            start = number * self.chunk_size
            digest = _digest(item[2], path) if width == 3 else whole
            offset, length = self.frame(item[0], item[1], path)
            out.append(Chunk(offset, length, start, min(self.chunk_size, size - start), digest))
        return tuple(out)

    def frame(self, offset: object, length: object, path: str) -> tuple[int, int]:
        """A frame at or after the last one, inside the tar frames."""
        what = f"frame of {show(path)}"
        most = self.chunk_size + self.chunk_size // 128 + KiB  # zstd's bound on one chunk
        start = _int(offset, what, self.end, self.data_size)
        size = _int(length, what, 1, most)
        if start + size > self.data_size:
            raise UnsupportedFormat(f"{what} ends past the package's tar frames")
        self.end = start + size
        return start, size


def _object(value: object, what: str, keys: set[str] | None) -> dict[str, object]:
    if not isinstance(value, dict):
        raise UnsupportedFormat(f"{what}: not an object")
    if keys is not None and set(value) != keys:
        raise UnsupportedFormat(f"{what}: keys {sorted(value)[:8]}, expected {sorted(keys)}")
    return value


def _int(value: object, what: str, low: int, high: int) -> int:
    """An integer (not a bool) within ``low..high``."""
    if type(value) is not int:
        raise UnsupportedFormat(f"index {what}: not an integer")
    if not low <= value <= high:
        raise UnsupportedFormat(f"index {what}: {value} is outside {low}..{high}")
    return value


def _digest(value: object, path: str) -> Digest:
    """A sha256 written as 64 lowercase hex digits."""
    if not isinstance(value, str) or not HEX.fullmatch(value):
        raise UnsupportedFormat(f"sha256 of {show(path)}: not 64 lowercase hex digits")
    return Digest.parse(value)
