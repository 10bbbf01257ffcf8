"""deploy/k8s: rendered as kustomize would (tests/kustomize.py), validated offline against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors), and checked for
what the design needs: real s3ferry roles, graceful shutdown, KEDA on the right queues, a PDB,
sizing from the measured worker memory, no secret in a ConfigMap, NetworkPolicies that admit only
the s3ferry pods that need Redis and Postgres (evaluated here as Kubernetes would), TLS to Postgres."""

from __future__ import annotations

import base64
import re
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from orchestrator import cli
from tests import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"
EXAMPLE_ENV = {"secrets.env": "secrets.env.example"}

#: keda.sh/v1alpha1 ScaledObject, transcribed from KEDA's CRD (config/crd/bases/keda.sh_scaledobjects.yaml):
#: the fields used here and their neighbours; unknown fields are errors, trigger metadata values strings.
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                **{name: {"type": "integer", "minimum": 0} for name in (
                    "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod", "idleReplicaCount",
                    "initialCooldownPeriod")},
                "advanced": {"type": "object"}, "fallback": {"type": "object"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                   "useCachedMetrics": {"type": "boolean"}, "metricType": {"type": "string"},
                                   "authenticationRef": {"type": "object", "required": ["name"]},
                                   "metadata": {"type": "object", "additionalProperties": {"type": "string"}}}}},
            },
        },
    },
}

#: Peak RSS of one `s3ferry worker --pool=threads` process by parts in flight (concurrency), MiB:
#: 4 from bench/results (119 MiB at 32, 64 and 128 MiB parts); 8: 124.3 and 119.3 MiB at 32 and 128 MiB parts, from
#: `python bench/peers.py --skip throughput --concurrency 8 --memory-sizes 32MiB,128MiB`.
MEASURED_PEAK_MIB = {4: 119, 8: 125}


@pytest.fixture(scope="module", params=["base", "overlays/example"])
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize.render(K8S / request.param, EXAMPLE_ENV)


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return kustomize.render(K8S / "overlays" / "example", EXAMPLE_ENV)


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["spec"]["template"]["spec"]


def quantity_mib(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", text).groups()  # type: ignore[union-attr]
    return float(number) * (1024 if unit == "Gi" else 1)


def test_every_resource_is_valid_against_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    kinds = set()
    for resource in rendered:
        kinds.add(resource["kind"])
        if resource["kind"] == "ScaledObject":
            jsonschema.validate(resource, SCALED_OBJECT)
        else:
            kubernetes_validate.validate(resource, VERSION, strict=True)
    assert {"Deployment", "Job", "ConfigMap", "PodDisruptionBudget", "ScaledObject", "Service", "NetworkPolicy"} <= kinds


def test_the_validation_catches_mistakes() -> None:
    """The checks above can fail: a misspelt field, a number where Kubernetes wants a string."""
    worker = find(kustomize.render(K8S / "base"), "Deployment", "s3ferry-worker")
    worker["spec"]["template"]["spec"]["terminationGracePeriod"] = 90
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, VERSION, strict=True)
    scaled = find(kustomize.render(K8S / "base"), "ScaledObject", "s3ferry-worker")
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 8
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT)


def test_every_container_runs_a_real_s3ferry_role_with_valid_arguments(rendered: list[dict[str, Any]]) -> None:
    parser = cli._parser()
    roles = set()
    for resource in rendered:
        for container in kustomize._containers(resource):
            assert "command" not in container  # the image's entrypoint is s3ferry
            args = container["args"]
            parser.parse_args(args)  # exits (fails the test) on an unknown role or option
            roles.add(args[0] if args[0] != "db" else " ".join(args[:2]))
    assert roles == {"worker", "beat", "flower", "metrics", "db upgrade", "db check"}


def test_workers_and_beat_start_only_once_the_schema_is_migrated(rendered: list[dict[str, Any]]) -> None:
    for name in ("s3ferry-worker", "s3ferry-beat"):
        init = pod_spec(find(rendered, "Deployment", name))["initContainers"]
        assert [c["args"][:2] for c in init] == [["db", "check"]]
        assert any(a.startswith("--wait=") for a in init[0]["args"])
    job = find(rendered, "Job", "s3ferry-migrate")["spec"]
    assert job["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    assert job["ttlSecondsAfterFinished"] <= 600  # gone before the next release's apply


def test_workers_shut_down_gracefully_within_the_grace_period(rendered: list[dict[str, Any]]) -> None:
    config = find(rendered, "ConfigMap", "s3ferry")["data"]
    worker = find(rendered, "Deployment", "s3ferry-worker")
    spec = pod_spec(worker)
    container = spec["containers"][0]
    assert {"name": "REMAP_SIGTERM", "value": "SIGQUIT"} in container["env"]  # SIGTERM -> Celery's soft shutdown
    soft = float(config["S3FERRY_SOFT_SHUTDOWN_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= soft + 20  # room to requeue and release claims after it


def test_the_scaled_object_scales_the_workers_on_the_celery_queues(rendered: list[dict[str, Any]]) -> None:
    config = find(rendered, "ConfigMap", "s3ferry")["data"]
    scaled = find(rendered, "ScaledObject", "s3ferry-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "s3ferry-worker"
    queue = config["S3FERRY_QUEUE"]
    assert {t["metadata"]["listName"] for t in scaled["triggers"]} == {queue, f"{queue}.control", f"{queue}.recovered"}
    assert all(t["type"] == "redis" for t in scaled["triggers"])
    assert scaled["minReplicaCount"] >= 1  # completions and the reconciler need a worker even with no part queued
    # more pods than the window can use only wait for slots
    concurrency = int(next(a for a in pod_spec(find(rendered, "Deployment", "s3ferry-worker"))["containers"][0]["args"]
                           if a.startswith("--concurrency=")).split("=")[1])
    assert scaled["maxReplicaCount"] * concurrency <= int(config["S3FERRY_WINDOW_MAX"])
    down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]  # one pod at a time
    assert "replicas" not in find(rendered, "Deployment", "s3ferry-worker")["spec"]  # KEDA's to set


def test_the_keda_redis_address_and_password_reach_the_worker_containers(example: list[dict[str, Any]]) -> None:
    config = find(example, "ConfigMap", "s3ferry")["data"]
    secret = find(example, "Secret", "s3ferry")["data"]
    for trigger in find(example, "ScaledObject", "s3ferry-worker")["spec"]["triggers"]:
        assert trigger["metadata"]["addressFromEnv"] in config
        assert trigger["metadata"]["passwordFromEnv"] in secret
    refs = pod_spec(find(example, "Deployment", "s3ferry-worker"))["containers"][0]["envFrom"]
    assert {"configMapRef": {"name": "s3ferry"}} in refs and {"secretRef": {"name": "s3ferry"}} in refs


def test_a_disruption_budget_covers_the_workers(rendered: list[dict[str, Any]]) -> None:
    pdb = find(rendered, "PodDisruptionBudget", "s3ferry-worker")["spec"]
    labels = find(rendered, "Deployment", "s3ferry-worker")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1


def test_worker_memory_is_sized_from_the_measured_footprint(rendered: list[dict[str, Any]]) -> None:
    container = pod_spec(find(rendered, "Deployment", "s3ferry-worker"))["containers"][0]
    assert "--pool=threads" in container["args"]  # one process: the setup that was measured
    concurrency = int(next(a for a in container["args"] if a.startswith("--concurrency=")).split("=")[1])
    measured = MEASURED_PEAK_MIB[concurrency]
    request = quantity_mib(container["resources"]["requests"]["memory"])
    limit = quantity_mib(container["resources"]["limits"]["memory"])
    assert measured * 1.2 <= request <= measured * 2.5
    assert limit >= 2 * request


def test_one_beat_never_two(rendered: list[dict[str, Any]]) -> None:
    beat = find(rendered, "Deployment", "s3ferry-beat")["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"


def test_pods_run_as_non_root_without_privileges(rendered: list[dict[str, Any]]) -> None:
    for resource in rendered:
        if resource["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(resource)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # "restricted" level
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert "resources" in container and "memory" in container["resources"]["limits"]


def test_no_secret_in_a_config_map_and_secrets_come_from_an_ignored_file(example: list[dict[str, Any]]) -> None:
    for resource in example:
        if resource["kind"] == "ConfigMap":
            for key, value in resource["data"].items():
                assert not re.search(r"PASSWORD|SECRET|ACCESS_KEY|BASIC_AUTH|DATABASE_URL|BROKER_URL", key), key
                assert not re.search(r"://[^/@\s]*:[^@/\s]+@", value), key  # no password in a URL
    secret = find(example, "Secret", "s3ferry")["data"]
    decoded = {k: base64.b64decode(v).decode() for k, v in secret.items()}
    assert {"S3FERRY_DATABASE_URL", "S3FERRY_BROKER_URL", "S3FERRY_FLOWER_BASIC_AUTH", "AWS_SECRET_ACCESS_KEY"} <= set(
        decoded)
    assert all("CHANGE-ME" in value for value in decoded.values())  # the example holds placeholders only
    ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / "overlays" / "example" / "secrets.env")],
                             cwd=ROOT)
    assert ignored.returncode == 0, "secrets.env must be git-ignored"


# --- network: who may reach Redis, Postgres, Flower and the metrics -------------------------------------

#: The s3ferry pods (by their app.kubernetes.io/name) that talk to each service. A new role fails
#: test_the_policies_know_every_s3ferry_pod until it is placed here (and in networkpolicy.yaml).
REDIS_CLIENTS = {"s3ferry-worker", "s3ferry-beat", "s3ferry-flower", "s3ferry-metrics"}
POSTGRES_CLIENTS = {"s3ferry-migrate", "s3ferry-worker", "s3ferry-beat", "s3ferry-metrics"}
REDIS_POD = {"app.kubernetes.io/name": "redis"}
POSTGRES_POD = {"app.kubernetes.io/name": "postgresql"}
CA_MOUNT = "/etc/s3ferry/tls"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions) applied to a pod's labels; {} selects all."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present, value = key in labels, labels.get(key)
        matched = {"In": present and value in values, "NotIn": not present or value not in values,
                   "Exists": present, "DoesNotExist": not present}[operator]
        if not matched:
            return False
    return True


def namespace_of(resource: dict[str, Any]) -> str:
    return resource["metadata"].get("namespace", "default")


def admitted(policies: list[dict[str, Any]], target: dict[str, str], port: tuple[int, str | None],
             source: dict[str, str], source_namespace: str) -> bool:
    """Whether a connection from a pod (labels, namespace) to `target` (a pod in the policies'
    namespace) on `port` (number, container port name) is let in: NetworkPolicy's ingress rules."""
    applying = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"]["podSelector"], target)]
    if not applying:
        return True
    for policy in applying:
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            ports = rule.get("ports")
            if ports is not None and not any(p.get("port") in port for p in ports):
                continue
            if peers is None or any(_peer_matches(peer, source, source_namespace, namespace_of(policy))
                                    for peer in peers):
                return True
    return False


def _peer_matches(peer: dict[str, Any], source: dict[str, str], source_namespace: str, own_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_namespace}):
            return False
    elif source_namespace != own_namespace:  # a podSelector alone: pods of the policy's own namespace
        return False
    return selects(peer.get("podSelector", {}), source)


def s3ferry_pods(resources: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Pod labels of every s3ferry workload, by app.kubernetes.io/name."""
    pods = {}
    for resource in resources:
        if resource["kind"] in ("Deployment", "Job"):
            labels = resource["spec"]["template"]["metadata"]["labels"]
            pods[labels["app.kubernetes.io/name"]] = labels
    return pods


def url_port(url: str) -> int:
    return urllib.parse.urlsplit(url).port  # type: ignore[return-value]


def test_the_policies_know_every_s3ferry_pod(rendered: list[dict[str, Any]]) -> None:
    assert set(s3ferry_pods(rendered)) == REDIS_CLIENTS | POSTGRES_CLIENTS | {"s3ferry-flower"}


def test_by_default_nothing_reaches_the_namespace_s_pods(rendered: list[dict[str, Any]]) -> None:
    policies = [r for r in rendered if r["kind"] == "NetworkPolicy"]
    deny = find(rendered, "NetworkPolicy", "s3ferry-default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    namespace = namespace_of(policies[0])
    worker = s3ferry_pods(rendered)["s3ferry-worker"]
    for target in (worker, {"app": "anything-else"}):  # workers and beat take no connection at all
        for source, source_namespace in ((worker, namespace), ({"app": "x"}, namespace), ({}, "elsewhere")):
            assert not admitted(policies, target, (8080, "http"), source, source_namespace)


def test_only_s3ferry_pods_and_keda_reach_redis_on_the_broker_url_s_port(
        rendered: list[dict[str, Any]], example: list[dict[str, Any]]) -> None:
    policies = [r for r in rendered if r["kind"] == "NetworkPolicy"]
    namespace = namespace_of(policies[0])
    secret = {k: base64.b64decode(v).decode() for k, v in find(example, "Secret", "s3ferry")["data"].items()}
    port = (url_port(secret["S3FERRY_BROKER_URL"]), None)
    assert port[0] == int(find(example, "ConfigMap", "s3ferry")["data"]["S3FERRY_KEDA_REDIS_ADDRESS"].rsplit(":")[1])
    for name, labels in s3ferry_pods(rendered).items():
        assert admitted(policies, REDIS_POD, port, labels, namespace) == (name in REDIS_CLIENTS), name
        assert not admitted(policies, REDIS_POD, port, labels, "another-namespace"), name
        assert not admitted(policies, REDIS_POD, (port[0] + 1, None), labels, namespace), name
    assert not admitted(policies, REDIS_POD, port, {"app.kubernetes.io/name": "intruder"}, namespace)
    assert not admitted(policies, REDIS_POD, port, {}, namespace)
    keda = {"app.kubernetes.io/name": "keda-operator"}  # KEDA's queue-length triggers
    assert admitted(policies, REDIS_POD, port, keda, "keda")
    assert not admitted(policies, REDIS_POD, port, keda, namespace)


def test_only_s3ferry_pods_that_use_it_reach_postgres_on_the_database_url_s_port(
        rendered: list[dict[str, Any]], example: list[dict[str, Any]]) -> None:
    policies = [r for r in rendered if r["kind"] == "NetworkPolicy"]
    namespace = namespace_of(policies[0])
    secret = {k: base64.b64decode(v).decode() for k, v in find(example, "Secret", "s3ferry")["data"].items()}
    port = (url_port(secret["S3FERRY_DATABASE_URL"]), None)
    for name, labels in s3ferry_pods(rendered).items():
        assert admitted(policies, POSTGRES_POD, port, labels, namespace) == (name in POSTGRES_CLIENTS), name
        assert not admitted(policies, POSTGRES_POD, port, labels, "another-namespace"), name
    assert not admitted(policies, POSTGRES_POD, port, {"app.kubernetes.io/name": "intruder"}, namespace)
    assert not admitted(policies, POSTGRES_POD, port, {"app.kubernetes.io/name": "keda-operator"}, "keda")


@pytest.mark.parametrize(("deployment", "allowed", "allowed_namespace"), [
    ("s3ferry-flower", {}, "ingress-nginx"),  # the TLS-terminating ingress controller
    ("s3ferry-metrics", {"app.kubernetes.io/name": "prometheus"}, "monitoring"),
])
def test_flower_and_the_metrics_are_reached_only_from_where_they_are_used(
        rendered: list[dict[str, Any]], deployment: str, allowed: dict[str, str], allowed_namespace: str) -> None:
    policies = [r for r in rendered if r["kind"] == "NetworkPolicy"]
    namespace = namespace_of(policies[0])
    pod = find(rendered, "Deployment", deployment)["spec"]["template"]
    (container_port,) = pod["spec"]["containers"][0]["ports"]
    port = (container_port["containerPort"], container_port["name"])
    target = pod["metadata"]["labels"]
    assert admitted(policies, target, port, allowed, allowed_namespace)
    assert not admitted(policies, target, (port[0] + 1, "other"), allowed, allowed_namespace)
    for source in s3ferry_pods(rendered).values():
        assert not admitted(policies, target, port, source, namespace)
    assert not admitted(policies, target, port, {"app": "x"}, "elsewhere")
    scrape = pod["metadata"].get("annotations", {}).get("prometheus.io/port")
    assert scrape in (None, str(port[0]))


def test_no_url_with_a_password_sits_in_a_config_map(rendered: list[dict[str, Any]]) -> None:
    config_maps = [r for r in rendered if r["kind"] == "ConfigMap"]
    assert config_maps
    for config_map in config_maps:
        for key, value in config_map.get("data", {}).items():
            assert key not in ("S3FERRY_DATABASE_URL", "S3FERRY_BROKER_URL", "S3FERRY_RESULT_BACKEND"), key
            for url in re.findall(r"[a-z][a-z0-9+.-]*://\S+", value):
                parts = urllib.parse.urlsplit(url)
                assert parts.password is None and "@" not in parts.netloc, f"{key}: a URL with credentials"


def test_the_secret_s_urls_carry_the_passwords_and_postgres_checks_the_server(example: list[dict[str, Any]]) -> None:
    secret = {k: base64.b64decode(v).decode() for k, v in find(example, "Secret", "s3ferry")["data"].items()}
    broker = urllib.parse.urlsplit(secret["S3FERRY_BROKER_URL"])
    assert broker.scheme in ("redis", "rediss") and broker.password  # Redis requires its password
    database = urllib.parse.urlsplit(secret["S3FERRY_DATABASE_URL"])
    assert database.password
    query = urllib.parse.parse_qs(database.query)
    assert query["sslmode"] == ["verify-full"]  # crosses the cluster network: TLS, server name checked
    assert query["sslrootcert"][0].startswith(CA_MOUNT + "/")


def test_every_container_sees_the_ca_the_urls_name(rendered: list[dict[str, Any]]) -> None:
    for resource in rendered:
        if resource["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(resource)
        volume = next(v for v in spec["volumes"] if v["name"] == "tls-ca")
        assert volume["configMap"] == {"name": "s3ferry-ca", "optional": True}  # pods start without one
        for container in spec["containers"] + spec.get("initContainers", []):
            assert {"name": "tls-ca", "mountPath": CA_MOUNT, "readOnly": True} in container["volumeMounts"], (
                resource["metadata"]["name"], container["name"])


def test_workers_may_read_only_the_sources_volume_and_send_only_to_the_buckets_set(
        rendered: list[dict[str, Any]], example: list[dict[str, Any]]) -> None:
    config = find(rendered, "ConfigMap", "s3ferry")["data"]
    mounts = pod_spec(find(rendered, "Deployment", "s3ferry-worker"))["containers"][0]["volumeMounts"]
    sources = next(m for m in mounts if m["name"] == "sources")
    assert config["S3FERRY_SOURCE_ROOTS"] == sources["mountPath"] and sources["readOnly"] is True
    assert find(example, "ConfigMap", "s3ferry")["data"]["S3FERRY_BUCKETS"]  # none unless set


def test_the_example_overlay_sets_the_namespace_and_the_image(example: list[dict[str, Any]]) -> None:
    images = {c["image"] for r in example for c in kustomize._containers(r)}
    assert images == {"registry.example.com/s3ferry:0.1.0"}
    assert all(r["metadata"].get("namespace") == "s3ferry" for r in example
               if r["kind"] not in ("Namespace", "PersistentVolume"))
    claim = find(example, "PersistentVolumeClaim", "s3ferry-sources")["spec"]
    volume = find(example, "PersistentVolume", "s3ferry-sources")["spec"]
    assert claim["volumeName"] == "s3ferry-sources" and claim["storageClassName"] == volume["storageClassName"] == ""
    assert "namespace" not in find(example, "PersistentVolume", "s3ferry-sources")["metadata"]  # cluster-scoped


def test_the_renderer_refuses_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({"resources": [], "replicas": [{"name": "x"}]}))
    with pytest.raises(kustomize.Unsupported, match="replicas"):
        kustomize.render(tmp_path)


def test_the_image_is_multi_stage_slim_and_non_root() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(stages) >= 2 and all("slim" in stage for stage in stages)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["s3ferry"\]', dockerfile, re.M)
    assert "REMAP_SIGTERM=SIGQUIT" in dockerfile
    cli._parser().parse_args(["worker"])


def test_the_grafana_dashboard_uses_only_metrics_s3ferry_exports() -> None:
    import json

    from orchestrator import metrics

    source = Path(metrics.__file__).read_text()
    exported = set(re.findall(r'"(s3ferry_[a-z_]+)"', source))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "s3ferry.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"s3ferry_[a-z_]+", target["expr"])}
    suffixes = ("_total", "_bucket", "_sum", "_count")
    base = {next((n[: -len(s)] for s in suffixes if n.endswith(s) and n[: -len(s)] in exported), n) for n in used}
    assert base <= exported, base - exported
    assert {"s3ferry_window", "s3ferry_uploaded_bytes", "s3ferry_part_duration_seconds"} <= base
