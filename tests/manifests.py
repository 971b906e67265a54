"""Reading the deployment files as Kubernetes and Compose would: a minimal
kustomize renderer (only what our kustomizations use: resources, components,
namespace, images, replicas, strategic-merge patches by file; it refuses
anything else), lookups in the rendered documents, and each container's
command line and environment as the kubelet builds them (envFrom, env with
ConfigMap/Secret/Downward API references, ``$(VAR)`` expansion).

Shared by tests/test_deploy_manifests.py (offline checks) and
tests/test_deploy_processes.py (the same processes, run for real).
"""

from __future__ import annotations

import base64
import copy
import re
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
DEFAULT_PORTS = {"agent": 8700, "peer": 8701}


# --- a minimal kustomize ------------------------------------------------------

KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "resources", "components", "namespace", "images", "replicas", "patches",
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
# The address of an example pod, for the Downward API's status.podIP.
POD_IP = "10.244.1.7"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path, extra_components: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Render a kustomization like `kubectl kustomize` would, for the fields we use."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(k) - KUSTOMIZATION_KEYS
    assert not unsupported, f"{directory}: the test renderer does not support {unsupported}"
    docs: list[dict[str, Any]] = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else load_docs(path)
    for component in [directory / c for c in k.get("components", [])] + list(extra_components):
        docs += render_component(component)
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


def split_image(image: str) -> tuple[str, str]:
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag


# --- reading rendered manifests -----------------------------------------------


def find(docs: list[dict], kind: str | None, name: str, kinds: set[str] | None = None) -> dict:
    found = [
        d
        for d in docs
        if d["metadata"]["name"] == name
        and (kind is None or d["kind"] == kind)
        and (kinds is None or d["kind"] in kinds)
    ]
    assert len(found) == 1, f"expected one {kind or kinds} named {name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def all_containers(docs: list[dict]) -> Iterator[dict]:
    for workload in workloads(docs):
        spec = pod_spec(workload)
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def is_cachesvc_image(image: str) -> bool:
    return split_image(image)[0].rsplit("/", 1)[-1] == "cachesvc"


def cachesvc_processes(docs: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(workload, container) for each container that runs the `cachesvc` entrypoint."""
    for workload in workloads(docs):
        for container in pod_spec(workload)["containers"]:
            if is_cachesvc_image(container["image"]) and "command" not in container:
                yield workload, container


def component_workload(docs: list[dict], command: str) -> tuple[dict, dict]:
    found = [(w, c) for w, c in cachesvc_processes(docs) if c["args"][0] == command]
    assert len(found) == 1, f"expected one workload running `cachesvc {command}`"
    return found[0]


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    return data | secret.get("stringData", {})


def pod_fields(workload: dict, pod_ip: str = POD_IP) -> dict[str, str]:
    """The Downward API fields (``fieldRef``) the manifests use, for one pod of
    the workload; a namespace-less workload lands in ``default``, as with
    ``kubectl apply`` without ``-n``."""
    namespace = workload["metadata"].get("namespace", "default")
    return {"metadata.namespace": namespace, "status.podIP": pod_ip}


def container_env(
    docs: list[dict], workload: dict, container: dict, pod_ip: str = POD_IP
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


def env_from(docs: list[dict], source: dict) -> dict[str, str]:
    if "configMapRef" in source:
        data = find(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    else:
        data = secret_data(find(docs, "Secret", source["secretRef"]["name"]))
    return {source.get("prefix", "") + k: v for k, v in data.items()}


def env_value(
    docs: list[dict], var: dict, defined: Mapping[str, str], fields: Mapping[str, str]
) -> str:
    if "value" in var:
        return expand(var["value"], defined)
    source = var["valueFrom"]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return secret_data(find(docs, "Secret", ref["name"]))[ref["key"]]
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return find(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
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


def container_args(container: dict, env: Mapping[str, str]) -> list[str]:
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
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with an empty environment."""
    return re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), str(value))


def compose_processes() -> Iterator[tuple[str, list[str], dict[str, str]]]:
    for name, service in compose()["services"].items():
        if is_cachesvc_image(service.get("image", "")) and "entrypoint" not in service:
            env = {k: interpolate(v) for k, v in service.get("environment", {}).items()}
            yield name, [str(a) for a in service["command"]], env
