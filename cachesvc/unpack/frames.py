"""One zstd frame of an indexed package: written self-describing, read back strictly.

An indexed package (:mod:`cachesvc.unpack.index`) is a run of independent
zstd frames, so that any one of them can be fetched by a ranged read and
decoded alone. This module owns that one frame: :func:`compress_frame`
writes it with its decoded size in the header (and no checksum: every
frame's bytes are checked by sha256 instead), :func:`decode_frame` reads it
back and refuses anything but *exactly one* whole frame that decodes to the
size the caller expects.

Guarantees of :func:`decode_frame`:

* **Bounded before decoding.** The frame header must declare its decoded
  size, equal to the size expected (at most ``max_size``), and a window of at
  most :data:`MAX_WINDOW`; nothing is allocated from a size the bytes claim
  beyond that. zstd itself refuses a frame that decodes to more than its
  header declared.
* **Exactly one frame.** Trailing bytes, a truncated frame, a skippable frame
  or a dictionary reference raise :class:`UnsupportedFormat`.

Whether the decoded bytes are the *right* ones is not this module's concern:
the caller compares their sha256 (:mod:`cachesvc.unpack.chunks`).
Blocking and CPU-bound on at most ``max_size`` bytes: call from a thread.
"""

from __future__ import annotations

import zstandard

from cachesvc.errors import UnsupportedFormat
from cachesvc.unpack.codec import MiB

MAX_WINDOW = 32 * MiB
"""Largest window a frame may ask for: a frame holds one chunk or one index,
never more than this; the decoder allocates at most about this much."""
_UNKNOWN = 2**63  # content sizes from here up are zstd's "unknown" and "error" markers


def compress_frame(data: bytes, level: int) -> bytes:
    """``data`` as one zstd frame with its size in the header, no checksum."""
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True,
                                          write_checksum=False)  # fmt: skip
    return compressor.compress(data)


FrameHeader = zstandard.FrameParameters
"""A frame's parsed header: ``content_size``, ``window_size``, ``dict_id``."""


def frame_header(frame: bytes, what: str) -> FrameHeader:
    """``frame``'s header, parsed once (pass it on to :func:`decode_frame`);
    :class:`UnsupportedFormat` when it is not a zstd frame header or declares
    no decoded size (its ``content_size``)."""
    try:
        header = zstandard.get_frame_parameters(frame)
    except zstandard.ZstdError as exc:
        raise UnsupportedFormat(f"{what}: not a zstd frame: {exc}") from exc
    if header.content_size >= _UNKNOWN:
        raise UnsupportedFormat(f"{what}: zstd frame declares no size")
    return header


def decode_frame(frame: bytes, size: int, what: str, header: FrameHeader | None = None) -> bytes:
    """The ``size`` bytes that ``frame`` (exactly one zstd frame) decodes to;
    ``header`` is its :func:`frame_header` when the caller parsed it already.

    Raises :class:`UnsupportedFormat` naming ``what`` when ``frame`` is not
    one whole frame declaring ``size`` decoded bytes, or does not decode.
    """
    _check_header(frame_header(frame, what) if header is None else header, size, what)
    decoder = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
    try:
        data = decoder.decompress(frame)
    except zstandard.ZstdError as exc:
        raise UnsupportedFormat(f"{what}: corrupt zstd frame: {exc}") from exc
    if not decoder.eof:
        raise UnsupportedFormat(f"{what}: truncated zstd frame")
    if decoder.unused_data:
        raise UnsupportedFormat(f"{what}: {len(decoder.unused_data)} bytes after the frame")
    if len(data) != size:  # zstd checks the declared size; this is a second guard
        raise UnsupportedFormat(f"{what}: decodes to {len(data)} bytes, not {size}")
    return data


def _check_header(header: FrameHeader, size: int, what: str) -> None:
    if header.content_size != size:
        raise UnsupportedFormat(f"{what}: zstd frame declares {header.content_size} bytes, "
                                f"not {size}")  # fmt: skip
    if header.window_size > MAX_WINDOW:
        raise UnsupportedFormat(f"{what}: zstd window of {header.window_size} bytes")
    if header.dict_id:
        raise UnsupportedFormat(f"{what}: zstd frame needs dictionary {header.dict_id}")
