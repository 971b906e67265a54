"""Nothing secret is committed, and the image has one tag.

- Secrets: no Secret object and no placeholder or default credential in any
  deploy file; the example overlay generates ``cachesvc-secrets`` with a
  ``secretGenerator`` from a file ``deploy/generate-secrets.sh`` writes (fresh,
  mode 0600, git-ignored), its name carrying kustomize's content hash; compose
  refuses to start without its secrets.
- The image tag: the version in pyproject.toml, in the Dockerfile, compose, the
  base, the overlay, and every build/tag/push command in the docs.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.manifests import (
    BASE,
    COMPOSE,
    DEPLOY,
    DOCKERFILE,
    GENERATE_SECRETS,
    OVERLAY,
    ROOT,
    SECRET_NAME,
    all_containers,
    compose_processes,
    generated_name,
    generated_secrets,
    is_cachesvc_image,
    load_docs,
    of_kind,
    parse_env_file,
    render,
    render_base,
    render_overlay,
    secret_data,
    secret_hash,
    split_image,
)

BUILDS = {"base": render_base(), "overlay": render_overlay()}


# --- secrets: generated, never committed -------------------------------------------

SECRET_KEYS = {"token", "peer-token", "aws-access-key-id", "aws-secret-access-key"}
COMPOSE_SECRETS = {
    "CACHESVC_TOKEN", "CACHESVC_PEER_TOKEN", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
}  # fmt: skip
# Placeholder or default credentials (what main had: change-me-*, dev-*-token,
# cachesvc-dev-secret), MinIO's default, and the example key people copy.
PLACEHOLDER = re.compile(
    r"change-?me|changeit|dev-\w*-?token|dev-secret|minioadmin|AKIAIOSFODNN7EXAMPLE", re.I
)


def deploy_files() -> list[Path]:
    """Every file under deploy/ and the Dockerfile, except what git ignores
    (an operator's own generated secrets)."""
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DOCKERFILE]
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "--stdin"],
        input="\n".join(str(p) for p in files),
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return [p for p in files if str(p) not in ignored]


def test_no_deploy_file_commits_a_secret_or_a_placeholder_credential() -> None:
    for path in deploy_files():
        if path.suffix == ".md":
            continue  # prose; its commands are checked where they are run
        text = path.read_text()
        assert not PLACEHOLDER.search(text), f"{path}: {PLACEHOLDER.search(text)}"
        if path.suffix in (".yaml", ".yml"):
            for doc in load_docs(path):
                assert doc.get("kind") != "Secret", f"{path}: a Secret object is committed"


def test_compose_gives_its_secrets_no_default_and_refuses_to_start_without_them() -> None:
    text = COMPOSE.read_text()
    for name in COMPOSE_SECRETS:
        uses = re.findall(rf"\$\{{{name}(:?[-?])?[^}}]*\}}", text)
        assert uses and set(uses) == {":?"}, (name, uses)
    with pytest.raises(AssertionError, match="compose refuses to start: [A-Z_]+: run deploy/gen"):
        list(compose_processes(environment={}))


def test_the_generated_secrets_are_fresh_random_and_where_git_ignores_them(tmp_path: Path) -> None:
    for mode, keys in (("k8s", SECRET_KEYS), ("compose", COMPOSE_SECRETS)):
        first, second = tmp_path / f"{mode}-1", tmp_path / f"{mode}-2"
        for path in (first, second):
            subprocess.run(["sh", str(GENERATE_SECRETS), mode, str(path)], check=True, timeout=30)
            assert path.stat().st_mode & 0o777 == 0o600
        one, two = parse_env_file(first.read_text()), parse_env_file(second.read_text())
        assert set(one) == keys == set(generated_secrets(mode))
        for key in keys:
            assert one[key] != two[key] and len(one[key]) >= 16, key  # fresh, long enough
    again = subprocess.run(["sh", str(GENERATE_SECRETS), "k8s", str(first)], check=False)
    assert again.returncode == 1  # never overwrites
    defaults = [DEPLOY / ".env", OVERLAY / "secrets.env"]
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", *map(str, defaults)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.stdout.split() == [str(p) for p in defaults]


def test_the_overlay_generates_the_secret_every_workload_refers_to_with_a_content_hash() -> None:
    k = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    (generator,) = k["secretGenerator"]
    assert generator == {"name": SECRET_NAME, "envs": ["secrets.env"]}
    docs = BUILDS["overlay"]
    (secret,) = of_kind(docs, "Secret")
    assert set(secret_data(secret)) == SECRET_KEYS
    assert secret_data(secret) == generated_secrets("k8s")
    refs = {
        var["valueFrom"]["secretKeyRef"]["name"]
        for container in all_containers(docs)
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    assert refs == {secret["metadata"]["name"]}
    assert not of_kind(render(BASE), "Secret")  # the base leaves the Secret to the overlay


def test_the_secret_name_suffix_is_kustomizes_content_hash() -> None:
    # kustomize's own test vector (api/hasher/hasher_test.go, TestSecretHash "one key").
    assert secret_hash("", "my-type", {"one": ""}) == "74bd68bm66"
    other = render_overlay()  # same generated values: same name; kustomize is deterministic
    assert generated_name(other) == generated_name(BUILDS["overlay"])


# --- one image tag ------------------------------------------------------------------

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# An image reference to cachesvc in any text: [registry/path/]cachesvc:TAG.
IMAGE_REF = re.compile(r"(?<![\w.-])((?:[\w.-]+(?::\d+)?/)*cachesvc):([\w][\w.-]*)")
PUSHED = "registry.example.com/platform/cachesvc"  # the overlay's newName


def image_refs(text: str) -> list[tuple[str, str]]:
    # `chown cachesvc:cachesvc` (user:group) is the one lookalike.
    return [(name, tag) for name, tag in IMAGE_REF.findall(text) if tag != "cachesvc"]


def tag_sources() -> list[Path]:
    markdown = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted({*(ROOT / m for m in markdown), *deploy_files()})


def test_every_cachesvc_image_tag_is_the_package_version() -> None:
    found: dict[Path, set[str]] = {}
    for path in tag_sources():
        for name, tag in image_refs(path.read_text()):
            assert tag == VERSION, f"{path.relative_to(ROOT)}: {name}:{tag}, not :{VERSION}"
            found.setdefault(path.relative_to(ROOT), set()).add(name)
    named = {"Dockerfile", "README.md", "deploy/README.md", "deploy/docker-compose.yml"}
    assert named <= {str(p) for p in found}, "a source of the image tag names none"
    for build, name in (("base", "cachesvc"), ("overlay", PUSHED)):
        images = {c["image"] for c in all_containers(BUILDS[build])}
        assert {i for i in images if is_cachesvc_image(i)} == {f"{name}:{VERSION}"}, build
    assert re.search(rf'org.opencontainers.image.version="{VERSION}"', DOCKERFILE.read_text())


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md"])
def test_the_docs_build_tag_and_push_the_image_the_overlay_pulls(doc: str) -> None:
    text = (ROOT / doc).read_text()
    (image,) = [i for i in yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["images"]]
    pulled = f"{image['newName']}:{image['newTag']}"
    assert split_image(pulled) == (PUSHED, VERSION)
    assert re.search(rf"^docker build -t cachesvc:{VERSION} \.", text, flags=re.M), doc
    assert re.search(rf"^docker tag cachesvc:{VERSION} {re.escape(pulled)}$", text, flags=re.M)
    assert re.search(rf"^docker push {re.escape(pulled)}$", text, flags=re.M), doc
