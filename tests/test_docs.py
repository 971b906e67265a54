"""The docs hold up: links resolve inside the repository, the API reference
names everything the code serves and accepts, and the figures and commands the
docs quote are what the code does.

- Every Markdown file of the repository (tracked or new, not ignored): each
  relative link (inline, image or reference-style, outside code) names a file
  or directory inside the repository, and a ``#fragment`` into a Markdown file
  names one of its headings (GitHub's slugs). A clone has nothing outside the
  repository, so ``../`` out of it is an error even where this machine has it.
- docs/API.md names every route of the agent and the peer apps, every flag of
  every ``cachesvc`` command (the real parser), every error code of
  ``cachesvc.errors``, and every metric ``cachesvc.metrics.Metrics`` exports.
- README.md's layout table is the tree: every room (subpackage) of cachesvc
  and node_agent with exactly its modules, in the layers that import-linter's
  contract in pyproject.toml holds.
- deploy/README.md quotes the ring reshuffle table ``bench/ring_moves.py``
  prints, recomputed here with the real ring; and its compose publish example
  passes the S3 credentials as environment, from the variables the compose
  file and ``deploy/generate-secrets.sh`` use.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench.ring_moves import all_moves, table
from cachesvc.cli.main import build_parser
from cachesvc.config import Settings
from cachesvc.errors import CachesvcError
from cachesvc.metrics import Metrics
from cachesvc.peer.app import make_app as make_peer
from node_agent.app import make_app as make_agent
from tests.manifests import COMPOSE, ROOT, generated_secrets

API = ROOT / "docs" / "API.md"
DEPLOY_README = ROOT / "deploy" / "README.md"
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+).+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.M)
# The contract's flags "added by later issues": listed, marked (later).
LATER_FLAGS = ("--scrub-interval", "--scrub-rate", "--egress-limit", "--fanout")
# Codes answered outside the error tree: readiness, and the catch-all 500.
EXTRA_CODES = {"not_ready", "internal"}


# --- links -------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    """Every .md git tracks or would track (new, not ignored) in the repository."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return sorted(ROOT / name for name in listed if name.endswith(".md") and (ROOT / name).exists())


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    body = prose(text)
    return INLINE_LINK.findall(body) + REFERENCE.findall(body)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (code
    marks included), spaces as hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken(source: Path, target: str) -> str | None:
    """Why ``target`` (a link in ``source``) does not resolve inside the repo."""
    if SCHEME.match(target):
        return None  # http(s), mailto: outside the repository by intent
    path_part, _, fragment = target.partition("#")
    if path_part.startswith("/"):
        return "absolute path: use a path relative to the file"
    resolved = (source.parent / path_part).resolve() if path_part else source
    if resolved != ROOT and ROOT not in resolved.parents:
        return "outside the repository"
    if not resolved.exists():
        return "no such file"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
        return f"no heading #{fragment} in {resolved.relative_to(ROOT)}"
    return None


def all_links() -> Iterator[tuple[Path, str]]:
    for path in markdown_files():
        for target in links(path.read_text()):
            yield path, target


def test_the_link_checker_sees_links_and_finds_what_is_broken(tmp_path: Path) -> None:
    text = "[a](docs/API.md) ![i](x.png) `[no](code.md)`\n```\n[no](fence.md)\n```\n[r]: ../up.md\n"
    assert links(text) == ["docs/API.md", "x.png", "../up.md"]
    readme = ROOT / "README.md"
    assert broken(readme, "docs/API.md") is None
    assert broken(readme, "docs/API.md#errors") is None
    assert broken(readme, "docs/API.md#nope") == "no heading #nope in docs/API.md"
    assert broken(readme, "../shared/CONTRACT.md") == "outside the repository"
    assert broken(readme, "docs/NOPE.md") == "no such file"
    assert slug("HTTP: node agent") == "http-node-agent"
    assert slug("`GET /pkg/{digest}/archive`") == "get-pkgdigestarchive"


def test_every_markdown_link_in_the_repository_resolves_inside_it() -> None:
    checked = list(all_links())
    problems = [
        f"{path.relative_to(ROOT)}: ({target}) {why}"
        for path, target in checked
        if (why := broken(path, target)) is not None
    ]
    assert problems == []
    assert len(checked) >= 10  # the scan sees the docs' links at all


def test_the_readme_links_the_api_reference_and_lists_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = links(readme)
    for doc in ("docs/API.md", "deploy/README.md", "loadtest/README.md"):
        assert doc in targets, doc
    assert "## Docs" in readme


# --- the API reference against the code -------------------------------------------


def api_text() -> str:
    return API.read_text()


def app_routes() -> set[str]:
    """``METHOD /path`` of every route the agent and peer apps register (HEAD
    rides with GET; catch-all ``*`` routes are not endpoints)."""
    settings = Settings(
        listen=("127.0.0.1", 0), cache_dir=Path("/nonexistent"), cache_size=1, origin="file:///x"
    )
    found = set()
    for app in (make_agent(settings), make_peer(settings)):
        for route in app.router.routes():
            canonical = route.resource.canonical if route.resource is not None else ""
            if route.method not in ("*", "HEAD"):
                found.add(f"{route.method} {canonical}")
    return found


def test_the_api_reference_names_every_route_of_the_agent_and_the_peer() -> None:
    routes = app_routes()
    assert {"GET /pkg/{digest}", "GET /blob/{digest}", "POST /warm"} <= routes
    text = api_text()
    assert sorted(r for r in routes if f"`{r}`" not in text) == []


def command_flags() -> dict[str, set[str]]:
    """Every long option of every ``cachesvc`` command, from the real parser."""
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        name: {
            max(action.option_strings, key=len)
            for action in command._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)
        }
        for name, command in sub.choices.items()
    }


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n### ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.parametrize("command", ["agent", "peer", "publish", "fetch", "warm", "up"])
def test_the_api_reference_names_every_flag_of_every_command(command: str) -> None:
    flags = command_flags()[command]
    heading = "### `cachesvc agent` and `cachesvc peer`"
    if command not in ("agent", "peer"):
        heading = f"### `cachesvc {command}"
    text = section(api_text(), heading)
    assert sorted(f for f in flags if f"`{f}" not in text) == [], heading


def test_the_api_reference_lists_the_contracts_later_flags_on_both_services() -> None:
    text = section(api_text(), "### `cachesvc agent` and `cachesvc peer`")
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `--")
    }
    for flag in (*LATER_FLAGS, "--advertise"):
        (row,) = [line for name, line in rows.items() if name.startswith(f"`{flag} ")]
        agent, peer = (cell.strip() for cell in row.split("|")[2:4])
        assert (agent, peer) == ("✓", "✓"), flag


def error_codes() -> set[str]:
    classes, codes = [CachesvcError], set()
    while classes:
        cls = classes.pop()
        codes.add(cls.code)
        classes += cls.__subclasses__()
    return codes | EXTRA_CODES


def test_the_api_reference_names_every_error_code() -> None:
    errors = section(api_text(), "## Errors")
    assert {"invalid_digest", "too_large", "upstream_timeout"} <= error_codes()
    assert sorted(c for c in error_codes() if f"| `{c}` |" not in errors) == []


def exported_metrics() -> set[str]:
    """Metric names as scraped: counters with their ``_total``."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_api_reference_names_every_metric() -> None:
    metrics = section(api_text(), "## Metrics")
    assert {"cachesvc_requests_total", "cachesvc_request_seconds"} <= exported_metrics()
    assert sorted(m for m in exported_metrics() if f"| `{m}`" not in metrics) == []


# --- what deploy/README.md quotes -----------------------------------------------------


@pytest.mark.slow
def test_the_ring_reshuffle_table_is_what_the_real_ring_does() -> None:
    rows = all_moves()
    assert all(m.only_allowed for m in rows)  # consistent hashing: nothing else moved
    for moves in rows:
        assert abs(moves.share - moves.ideal) < 0.05, moves.row()
    assert table(rows) in DEPLOY_README.read_text()


def code_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def test_the_compose_publish_example_passes_the_s3_credentials_as_environment() -> None:
    (block,) = [b for b in code_blocks(DEPLOY_README.read_text()) if "cachesvc publish" in b]
    command = block.replace("\\\n", " ")
    (line,) = [x for x in command.splitlines() if "cachesvc publish" in x]
    assigned = dict(re.findall(r"(AWS_\w+)=\$(\w+)", line.split("cachesvc publish")[0]))
    credentials = yaml.safe_load(COMPOSE.read_text())["x-s3-credentials"]
    expected = {name: re.findall(r"\$\{(\w+)", value)[0] for name, value in credentials.items()}
    assert assigned == expected  # the tiers' own keys: MinIO's root user and password
    assert set(expected.values()) <= set(generated_secrets("compose"))
    assert "deploy/.env" in block and not re.search(r"#.*AWS_", block)


# --- the layout table ----------------------------------------------------------


LAYOUT_ROW = re.compile(r"^\| *(\d+|base) *\| *`([^`]+)/` *\| *((?:`[^`]+` *)+)\|", re.M)
README = ROOT / "README.md"


def layout_rows() -> dict[str, tuple[str, set[str]]]:
    """README's layout table: room (a package, dotted) -> (layer, its modules)."""
    section = README.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for layer, room, modules in LAYOUT_ROW.findall(section):
        rows[room.replace("/", ".")] = (layer, set(re.findall(r"`([^`]+)`", modules)))
    return rows


def rooms_on_disk() -> dict[str, set[str]]:
    """Every package of the product (cachesvc, its subpackages, node_agent) and
    its modules, dunder files left out."""
    found = {}
    for top in ("cachesvc", "node_agent"):
        for init in sorted((ROOT / top).rglob("__init__.py")):
            package = init.parent
            dotted = ".".join(package.relative_to(ROOT).parts)
            found[dotted] = {p.stem for p in package.glob("*.py") if not p.stem.startswith("__")}
    return found


def contract_layers() -> list[set[str]]:
    """import-linter's layers contract, top first: each line's modules."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    return [{m.strip() for m in re.split(r"[|:]", line)} for line in layers]


def test_the_readme_layout_lists_every_room_with_exactly_its_modules() -> None:
    rows = layout_rows()
    assert {room: modules for room, (_, modules) in rows.items()} == rooms_on_disk()


def test_the_readme_layout_gives_the_layers_the_import_contract_holds() -> None:
    rows = layout_rows()
    base = {f"cachesvc.{m}" for m in rows.pop("cachesvc")[1]}
    by_layer: dict[str, set[str]] = {}
    for room, (layer, _) in rows.items():
        by_layer.setdefault(layer, set()).add(room)
    readme = [by_layer[k] for k in sorted(by_layer, key=int, reverse=True)] + [base]
    assert readme == contract_layers()
