"""Reading the deployment files as Kubernetes and Compose would: a minimal
kustomize renderer (only what our kustomizations use: resources, components,
namespace, images, replicas, strategic-merge patches by file, a
``secretGenerator`` from env files with kustomize's content-hash name suffix
and reference rewriting; it refuses anything else), lookups in the rendered
documents, and each container's command line and environment as the kubelet
builds them (envFrom, env with ConfigMap/Secret/Downward API references,
``$(VAR)`` expansion).

Secrets are never committed: the renders and compose environments here use
files made by ``deploy/generate-secrets.sh`` in a temporary directory, as an
operator makes them before deploying (a ``secrets.env`` of their own in the
checkout is never read).

Shared by tests/deploy/test_deploy_manifests.py (offline checks) and
tests/deploy/test_deploy_processes.py (the same processes, run for real).
"""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import json
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "k8s" / "base"
OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
SERVICEMONITOR = DEPLOY / "k8s" / "components" / "servicemonitor"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "cachesvc-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
GENERATE_SECRETS = DEPLOY / "generate-secrets.sh"
SECRET_NAME = "cachesvc-secrets"
DEFAULT_PORTS = {"agent": 8700, "peer": 8701}


# --- a minimal kustomize ------------------------------------------------------

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "components", "namespace", "images", "replicas", "patches",
    "secretGenerator",
}  # fmt: skip
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass",
}  # fmt: skip
# Strategic-merge keys (x-kubernetes-patch-merge-key) of the lists we patch;
# any other list is replaced whole, as kustomize does.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
    "volumeMounts": "mountPath", "imagePullSecrets": "name",
}  # fmt: skip
WORKLOADS = {"DaemonSet", "StatefulSet", "Deployment", "Job"}
Doc = dict[str, Any]  # one Kubernetes object, or a part of one
# The address of an example pod, for the Downward API's status.podIP.
POD_IP = "10.244.1.7"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(
    directory: Path,
    extra_components: tuple[Path, ...] = (),
    env_files: Mapping[str, Mapping[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Render a kustomization like `kubectl kustomize` would, for the fields we use.

    ``env_files`` gives the contents of a secretGenerator's env files by the
    name the kustomization uses (they are not in the checkout)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(k) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{directory}: the test renderer does not support {unsupported}"
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load_docs(path)
    for component in [directory / c for c in k.get("components", [])] + list(extra_components):
        docs += render_component(component)
    renamed = {}
    for generator in k.get("secretGenerator", []):
        secret = generate_secret(directory, generator, env_files or {})
        renamed[generator["name"]] = secret["metadata"]["name"]
        docs.append(secret)
    for patch in k.get("patches", []):
        assert set(patch) == {"path"}, f"{directory}: only `patches: - path:` is supported"
        apply_patch(docs, yaml.safe_load((directory / patch["path"]).read_text()))
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = k["namespace"]
    for image in k.get("images", []):
        set_image(docs, image)
    for replicas in k.get("replicas", []):
        find(docs, None, replicas["name"], kinds={"StatefulSet", "Deployment"})["spec"][
            "replicas"
        ] = replicas["count"]
    rename_secret_refs(docs, renamed)
    return docs


def render_component(directory: Path) -> list[dict[str, Any]]:
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert k["kind"] == "Component" and set(k) <= {"apiVersion", "kind", "resources"}
    return [doc for entry in k["resources"] for doc in load_docs(directory / entry)]


def apply_patch(docs: list[dict[str, Any]], patch: dict[str, Any]) -> None:
    target = find(docs, patch["kind"], patch["metadata"]["name"])
    merged = merge(copy.deepcopy(target), patch)
    target.clear()
    target.update(merged)


def merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """Strategic merge: maps merge, keyed lists merge by key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            merged[k] = merge(merged[k], v, k) if k in merged else v
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        merged_list = list(base)
        for item in patch:
            index = [i for i, old in enumerate(merged_list) if old[merge_key] == item[merge_key]]
            if index:
                merged_list[index[0]] = merge(merged_list[index[0]], item)
            else:
                merged_list.append(item)
        return merged_list
    return patch


def set_image(docs: list[dict[str, Any]], image: dict[str, str]) -> None:
    for container in all_containers(docs):
        name, tag = split_image(container["image"])
        if name == image["name"]:
            new_name = image.get("newName", name)
            new_tag = image.get("newTag", tag)
            container["image"] = f"{new_name}:{new_tag}" if new_tag else new_name


# --- secretGenerator (kustomize api/hasher, api/internal/generators) -----------


def generate_secret(
    directory: Path, generator: dict[str, Any], env_files: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    """The Secret a ``secretGenerator`` entry makes: type Opaque, ``data`` from
    its env files in order, the content hash appended to its name."""
    assert set(generator) == {"name", "envs"}, f"{directory}: only name and envs are supported"
    values: dict[str, str] = {}
    for name in generator["envs"]:
        if name in env_files:
            values |= env_files[name]
        else:
            values |= parse_env_file((directory / name).read_text())
    data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    name = f"{generator['name']}-{secret_hash(generator['name'], 'Opaque', data)}"
    return secret_doc(name, data)


def secret_doc(name: str, data: dict[str, str]) -> Doc:
    """A Secret of type Opaque with base64 ``data``."""
    metadata = {"name": name}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": data,
    }


def secret_hash(name: str, secret_type: str, data: Mapping[str, str]) -> str:
    """kustomize's name suffix: sha256 of the JSON of kind, name, type and data
    (Go's json.Marshal: sorted keys, no spaces), its first 10 hex digits with
    0, 1, 3, a, e replaced so that it never reads as a number or a word."""
    encoded = {"data": dict(data), "kind": "Secret", "name": name, "type": secret_type}
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (kustomize and compose alike): blank lines and ``#``
    comments skipped, the value taken as written (no quote handling)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            values[key] = value
    return values


def rename_secret_refs(docs: list[dict[str, Any]], renamed: Mapping[str, str]) -> None:
    """kustomize's name-reference fix-up for Secrets in pod templates."""
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
            refs += [
                v["valueFrom"]["secretKeyRef"]
                for v in container.get("env", [])
                if "secretKeyRef" in v.get("valueFrom", {})
            ]
            for ref in refs:
                ref["name"] = renamed.get(ref["name"], ref["name"])
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                old = volume["secret"]["secretName"]
                volume["secret"]["secretName"] = renamed.get(old, old)


def split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


# --- the builds, with secrets generated as an operator does -------------------


@functools.cache
def generated_secrets(mode: str) -> dict[str, str]:
    """What ``deploy/generate-secrets.sh MODE FILE`` writes (``k8s`` or
    ``compose``), parsed; made once per test session in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="cachesvc-secrets-") as tmp:
        path = Path(tmp) / "secrets.env"
        done = subprocess.run(
            ["sh", str(GENERATE_SECRETS), mode, str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return parse_env_file(path.read_text())


def render_overlay(extra_components: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The example overlay, its secretGenerator fed by generated secrets."""
    return render(OVERLAY, extra_components, {"secrets.env": generated_secrets("k8s")})


def render_base() -> list[dict[str, Any]]:
    """The base as an overlay completes it: plus the Secret it refers to, made
    from generated secrets under the name the base's references spell."""
    data = {k: base64.b64encode(v.encode()).decode() for k, v in generated_secrets("k8s").items()}
    return render(BASE) + [secret_doc(SECRET_NAME, data)]


def generated_name(docs: list[Doc]) -> str:
    """The name of the one Secret of a build: ``cachesvc-secrets``, with
    kustomize's hash suffix where a secretGenerator made it."""
    (secret,) = of_kind(docs, "Secret")
    name = secret["metadata"]["name"]
    assert re.fullmatch(rf"{SECRET_NAME}(-[0-9a-z]{{10}})?", name), name
    return str(name)


# --- reading rendered manifests -----------------------------------------------


def find(docs: list[Doc], kind: str | None, name: str, kinds: set[str] | None = None) -> Doc:
    found = [
        d
        for d in docs
        if d["metadata"]["name"] == name
        and (kind is None or d["kind"] == kind)
        and (kinds is None or d["kind"] in kinds)
    ]
    assert len(found) == 1, f"expected one {kind or kinds} named {name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Doc) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def all_containers(docs: list[Doc]) -> Iterator[Doc]:
    for workload in workloads(docs):
        spec = pod_spec(workload)
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def is_cachesvc_image(image: str) -> bool:
    return split_image(image)[0].rsplit("/", 1)[-1] == "cachesvc"


def cachesvc_processes(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for each container that runs the `cachesvc` entrypoint."""
    for workload in workloads(docs):
        for container in pod_spec(workload)["containers"]:
            if is_cachesvc_image(container["image"]) and "command" not in container:
                yield workload, container


def component_workload(docs: list[Doc], command: str) -> tuple[Doc, Doc]:
    found = [(w, c) for w, c in cachesvc_processes(docs) if c["args"][0] == command]
    assert len(found) == 1, f"expected one workload running `cachesvc {command}`"
    return found[0]


def secret_data(secret: Doc) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    string_data: dict[str, str] = secret.get("stringData", {})
    return data | string_data


def pod_fields(workload: Doc, pod_ip: str = POD_IP) -> dict[str, str]:
    """The Downward API fields (``fieldRef``) the manifests use, for one pod of
    the workload; a namespace-less workload lands in ``default``, as with
    ``kubectl apply`` without ``-n``."""
    namespace = workload["metadata"].get("namespace", "default")
    return {"metadata.namespace": namespace, "status.podIP": pod_ip}


def container_env(
    docs: list[Doc], workload: Doc, container: Doc, pod_ip: str = POD_IP
) -> dict[str, str]:
    """The environment the container starts with, as the kubelet builds it:
    ``envFrom`` sources in order, then ``env`` in order (a later name wins),
    each ``value`` expanded against the names defined before it."""
    fields = pod_fields(workload, pod_ip)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= env_from(docs, source)
    for var in container.get("env", []):
        env[var["name"]] = env_value(docs, var, env, fields)
    return env


def env_from(docs: list[Doc], source: Doc) -> dict[str, str]:
    if "configMapRef" in source:
        data = find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    else:
        data = secret_data(find(docs, "Secret", source["secretRef"]["name"]))
    return {source.get("prefix", "") + k: v for k, v in data.items()}


def env_value(
    docs: list[Doc], var: Doc, defined: Mapping[str, str], fields: Mapping[str, str]
) -> str:
    if "value" in var:
        return expand(var["value"], defined)
    source = var["valueFrom"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return secret_data(find(docs, "Secret", ref["name"]))[ref["key"]]
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return str(find(docs, "ConfigMap", ref["name"])["data"][ref["key"]])
    field = source["fieldRef"]["fieldPath"]
    assert field in fields, source
    return fields[field]


def expand(text: str, defined: Mapping[str, str]) -> str:
    """Kubernetes' ``$(NAME)`` expansion (env values, command, args): a defined
    name is replaced, an undefined one stays as written, ``$$`` is a literal
    ``$`` (so ``$$(NAME)`` gives ``$(NAME)``)."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return defined.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([^)]*)\)", one, text)


def container_args(container: Doc, env: Mapping[str, str]) -> list[str]:
    """``args`` as the process receives them: expanded against its environment."""
    return [expand(arg, env) for arg in container.get("args", [])]


def flag_value(args: list[str], env: dict[str, str], flag: str) -> str | None:
    for i, token in enumerate(args):
        if token == flag:
            return args[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return env.get("CACHESVC_" + flag[2:].upper().replace("-", "_"))


def listen_port(command: str, args: list[str], env: dict[str, str]) -> int:
    listen = flag_value(args, env, "--listen")
    return int(listen.rpartition(":")[2]) if listen else DEFAULT_PORTS[command]


# --- docker compose -------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def interpolate(value: str, environment: Mapping[str, str]) -> str:
    """Compose's interpolation: ``$$``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, and ``${VAR:?error}``/``${VAR?error}``, which fail
    like ``docker compose`` when VAR is unset (``:`` forms: or empty)."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        value = environment.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("?"):
            assert not missing, f"compose refuses to start: {name}: {arg}"
        return arg if missing and op.endswith("-") else (value or "")

    return re.sub(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}", one, str(value))


def compose_processes(
    environment: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """(service, command, environment) of each cachesvc service, interpolated
    against ``environment`` (default: what ``generate-secrets.sh compose`` writes)."""
    given = generated_secrets("compose") if environment is None else environment
    for name, service in compose()["services"].items():
        if is_cachesvc_image(service.get("image", "")) and "entrypoint" not in service:
            env = {k: interpolate(v, given) for k, v in service.get("environment", {}).items()}
            yield name, [str(a) for a in service["command"]], env
