"""The indexed repack: a plain tar.zst that every reader takes, byte-stable,
with an index that describes exactly what the tar holds."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from cachesvc.cli.main import main
from cachesvc.digest import Digest
from cachesvc.errors import TooLarge, UnsafeArchive, UnsupportedFormat
from cachesvc.publish.indexed import CHUNK_SIZE, repack_indexed
from cachesvc.unpack import codec
from cachesvc.unpack.chunks import LocalPackage, read_entry, read_index
from cachesvc.unpack.codec import Limits
from cachesvc.unpack.extract import extract
from cachesvc.unpack.index import IndexRef, Kind
from tests.archives import tree_with_times
from tests.indexes import FILES, build, write_tree


def zip_of(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2023, 11, 14, 22, 13, 20))
            info.external_attr = (0o100755 if name.startswith("bin/") else 0o100644) << 16
            archive.writestr(info, data)
    return path


def tar_gz_of(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            info.mode = 0o755 if name.startswith("bin/") else 0o644
            archive.addfile(info, io.BytesIO(data))
    return path


def expected(files: dict[str, bytes]) -> dict[str, tuple[bytes, int, int]]:
    mode = {True: 0o755, False: 0o644}
    return {n: (d, mode[n.startswith("bin/")], 1_700_000_000) for n, d in files.items()}


def test_the_same_tree_gives_the_same_bytes_and_index(tmp_path: Path) -> None:
    first, ref = build(tmp_path / "a")
    again, ref_again = build(tmp_path / "b")
    assert first == again
    assert ref == ref_again


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Zip times are local times: read them as UTC, whatever this machine's zone."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("utc")
@pytest.mark.parametrize("form", ["dir", "zip", "tar.gz"])
def test_a_zip_a_tar_gz_and_a_directory_give_one_package(tmp_path: Path, form: str) -> None:
    reference, ref = build(tmp_path / "ref")
    makers = {
        "dir": lambda: write_tree(tmp_path / "tree", FILES),
        "zip": lambda: zip_of(tmp_path / "fn.zip", FILES),
        "tar.gz": lambda: tar_gz_of(tmp_path / "fn.tar.gz", FILES),
    }
    report = repack_indexed(makers[form](), tmp_path / "out.tar.zst", level=3)
    assert (tmp_path / "out.tar.zst").read_bytes() == reference
    assert report.index == ref
    assert (report.files, report.bytes) == (len(FILES), sum(map(len, FILES.values())))


@pytest.mark.skipif(not shutil.which("tar") or not shutil.which("zstd"), reason="no tar/zstd")
@pytest.mark.parametrize("how", ["tar --zstd -xf", "zstd -d | tar -x"])
def test_gnu_tar_and_the_zstd_tool_extract_it(tmp_path: Path, how: str) -> None:
    package, _ = build(tmp_path)
    (tmp_path / "pkg").write_bytes(package)
    out = tmp_path / "out"
    out.mkdir()
    script = {
        "tar --zstd -xf": f"tar --zstd -xf {tmp_path / 'pkg'} -C {out}",
        "zstd -d | tar -x": f"zstd -q -d -c {tmp_path / 'pkg'} | tar -xf - -C {out}",
    }[how]
    subprocess.run(["sh", "-ec", script], check=True, capture_output=True)
    assert tree_with_times(out) == expected(FILES)


def test_tarfile_over_zstandard_reads_every_member(tmp_path: Path) -> None:
    package, _ = build(tmp_path)
    reader = zstandard.ZstdDecompressor().stream_reader(
        io.BytesIO(package), read_across_frames=True
    )
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        found = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    assert found == FILES


def test_unpack_extracts_it_as_the_tar_zst_it_is(tmp_path: Path) -> None:
    package, _ = build(tmp_path)
    (tmp_path / "pkg").write_bytes(package)
    (tmp_path / "out").mkdir()
    done = extract(tmp_path / "pkg", tmp_path / "out", Limits())
    assert done.layers == ("zstd", "tar")
    assert tree_with_times(tmp_path / "out") == expected(FILES)


def test_the_index_describes_what_the_tar_holds_where_it_holds_it(tmp_path: Path) -> None:
    package, ref = build(tmp_path)
    (tmp_path / "pkg").write_bytes(package)
    with LocalPackage(tmp_path / "pkg") as source:
        index = read_index(source, source.size, ref, Limits())
        assert {e.path: read_entry(e, source) for e in index.files} == FILES
    dirs = [e.path for e in index.entries if e.kind is Kind.DIR]
    assert dirs == ["bin", "lib", "lib/sub"]  # directories first, then files by path
    assert [e.path for e in index.files] == sorted(FILES, key=lambda n: n.split("/"))
    big = index.entry("lib/sub/data.bin")
    assert big is not None
    assert [c.size for c in big.chunks] == [CHUNK_SIZE, CHUNK_SIZE, 1_280_000 - 2 * CHUNK_SIZE]
    with (
        codec.open_stream(tmp_path / "pkg") as archive,
        tarfile.open(fileobj=archive.stream, mode="r|") as tar,
    ):
        members = {m.name: (m.size, m.mode, m.mtime, m.type) for m in tar}
    assert members == {
        e.path: (
            e.size,
            e.mode,
            e.mtime,
            tarfile.REGTYPE if e.kind is Kind.FILE else tarfile.DIRTYPE,
        )
        for e in index.entries
    }


def test_a_link_in_a_directory_is_refused(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"a.py": b"x"})
    (source / "escape").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeArchive, match="links"):
        repack_indexed(source, tmp_path / "out.tar.zst")
    assert not (tmp_path / "out.tar.zst").exists()


def test_an_archive_with_a_dotdot_member_is_refused_by_unpacks_rule(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive, match=r"'\.\.'"):
        repack_indexed(zip_of(tmp_path / "bad.zip", {"a/../../x": b"x"}), tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_a_tree_over_unpacks_limits_is_refused_as_no_reader_would_take_it(
    tmp_path: Path,
) -> None:
    source = write_tree(tmp_path / "src", FILES)
    with pytest.raises(TooLarge, match="entries"):
        repack_indexed(source, tmp_path / "a.tar.zst", limits=Limits(max_files=3))
    with pytest.raises(TooLarge, match="bytes"):
        repack_indexed(source, tmp_path / "b.tar.zst", limits=Limits(max_unpacked_size=1000))


def test_a_package_over_the_readers_size_limit_is_refused_and_not_written(
    tmp_path: Path,
) -> None:
    source = write_tree(tmp_path / "src", FILES)
    size = repack_indexed(source, tmp_path / "fits.tar.zst").size
    with pytest.raises(TooLarge, match=f"would be {size} bytes, over the {size - 1}"):
        repack_indexed(source, tmp_path / "out.tar.zst", limits=Limits(max_package_size=size - 1))
    assert not (tmp_path / "out.tar.zst").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.tar.zst", "src"]
    report = repack_indexed(source, tmp_path / "out.tar.zst", limits=Limits(max_package_size=size))
    with LocalPackage(tmp_path / "out.tar.zst") as package:  # the reader takes it at its limit
        read_index(package, package.size, report.index, Limits(max_package_size=size))


def test_a_package_its_readers_would_refuse_by_ratio_is_not_written(tmp_path: Path) -> None:
    """A directory is not extracted first, so nothing but the reader's own parser,
    run on what was written, holds its ratio."""
    source = write_tree(tmp_path / "src", {"zeros.bin": bytes(3 * 2**20)})
    with pytest.raises(TooLarge, match="refused by its readers"):
        repack_indexed(source, tmp_path / "out.tar.zst", limits=Limits(max_ratio=2))
    assert not (tmp_path / "out.tar.zst").exists()
    repack_indexed(source, tmp_path / "out.tar.zst", limits=Limits(max_ratio=4))


def test_a_tree_without_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src" / "empty").mkdir(parents=True)
    with pytest.raises(UnsupportedFormat, match="no files"):
        repack_indexed(tmp_path / "src", tmp_path / "out.tar.zst")


def test_publish_repack_indexed_puts_the_index_in_the_reference(tmp_path: Path) -> None:
    source = zip_of(tmp_path / "fn.zip", FILES)
    origin = tmp_path / "origin"
    origin.mkdir()
    argv = ["publish", str(source), "--repack", "--indexed", "--origin", f"file://{origin}"]
    assert main([*argv, "--tenant", "t", "--function", "f", "--version", "1"]) == 0
    ref = json.loads((origin / "tenants/t/f/1.json").read_text())
    blob = origin / "blobs/sha256" / ref["digest"].removeprefix("sha256:")
    trusted = IndexRef(Digest.parse(ref["index"]["digest"]), ref["index"]["size"])
    with LocalPackage(blob) as source_bytes:
        index = read_index(source_bytes, source_bytes.size, trusted, Limits())
        assert {e.path: read_entry(e, source_bytes) for e in index.files} == FILES


def test_publish_indexed_without_repack_or_with_compress_is_refused(tmp_path: Path) -> None:
    source = zip_of(tmp_path / "fn.zip", FILES)
    base = ["publish", str(source), "--origin", f"file://{tmp_path}"]
    assert main([*base, "--indexed"]) == 1
    assert main([*base, "--repack", "--indexed", "--compress", "zstd"]) == 1
