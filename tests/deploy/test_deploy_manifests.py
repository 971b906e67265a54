"""The deployment files (deploy/, Dockerfile) agree with the schemas, the
contract and each other, checked offline in well under a second.

- Kubernetes: the base and the example overlay are rendered by a small
  kustomize renderer (tests/manifests.py: only what our kustomizations use,
  it refuses anything else) and every document is validated against the
  Kubernetes 1.30 OpenAPI schemas shipped with kubernetes-validate (strict:
  unknown fields fail). No kubectl or kustomize binary is needed; the
  renderer's output was compared with `kubectl kustomize` (v5.5.0) when it
  was written.
- Command lines and CACHESVC_* variables of every cachesvc container in the
  manifests and in docker-compose.yml map to flags: once against the
  contract's flag table (shared/CONTRACT.md), once against the real parser
  `cachesvc.cli.main.build_parser()`, which must also accept each command line
  with its environment.
- Wiring: probes, ports, scrape annotations, Secret and ConfigMap keys,
  the headless Service, NetworkPolicy reachability (simulated from the pod
  labels), volumes, sizes, the bucket, the ServiceMonitor component,
  Prometheus targets, the Grafana dashboard's metric names and the image.

Secrets (none committed, generated) and the image tag (one everywhere) are
checked in tests/deploy/test_deploy_secrets_and_tags.py; the builds here use freshly
generated secrets (tests/manifests.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest
import yaml

from tests.manifests import (
    BASE,
    COMPOSE,
    DASHBOARD,
    DEFAULT_PORTS,
    DOCKERFILE,
    POD_IP,
    PROMETHEUS,
    ROOT,
    SECRET_NAME,
    SERVICEMONITOR,
    WORKLOADS,
    Doc,
    all_containers,
    cachesvc_processes,
    component_workload,
    compose,
    compose_processes,
    container_env,
    find,
    flag_value,
    generated_name,
    is_cachesvc_image,
    listen_port,
    of_kind,
    pod_labels,
    pod_spec,
    render,
    render_base,
    render_overlay,
    secret_data,
    workloads,
)

K8S_VERSION = "1.30"

# shared/CONTRACT.md, "Command line": the flags of the two long-running commands.
CONTRACT_FLAGS = {
    "agent": {
        "--listen", "--cache-dir", "--cache-size", "--peers", "--origin", "--s3-endpoint",
        "--code-dir", "--max-package-size", "--max-unpacked-size", "--max-files",
    },
    "peer": {"--listen", "--cache-dir", "--cache-size", "--origin", "--s3-endpoint", "--peers"},
}  # fmt: skip
# Flags beyond the contract's first table that the deploy files use (the
# contract's later flags, like --advertise on agents for fan-out, and our own);
# the real-parser test checks that they exist.
EXTENSION_FLAGS = {
    "agent": {"--shutdown-grace", "--advertise"},
    "peer": {"--shutdown-grace", "--advertise"},
}
# Environment-only secrets of the contract: no flag, never in args or ConfigMaps.
SECRET_ENV = {"CACHESVC_TOKEN", "CACHESVC_PEER_TOKEN"}

# shared/CONTRACT.md "Metrics", plus the ones the deploy issue names.
METRICS = {
    "cachesvc_requests_total", "cachesvc_upstream_fetches_total", "cachesvc_coalesced_total",
    "cachesvc_digest_mismatch_total", "cachesvc_cache_bytes", "cachesvc_cache_entries",
    "cachesvc_evictions_total", "cachesvc_request_seconds", "cachesvc_bytes_served_total",
}  # fmt: skip
HISTOGRAMS = {"cachesvc_request_seconds"}
LABEL_VALUES = {
    "tier": {"L1", "L2", "ORIGIN"},
    "upstream": {"origin", "peer"},
    "outcome": {"ok", "not_found", "error", "timeout", "mismatch"},
}

# Labels of pods outside this install that the NetworkPolicies admit.
OPERATOR = {"cachesvc.io/operator": "true"}
CLIENT = {"cachesvc.io/client": "true"}
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}
MONITORING_NS = {"kubernetes.io/metadata.name": "monitoring"}


def container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port}"
    return int(named[0])


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMGT]i)?B?", text)
    assert match, f"not a size: {text}"
    unit = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[match.group(2)]
    return int(match.group(1)) * unit


# --- label selectors and NetworkPolicy reachability -----------------------------


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(expression_holds(e, labels) for e in selector.get("matchExpressions", []))


def expression_holds(expression: Doc, labels: dict[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values: list[str] = expression.get("values") or []
    return {
        "In": lambda: labels.get(key) in values,
        "NotIn": lambda: labels.get(key) not in values,
        "Exists": lambda: key in labels,
        "DoesNotExist": lambda: key not in labels,
    }[operator]()


def peer_admits(peer: Doc, source: Doc) -> bool:
    """One `from` entry against a source {labels, namespace, namespace_labels, same_ns}."""
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], source["namespace_labels"]):
            return False
    elif not source["same_ns"]:
        return False
    return selects(peer.get("podSelector", {}), source["labels"])


def rule_admits(rule: Doc, source: Doc, port: int) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") == port for p in ports):
        return False
    return "from" not in rule or any(peer_admits(p, source) for p in rule["from"])


def reachable(docs: list[Doc], target: dict[str, str], source: Doc, port: int) -> bool:
    policies = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not policies:
        return True
    return any(rule_admits(r, source, port) for p in policies for r in p["spec"]["ingress"])


def pod_in(labels: dict[str, str], namespace: str = "here", **ns_labels: str) -> Doc:
    return {
        "labels": labels,
        "same_ns": namespace == "here",
        "namespace_labels": {"kubernetes.io/metadata.name": namespace} | ns_labels,
    }


# --- what the tests iterate over ------------------------------------------------

# The base as an overlay completes it (plus the Secret), and the example overlay.
BUILDS = {"base": render_base(), "overlay": render_overlay()}


def command_lines() -> list[tuple[str, list[str], dict[str, str]]]:
    lines = [
        (f"{build}/{w['kind']}/{w['metadata']['name']}", c["args"], container_env(docs, w, c))
        for build, docs in BUILDS.items()
        for w, c in cachesvc_processes(docs)
    ]
    return lines + [(f"compose/{name}", args, env) for name, args, env in compose_processes()]


COMMAND_LINES = command_lines()
COMMAND_IDS = [where for where, _, _ in COMMAND_LINES]
DOCS = [(build, doc) for build, docs in BUILDS.items() for doc in docs]
DOC_IDS = [f"{build}/{doc['kind']}/{doc['metadata']['name']}" for build, doc in DOCS]


def env_flag(name: str) -> str:
    return "--" + name.removeprefix("CACHESVC_").lower().replace("_", "-")


def check_flags(args: list[str], env: dict[str, str], known: set[str]) -> list[str]:
    """What in a command line and its environment is not a flag of `known`."""
    flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("-")}
    wrong = sorted(flags - known)
    wrong += sorted(
        name
        for name in env
        if name.startswith("CACHESVC_") and name not in SECRET_ENV and env_flag(name) not in known
    )
    return wrong


def real_parser() -> argparse.ArgumentParser:
    from cachesvc.cli.main import build_parser  # the lead's parser (shared/CONTRACT.md)

    return build_parser()


def subcommand_flags(parser: argparse.ArgumentParser, command: str) -> set[str]:
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert subparsers, "build_parser() has no subcommands"
    assert command in subparsers[0].choices, f"build_parser() has no `{command}` command"
    return set(subparsers[0].choices[command]._option_string_actions)


# --- schemas and rendering ------------------------------------------------------


@pytest.mark.parametrize(("build", "doc"), DOCS, ids=DOC_IDS)
def test_every_rendered_manifest_is_valid_against_the_kubernetes_schema(
    build: str, doc: Doc
) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_base_has_a_daemonset_a_statefulset_behind_a_headless_service_and_minio() -> None:
    docs = render(BASE)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    expected = {
        ("DaemonSet", "cachesvc-agent"), ("StatefulSet", "cachesvc-peer"),
        ("Service", "cachesvc-peer"), ("PodDisruptionBudget", "cachesvc-peer"),
        ("StatefulSet", "minio"), ("Service", "minio"), ("Job", "minio-create-bucket"),
        ("ConfigMap", "cachesvc-config"),
    }  # fmt: skip
    assert expected <= kinds
    assert {"cachesvc-agent", "cachesvc-peer", "minio"} <= {
        p["metadata"]["name"] for p in of_kind(docs, "NetworkPolicy")
    }


def test_the_base_is_namespace_less_and_the_overlay_puts_everything_in_its_namespace() -> None:
    assert all("namespace" not in d["metadata"] for d in BUILDS["base"])
    overlay = BUILDS["overlay"]
    namespace = find(overlay, "Namespace", "cachesvc")["metadata"]["name"]
    for doc in overlay:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    base_names = {(d["kind"], d["metadata"]["name"]) for d in BUILDS["base"]}
    unhashed = {generated_name(overlay): SECRET_NAME}  # the overlay's has a hash suffix
    assert base_names | {("Namespace", "cachesvc")} == {
        (d["kind"], unhashed.get(d["metadata"]["name"], d["metadata"]["name"])) for d in overlay
    }


def test_the_overlay_sets_the_image_the_cache_sizes_the_storage_and_the_peer_count() -> None:
    docs = BUILDS["overlay"]
    images = [c["image"] for c in all_containers(docs) if is_cachesvc_image(c["image"])]
    assert len(images) == 3  # the agent, its init container and the peer
    assert set(images) == {"registry.example.com/platform/cachesvc:0.1.0"}
    agent, agent_container = component_workload(docs, "agent")
    peer, peer_container = component_workload(docs, "peer")
    assert container_env(docs, agent, agent_container)["CACHESVC_CACHE_SIZE"] == "100GiB"
    assert container_env(docs, peer, peer_container)["CACHESVC_CACHE_SIZE"] == "180GiB"
    assert agent_container["resources"]["limits"]["cpu"] == "4"
    assert peer["spec"]["replicas"] == 5
    claim = peer["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["resources"]["requests"]["storage"] == "200Gi"
    # What the patches did not touch survives them.
    assert agent_container["args"][0] == "agent" and agent_container["livenessProbe"]
    assert find(docs, "ConfigMap", "cachesvc-agent-config")["data"]["CACHESVC_MAX_FILES"]


# --- command lines and environment ------------------------------------------------


@pytest.mark.parametrize(("where", "args", "env"), COMMAND_LINES, ids=COMMAND_IDS)
def test_every_cachesvc_command_line_and_env_var_is_a_flag_of_the_contract(
    where: str, args: list[str], env: dict[str, str]
) -> None:
    assert args[0] in CONTRACT_FLAGS, f"{where}: unexpected command {args[0]}"
    known = CONTRACT_FLAGS[args[0]] | EXTENSION_FLAGS[args[0]]
    assert check_flags(args, env, known) == []


@pytest.mark.parametrize(("where", "args", "env"), COMMAND_LINES, ids=COMMAND_IDS)
def test_every_cachesvc_command_line_and_env_var_is_a_flag_of_the_real_parser(
    where: str, args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [n for n in os.environ if n.startswith("CACHESVC_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = real_parser()
    assert check_flags(args, env, subcommand_flags(parser, args[0])) == []
    parser.parse_args(args)  # exits (SystemExit) on anything it does not accept


def test_the_cachesvc_containers_of_both_builds_and_compose_are_agents_and_peers() -> None:
    commands = sorted(args[0] for _, args, _ in COMMAND_LINES)
    assert commands == ["agent"] * 4 + ["peer"] * 5  # 1+1 in k8s, 2 agents and 3 peers in compose


@pytest.mark.parametrize(("where", "args", "env"), COMMAND_LINES, ids=COMMAND_IDS)
def test_secrets_reach_cachesvc_only_through_the_environment(
    where: str, args: list[str], env: dict[str, str]
) -> None:
    assert SECRET_ENV <= set(env), f"{where} lacks a token"
    for secret in SECRET_ENV | {"AWS_SECRET_ACCESS_KEY"}:
        assert env[secret] and env[secret] not in " ".join(args)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


@pytest.mark.parametrize("build", BUILDS)
def test_tokens_and_credentials_come_from_the_secret_never_a_configmap(build: str) -> None:
    docs = BUILDS[build]
    sensitive = SECRET_ENV | {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for config in of_kind(docs, "ConfigMap"):
        assert not sensitive & set(config["data"]), config["metadata"]["name"]
    for _, container in cachesvc_processes(docs):
        by_name = {v["name"]: v for v in container["env"]}
        for name in sensitive:
            assert by_name[name]["valueFrom"]["secretKeyRef"]["name"] == generated_name(docs)


@pytest.mark.parametrize("build", BUILDS)
def test_every_referenced_secret_and_configmap_key_exists(build: str) -> None:
    docs = BUILDS[build]
    for container in all_containers(docs):
        for source in container.get("envFrom", []):
            find(docs, "ConfigMap", source["configMapRef"]["name"])
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            for kind, ref_key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if ref_key in source:
                    ref = source[ref_key]
                    data = find(docs, kind, ref["name"])
                    keys = secret_data(data) if kind == "Secret" else data["data"]
                    assert ref["key"] in keys, f"{container['name']}: {kind} key {ref['key']}"


@pytest.mark.parametrize("build", BUILDS)
def test_agents_follow_the_peers_headless_service_by_dns(build: str) -> None:
    docs = BUILDS[build]
    agent, container = component_workload(docs, "agent")
    env = container_env(docs, agent, container)
    service = find(docs, "Service", "cachesvc-peer")
    namespace = agent["metadata"].get("namespace", "default")
    port = service["spec"]["ports"][0]["port"]
    expected = f"dns+http://cachesvc-peer.{namespace}.svc.cluster.local:{port}"
    assert flag_value(container["args"], env, "--peers") == expected


# --- ports, probes, scraping --------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("command", ["agent", "peer"])
def test_probes_hit_healthz_and_readyz_on_the_port_cachesvc_listens_on(
    build: str, command: str
) -> None:
    docs = BUILDS[build]
    workload, container = component_workload(docs, command)
    port = listen_port(command, container["args"], container_env(docs, workload, container))
    assert port == DEFAULT_PORTS[command]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe, path in (
        ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz"),
    ):  # fmt: skip
        get = container[probe]["httpGet"]
        assert get["path"] == path and get.get("scheme", "HTTP") == "HTTP"
        assert container_port(container, get["port"]) == port
    assert container_env(docs, workload, container)
    assert str(flag_value(container["args"], {}, "--listen")).startswith("0.0.0.0:")


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("command", ["agent", "peer"])
def test_scrape_annotations_name_the_metrics_port(build: str, command: str) -> None:
    docs = BUILDS[build]
    workload, container = component_workload(docs, command)
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]


@pytest.mark.parametrize("build", BUILDS)
def test_the_agent_is_reached_from_its_node_through_a_host_port(build: str) -> None:
    _, container = component_workload(BUILDS[build], "agent")
    (port,) = container["ports"]
    assert port["hostPort"] == port["containerPort"] == 8700
    assert not pod_spec(component_workload(BUILDS[build], "agent")[0]).get("hostNetwork")


# --- the peers: headless Service, StatefulSet, PDB ----------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_the_headless_service_selects_the_statefulset_pods_and_only_them(build: str) -> None:
    docs = BUILDS[build]
    service = find(docs, "Service", "cachesvc-peer")
    peer, container = component_workload(docs, "peer")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is False
    assert peer["kind"] == "StatefulSet" and peer["spec"]["serviceName"] == "cachesvc-peer"
    selector = {"matchLabels": service["spec"]["selector"]}
    assert [w["metadata"]["name"] for w in workloads(docs) if selects(selector, pod_labels(w))] == [
        "cachesvc-peer"
    ]
    assert selects(peer["spec"]["selector"], pod_labels(peer))
    (port,) = service["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == port["port"] == 8701


@pytest.mark.parametrize("build", BUILDS)
def test_every_service_selects_pods_and_targets_their_ports(build: str) -> None:
    docs = BUILDS[build]
    for service in of_kind(docs, "Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        selected = [w for w in workloads(docs) if selects(selector, pod_labels(w))]
        assert selected, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            for workload in selected:
                (container,) = pod_spec(workload)["containers"]
                container_port(container, port["targetPort"])


@pytest.mark.parametrize("build", BUILDS)
def test_the_disruption_budget_lets_one_peer_go_at_a_time(build: str) -> None:
    docs = BUILDS[build]
    budget = find(docs, "PodDisruptionBudget", "cachesvc-peer")["spec"]
    peer, _ = component_workload(docs, "peer")
    assert selects(budget["selector"], pod_labels(peer))
    assert budget["maxUnavailable"] == 1 < peer["spec"]["replicas"]
    others = [w for w in workloads(docs) if w is not peer]
    assert not any(selects(budget["selector"], pod_labels(w)) for w in others)


# --- volumes and sizes --------------------------------------------------------------


def mount_source(workload: Doc, container: Doc, path: str | None) -> Doc:
    assert path is not None, "no such flag"
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    claims = {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}
    if mount["name"] in claims:
        return {"claim": claims[mount["name"]]}
    volumes: list[Doc] = [v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"]]
    (volume,) = volumes
    return volume


@pytest.mark.parametrize("build", BUILDS)
def test_agent_cache_and_code_dirs_are_host_paths_and_code_paths_match_the_host(build: str) -> None:
    docs = BUILDS[build]
    agent, container = component_workload(docs, "agent")
    env = container_env(docs, agent, container)
    for flag in ("--cache-dir", "--code-dir"):
        path = flag_value(container["args"], env, flag)
        volume = mount_source(agent, container, path)
        assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    code_dir = flag_value(container["args"], env, "--code-dir")
    assert mount_source(agent, container, code_dir)["hostPath"]["path"] == code_dir
    (init,) = pod_spec(agent)["initContainers"]
    assert {m["mountPath"] for m in init["volumeMounts"]} <= set(init["command"])


@pytest.mark.parametrize("build", BUILDS)
def test_the_peer_cache_lives_on_a_claim_and_fits_in_it_with_headroom(build: str) -> None:
    docs = BUILDS[build]
    peer, container = component_workload(docs, "peer")
    env = container_env(docs, peer, container)
    source = mount_source(peer, container, flag_value(container["args"], env, "--cache-dir"))
    storage = source["claim"]["spec"]["resources"]["requests"]["storage"]
    assert parse_size(env["CACHESVC_CACHE_SIZE"]) <= 0.9 * parse_size(storage)


@pytest.mark.parametrize("build", BUILDS)
def test_containers_run_unprivileged_with_requests_and_limits(build: str) -> None:
    docs = BUILDS[build]
    for workload in workloads(docs):
        spec = pod_spec(workload)
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert set(security["capabilities"].get("add", [])) <= {"CHOWN"}
            if container in spec["containers"]:
                assert spec["securityContext"]["runAsNonRoot"] is True
                assert spec["securityContext"]["runAsUser"] != 0
                assert "runAsUser" not in security


# --- NetworkPolicy ----------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_every_network_policy_selects_pods_of_this_install_on_their_ports(build: str) -> None:
    docs = BUILDS[build]
    for policy in of_kind(docs, "NetworkPolicy"):
        selected = [
            w for w in workloads(docs) if selects(policy["spec"]["podSelector"], pod_labels(w))
        ]
        assert len(selected) == 1, policy["metadata"]["name"]
        ports = {
            p["containerPort"] for c in pod_spec(selected[0])["containers"] for p in c["ports"]
        }
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= ports


@pytest.mark.parametrize("build", BUILDS)
def test_in_cluster_sources_named_by_network_policies_are_real_pods_or_documented_labels(
    build: str,
) -> None:
    docs = BUILDS[build]
    labels = [pod_labels(w) for w in workloads(docs)]
    for policy in of_kind(docs, "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                selector = peer["podSelector"]
                external = selector.get("matchLabels") in (OPERATOR, CLIENT, PROMETHEUS_POD)
                assert external or any(selects(selector, pod) for pod in labels), selector


def labels_of(docs: list[Doc], name: str) -> dict[str, str]:
    return pod_labels(find(docs, None, name, kinds=WORKLOADS))


@pytest.mark.parametrize("build", BUILDS)
def test_only_agents_peers_operators_and_prometheus_reach_the_peers(build: str) -> None:
    docs = BUILDS[build]
    peer = labels_of(docs, "cachesvc-peer")
    agent = labels_of(docs, "cachesvc-agent")
    admitted = [
        pod_in(agent), pod_in(peer), pod_in(OPERATOR),
        pod_in(PROMETHEUS_POD, "monitoring"),
    ]  # fmt: skip
    refused = [
        pod_in({"app": "something-else"}), pod_in(CLIENT), pod_in(CLIENT, "functions"),
        pod_in(OPERATOR, "elsewhere"), pod_in(PROMETHEUS_POD, "elsewhere"),
        pod_in(labels_of(docs, "minio")),
    ]  # fmt: skip
    assert all(reachable(docs, peer, source, 8701) for source in admitted)
    assert not any(reachable(docs, peer, source, 8701) for source in refused)
    assert not reachable(docs, peer, pod_in(agent), 9000)


@pytest.mark.parametrize("build", BUILDS)
def test_only_runtimes_operators_and_prometheus_reach_the_agents(build: str) -> None:
    docs = BUILDS[build]
    agent = labels_of(docs, "cachesvc-agent")
    admitted = [
        pod_in(CLIENT), pod_in(CLIENT, "functions"), pod_in(OPERATOR),
        pod_in(PROMETHEUS_POD, "monitoring"),
    ]  # fmt: skip
    refused = [
        pod_in({"app": "something-else"}), pod_in(OPERATOR, "elsewhere"),
        pod_in(labels_of(docs, "cachesvc-peer")), pod_in(labels_of(docs, "minio")),
    ]  # fmt: skip
    assert all(reachable(docs, agent, source, 8700) for source in admitted)
    assert not any(reachable(docs, agent, source, 8700) for source in refused)


@pytest.mark.parametrize("build", BUILDS)
def test_only_the_tiers_the_bucket_job_and_operators_reach_minio(build: str) -> None:
    docs = BUILDS[build]
    minio = labels_of(docs, "minio")
    admitted = [
        pod_in(labels_of(docs, name))
        for name in ("cachesvc-agent", "cachesvc-peer", "minio-create-bucket")
    ] + [pod_in(OPERATOR)]
    refused = [pod_in({"app": "something-else"}), pod_in(CLIENT), pod_in(OPERATOR, "elsewhere")]
    assert all(reachable(docs, minio, source, 9000) for source in admitted)
    assert not any(reachable(docs, minio, source, 9000) for source in refused)
    assert not reachable(docs, minio, pod_in(labels_of(docs, "cachesvc-agent")), 9001)


# --- the origin ---------------------------------------------------------------------


def origin_bucket(env: dict[str, str]) -> str:
    match = re.fullmatch(r"s3://([a-z0-9.-]+)(/.*)?", env["CACHESVC_ORIGIN"])
    assert match, env["CACHESVC_ORIGIN"]
    return match.group(1)


@pytest.mark.parametrize("build", BUILDS)
def test_the_bucket_job_creates_the_bucket_the_origin_names_on_the_minio_service(
    build: str,
) -> None:
    docs = BUILDS[build]
    for workload, container in cachesvc_processes(docs):
        env = container_env(docs, workload, container)
        (script,) = find(docs, "Job", "minio-create-bucket")["spec"]["template"]["spec"][
            "containers"
        ][0]["command"][2:]
        assert f"mb --ignore-existing origin/{origin_bucket(env)}\n" in script
        service = find(docs, "Service", "minio")
        endpoint = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
        assert env["CACHESVC_S3_ENDPOINT"] == endpoint
        assert f"alias set origin {endpoint} " in script


def test_minio_uses_the_same_credentials_the_tiers_use() -> None:
    docs = BUILDS["base"]
    (minio,) = pod_spec(find(docs, "StatefulSet", "minio"))["containers"]
    refs = {v["name"]: v["valueFrom"]["secretKeyRef"]["key"] for v in minio["env"]}
    assert refs == {
        "MINIO_ROOT_USER": "aws-access-key-id",
        "MINIO_ROOT_PASSWORD": "aws-secret-access-key",
    }
    assert len(secret_data(find(docs, "Secret", SECRET_NAME))["aws-secret-access-key"]) >= 8


# --- the optional ServiceMonitor ------------------------------------------------------


def test_the_servicemonitor_component_scrapes_the_agent_and_peer_services_by_port_name() -> None:
    docs = render_overlay(extra_components=(SERVICEMONITOR,))
    monitor = find(docs, "ServiceMonitor", "cachesvc")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == "cachesvc"
    spec = monitor["spec"]
    assert set(spec) == {"selector", "endpoints"}  # same namespace as the Services
    scraped = [
        s for s in of_kind(docs, "Service") if selects(spec["selector"], s["metadata"]["labels"])
    ]
    assert sorted(s["metadata"]["name"] for s in scraped) == ["cachesvc-agent", "cachesvc-peer"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in scraped:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # Everything else still validates with the component on.
    for doc in docs:
        if doc is not monitor:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_servicemonitor_is_not_in_the_base_or_the_overlay_since_its_crd_may_be_absent() -> None:
    assert not any(d["kind"] == "ServiceMonitor" for docs in BUILDS.values() for d in docs)


# --- docker compose and Prometheus --------------------------------------------------------


def test_compose_runs_minio_a_bucket_job_three_peers_two_agents_and_prometheus() -> None:
    services = compose()["services"]
    assert set(services) == {
        "minio", "minio-create-bucket", "peer-0", "peer-1", "peer-2", "agent-0", "agent-1",
        "prometheus",
    }  # fmt: skip
    assert services["minio"]["healthcheck"]["test"]
    job = services["minio-create-bucket"]
    assert job["depends_on"]["minio"]["condition"] == "service_healthy"
    assert job["restart"] == "no"
    for name in ("peer-0", "peer-1", "peer-2", "agent-0", "agent-1"):
        condition = services[name]["depends_on"]["minio-create-bucket"]["condition"]
        assert condition == "service_completed_successfully"
    assert (
        COMPOSE.parent / services["prometheus"]["volumes"][0].split(":")[0]
    ).resolve() == PROMETHEUS
    for _, _, env in compose_processes():
        assert f"origin/{origin_bucket(env)}" in job["command"][0]
        assert env["CACHESVC_S3_ENDPOINT"] == "http://minio:9000"


def test_compose_agents_name_every_compose_peer_on_the_peer_port() -> None:
    peers = {
        f"http://{name}:{listen_port('peer', args, env)}"
        for name, args, env in compose_processes()
        if args[0] == "peer"
    }
    agents = [(args, env) for _, args, env in compose_processes() if args[0] == "agent"]
    assert len(peers) == 3 and len(agents) == 2
    for args, env in agents:
        assert set(str(flag_value(args, env, "--peers")).split(",")) == peers


def test_compose_peers_and_agents_listen_on_all_interfaces_of_their_container() -> None:
    for _, args, env in compose_processes():
        assert flag_value(args, env, "--listen") == f"0.0.0.0:{DEFAULT_PORTS[args[0]]}"


def test_prometheus_scrapes_every_compose_agent_and_peer_on_its_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }
    expected: dict[str, set[str]] = {"cachesvc-agent": set(), "cachesvc-peer": set()}
    for name, args, env in compose_processes():
        expected[f"cachesvc-{args[0]}"].add(f"{name}:{listen_port(args[0], args, env)}")
    assert {job: targets[job] for job in expected} == expected
    # Job names match the Services, so the dashboard's $job works on both.
    assert set(expected) == {"cachesvc-agent", "cachesvc-peer"}


# --- Grafana ------------------------------------------------------------------------------


def dashboard_panels() -> list[Doc]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel] + panel.get("panels", [])
    return panels


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    variables = dashboard["templating"]["list"]
    return exprs + [v["query"]["query"] for v in variables if v["type"] == "query"]


def test_the_grafana_dashboard_queries_only_metrics_the_services_export() -> None:
    names = set()
    for expr in dashboard_queries():
        for name in re.findall(r"\bcachesvc_[a-z0-9_]+", expr):
            stem = re.sub(r"_(bucket|sum|count)$", "", name)
            names.add(stem if stem in HISTOGRAMS else name)
    assert names <= METRICS
    assert names == METRICS  # and it shows every one of them


def test_the_grafana_dashboard_filters_only_on_label_values_the_services_use() -> None:
    for expr in dashboard_queries():
        for label, _op, value in re.findall(r'(\w+)\s*(=~|!~|=|!=)\s*"([^"]*)"', expr):
            if label in LABEL_VALUES:
                assert set(value.split("|")) <= LABEL_VALUES[label], expr


def test_the_grafana_dashboard_quantiles_come_from_the_latency_histogram_buckets() -> None:
    quantiles = [e for e in dashboard_queries() if "histogram_quantile" in e]
    assert quantiles
    for expr in quantiles:
        assert "cachesvc_request_seconds_bucket" in expr and re.search(
            r"by \(([\w, ]*)\ble\b", expr
        )


def test_the_grafana_dashboard_panels_use_the_datasource_variable_and_unique_ids() -> None:
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("hit ratio", "origin", "coalesced", "bytes", "latency", "evictions", "mismatch"):
        assert topic in titles


# --- the image ----------------------------------------------------------------------------


def dockerfile_final_stage() -> str:
    return re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[-1]


def test_the_image_is_slim_python_runs_cachesvc_as_non_root_and_exposes_both_ports() -> None:
    text = DOCKERFILE.read_text()
    final = dockerfile_final_stage()
    assert final.startswith("python:3.11-slim")
    assert re.search(r"^RUN .*pip install \.$", text, flags=re.M)
    (user,) = re.findall(r"^USER (\S+)", final, flags=re.M)
    assert user.split(":")[0] not in ("root", "0")
    assert re.search(r"^ENTRYPOINT \[\"cachesvc\"\]$", final, flags=re.M)
    assert set(re.findall(r"^EXPOSE (.*)$", final, flags=re.M)[0].split()) == {"8700", "8701"}
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", final, flags=re.M)


def test_the_build_context_keeps_what_pip_install_needs() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = re.findall(r"^COPY (?!--)(.+) \S+$", DOCKERFILE.read_text(), flags=re.M)
    sources = {s for line in copied for s in line.split()}
    assert {"pyproject.toml", "README.md", "cachesvc", "node_agent"} <= sources
    assert not sources & ignored
    assert {".git", ".venv", "tests"} <= ignored


def healthcheck_script() -> str:
    match = re.search(r"<<'PY' (\S+)\n(.*?)\nPY\n", DOCKERFILE.read_text(), flags=re.S)
    assert match and "cachesvc-healthcheck" in match.group(1)
    return match.group(2)


class Healthz(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def healthz_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def run_healthcheck(listen: str) -> int:
    env = {"PATH": os.environ.get("PATH", ""), "CACHESVC_LISTEN": listen}
    return subprocess.run(
        [sys.executable, "-c", healthcheck_script()], env=env, timeout=30, check=False
    ).returncode


def test_the_image_healthcheck_follows_healthz_on_the_listen_port(
    healthz_server: ThreadingHTTPServer,
) -> None:
    port = healthz_server.server_address[1]
    assert run_healthcheck(f"0.0.0.0:{port}") == 0
    Healthz.status = 503
    try:
        assert run_healthcheck(f"0.0.0.0:{port}") == 1
    finally:
        Healthz.status = 200


def test_the_image_healthcheck_fails_when_nothing_listens(
    healthz_server: ThreadingHTTPServer,
) -> None:
    port = healthz_server.server_address[1]
    healthz_server.shutdown()
    healthz_server.server_close()
    assert run_healthcheck(f"127.0.0.1:{port}") == 1


# --- shutdown and ring identity -------------------------------------------------------------


def shutdown_grace(env: dict[str, str]) -> float:
    return float(env["CACHESVC_SHUTDOWN_GRACE"])


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("command", ["agent", "peer"])
def test_the_drain_after_sigterm_ends_before_kubernetes_kills_the_pod(
    build: str, command: str
) -> None:
    docs = BUILDS[build]
    workload, container = component_workload(docs, command)
    env = container_env(docs, workload, container)
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert sleep + shutdown_grace(env) < pod_spec(workload)["terminationGracePeriodSeconds"]


def test_the_drain_after_sigterm_ends_before_compose_kills_the_container() -> None:
    services = compose()["services"]
    for name, _, env in compose_processes():
        stop = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert shutdown_grace(env) < stop


@pytest.mark.parametrize("build", BUILDS)
def test_a_peer_advertises_the_url_the_headless_service_resolves_it_to(build: str) -> None:
    docs = BUILDS[build]
    peer, container = component_workload(docs, "peer")
    env = container_env(docs, peer, container)
    port = find(docs, "Service", "cachesvc-peer")["spec"]["ports"][0]["port"]
    assert env["CACHESVC_ADVERTISE"] == f"http://{POD_IP}:{port}"
    assert flag_value(container["args"], env, "--peers") == flag_value(
        component_workload(docs, "agent")[1]["args"],
        container_env(docs, *component_workload(docs, "agent")),
        "--peers",
    )


def test_each_compose_peer_advertises_the_url_the_agents_and_peers_know_it_by() -> None:
    processes = list(compose_processes())
    ring = {tuple(str(flag_value(args, env, "--peers")).split(",")) for _, args, env in processes}
    assert len(ring) == 1  # every agent and peer sees the same ring
    advertised = [env["CACHESVC_ADVERTISE"] for _, args, env in processes if args[0] == "peer"]
    assert sorted(advertised) == sorted(ring.pop())
