"""Bad configuration through the real ``cachesvc`` command: one line on stderr
that names the flag or variable (or the path), exit status 2, no traceback, no
usage dump, and nothing started."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port

pytestmark = pytest.mark.slow  # a real cachesvc process per test

PEERS_FORMS = "use http://HOST:PORT,... or dns+http://NAME:PORT"


def cachesvc(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the command with no CACHESVC_* variables but ``env``. The timeout only
    bounds a command that wrongly starts serving (then the test fails)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CACHESVC_")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "cachesvc", *args],
        capture_output=True, text=True, env={**clean, **(env or {})}, timeout=60,
    )  # fmt: skip


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused configuration, checked for shape."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("cachesvc: "), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "usage:" not in out.stderr
    return lines[0]


def service(tmp_path: Path, command: str = "agent", *extra: str) -> list[str]:
    origin = f"file://{tmp_path / 'origin'}"
    return [command, "--listen", f"127.0.0.1:{free_port()}",
            "--cache-dir", str(tmp_path / "cache"), "--origin", origin, *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("peers", "why"),
    [
        ("http://h:notaport", "port 'notaport' is not a number from 1 to 65535"),
        ("http://x", "no port"),
        ("http://h:1/path", "a path, query or fragment ('/path') is not allowed"),
        ("h:1", "no scheme"),
    ],
)
def test_a_malformed_peers_flag_is_refused_at_start_in_one_line(
    tmp_path: Path, peers: str, why: str
) -> None:
    line = one_line_error(cachesvc(*service(tmp_path, "agent", "--peers", peers)))
    assert line == f"cachesvc: --peers {peers!r} (from the command line): {why}; {PEERS_FORMS}"
    assert not (tmp_path / "cache").exists()


def test_a_malformed_peers_variable_is_refused_naming_the_variable(tmp_path: Path) -> None:
    out = cachesvc(*service(tmp_path, "peer"), env={"CACHESVC_PEERS": "http://a:1,http://b"})
    line = one_line_error(out)
    assert line == (
        "cachesvc: --peers 'http://a:1,http://b' (from CACHESVC_PEERS): "
        f"entry 'http://b': no port; {PEERS_FORMS}"
    )


def test_a_malformed_advertise_url_is_refused(tmp_path: Path) -> None:
    line = one_line_error(cachesvc(*service(tmp_path, "peer", "--advertise", "peer-0:8701")))
    assert line.startswith("cachesvc: --advertise 'peer-0:8701' (from the command line): no scheme")


def test_warm_refuses_malformed_peers_before_contacting_anyone() -> None:
    out = cachesvc("warm", "--tenant", "t", "--peers", "http://127.0.0.1:1/path",
                   env={"CACHESVC_TOKEN": "t"})  # fmt: skip
    assert "a path, query or fragment ('/path') is not allowed" in one_line_error(out)


def test_publish_refuses_malformed_peers_before_uploading(tmp_path: Path) -> None:
    package = tmp_path / "app.zip"
    package.write_bytes(b"PK\x05\x06" + bytes(18))
    out = cachesvc("publish", str(package), "--tenant", "t", "--function", "f",
                   "--version", "1", "--origin", f"file://{tmp_path / 'origin'}", "--warm",
                   env={"CACHESVC_TOKEN": "t", "CACHESVC_PEERS": "http://h:notaport"})  # fmt: skip
    assert "--peers 'http://h:notaport' (from CACHESVC_PEERS): port" in one_line_error(out)
    assert not (tmp_path / "origin").exists()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("CACHESVC_CACHE_SIZE", "10XB",
         "--cache-size '10XB' (from CACHESVC_CACHE_SIZE): not a size; use 512MiB, 10GiB or bytes"),
        ("CACHESVC_ORIGIN_TIMEOUT", "30 secs",
         "--origin-timeout '30 secs' (from CACHESVC_ORIGIN_TIMEOUT): not a duration; use "),
        ("CACHESVC_MAX_FILES", "lots",
         "--max-files 'lots' (from CACHESVC_MAX_FILES): not a whole number; use digits"),
        ("CACHESVC_LISTEN", "localhost",
         "--listen 'localhost' (from CACHESVC_LISTEN): not an address; use HOST:PORT"),
        ("CACHESVC_ORIGIN", "ftp://x",
         "--origin 'ftp://x' (from CACHESVC_ORIGIN): not an origin; use s3://BUCKET[/PREFIX]"),
    ],
)  # fmt: skip
def test_a_bad_variable_is_one_line_naming_it_with_the_accepted_forms(
    tmp_path: Path, variable: str, value: str, expected: str
) -> None:
    args = ["agent", "--cache-dir", str(tmp_path / "cache")]
    env = {"CACHESVC_ORIGIN": f"file://{tmp_path}", variable: value}
    assert one_line_error(cachesvc(*args, env=env)).startswith(f"cachesvc: {expected}")


def test_a_bad_flag_value_is_one_line_saying_it_came_from_the_command_line(
    tmp_path: Path,
) -> None:
    out = cachesvc(*service(tmp_path, "agent", "--max-unpacked-size", "4 gigs"))
    assert one_line_error(out) == (
        "cachesvc: --max-unpacked-size '4 gigs' (from the command line): "
        "not a size; use 512MiB, 10GiB or bytes"
    )


def test_a_file_where_the_cache_dir_should_be_is_named_not_the_address(tmp_path: Path) -> None:
    (tmp_path / "cache").write_bytes(b"")
    line = one_line_error(cachesvc(*service(tmp_path)))
    assert line == f"cachesvc: --cache-dir {tmp_path / 'cache'}: not a directory (a file)"


def test_a_code_dir_under_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    code = tmp_path / "file" / "code"
    line = one_line_error(cachesvc(*service(tmp_path, "agent", "--code-dir", str(code))))
    assert line == (
        f"cachesvc: --code-dir {code}: cannot create it: {tmp_path / 'file'} is not a "
        "directory (a file)"
    )


def without_write_permission() -> tuple[str, ...]:
    """A command prefix under which permissions apply: root loses the
    capabilities that override them (the process is still root, but its mode
    bits count); other users need nothing."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


def test_an_unwritable_cache_dir_is_named_with_permission_denied(tmp_path: Path) -> None:
    prefix = without_write_permission()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        out = cachesvc(*service(locked, "peer"), prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert one_line_error(out) == (
        f"cachesvc: --cache-dir {locked / 'cache'}: cannot create it: {locked} is not "
        "writable (permission denied)"
    )


def test_a_start_up_failure_in_the_store_names_the_path_not_the_address(tmp_path: Path) -> None:
    # Past the early check (the parent is writable), the store cannot create a
    # directory whose name is too long: an OSError of start-up, not of the bind.
    cache = tmp_path / ("c" * 300)
    args = service(tmp_path)
    args[args.index("--cache-dir") + 1] = str(cache)
    line = one_line_error(cachesvc(*args))
    assert line == f"cachesvc: cannot start: {cache}: File name too long"


def test_up_refuses_a_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    line = one_line_error(cachesvc("up", "--dir", str(tmp_path / "f"), "--agent-port", "1"))
    assert line == f"cachesvc: --dir {tmp_path / 'f'}: not a directory (a file)"
