"""The Helm chart (deploy/helm/aimesh), checked offline: `helm lint`, `helm template` under the value sets that
matter, and every rendered object decoded strictly into its Go API type (k8s.io/api, KEDA's keda.sh/v1alpha1,
prometheus-operator's monitoring.coreos.com/v1) by deploy/helm/validate. Needs `make tools` (helm and the
validator in .cache/bin); no cluster, no network. The services' side of each rendering is checked by building
their settings from the rendered environment, as the kubelet would hand it to them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from aimesh.settings import IngestSettings, NotifierSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "aimesh"
RELEASE = "aimesh"
NAMESPACE = "inference"
# The name a StatefulSet gives its pod of ordinal 3.
WORKER_POD = f"{RELEASE}-worker-3"
SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "worker": WorkerSettings,
    "notifier": NotifierSettings,
}

SASL_TLS = [
    "kafka.securityProtocol=SASL_SSL",
    "kafka.sasl.mechanism=SCRAM-SHA-512",
    "kafka.sasl.existingSecret=kafka-user",
    "kafka.tls.caSecret=kafka-ca",
    "tls.enabled=true",
    "tls.secretName=aimesh-tls",
    "tls.probe.serverName=aimesh.example.com",
    "tls.clientCA.enabled=true",
    "tls.clientCA.secretName=aimesh-client-ca",
    "autoscaling.keda.enabled=true",
    "otel.enabled=true",
    "metrics.serviceMonitor.enabled=true",
]
VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "keda": ["autoscaling.keda.enabled=true"],
    "hpa": ["autoscaling.hpa.enabled=true"],
    "hpa-external": ["autoscaling.hpa.enabled=true", "autoscaling.hpa.metricType=External"],
    "sidecar": ["triton.mode=sidecar", "triton.modelVolume.persistentVolumeClaim.claimName=models"],
    "endpoints": ["triton.endpoints={triton-0.gpu:8001,triton-1.gpu:8001}"],
    "sasl-tls": SASL_TLS,
}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(ROOT / ".cache" / "bin"))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make tools`")
    return path


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    # A private home: no repository list, cache or plugin of the user's is read.
    home = {"HELM_CACHE_HOME": "/nonexistent/cache", "HELM_CONFIG_HOME": "/nonexistent/config"}
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=60, env={**os.environ, **home}, check=False
    )


def set_args(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def render_text(values: list[str]) -> str:
    done = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *set_args(values))
    assert done.returncode == 0, done.stderr
    return done.stdout


def validate(manifest: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm-validate")], input=manifest, capture_output=True, text=True, timeout=60, check=False
    )


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    matches = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    assert len(matches) == 1
    return matches[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c["env"]}


def kubelet_env(c: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The environment the container gets: literal values with $(VAR) expanded from the entries before them, the
    pod name from the downward API, and a placeholder for each Secret reference."""
    env: dict[str, str] = {}
    for entry in c["env"]:
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(entry["value"]))
        elif entry["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[entry["name"]] = pod_name
        else:
            env[entry["name"]] = "from-a-secret"
    return env


def settings_from(cls: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    for key in list(os.environ):
        if key.upper().startswith("AIMESH_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cls()


@pytest.fixture(scope="module")
def renderings() -> dict[str, str]:
    return {name: render_text(values) for name, values in VALUE_SETS.items()}


def objects_of(renderings: dict[str, str], name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(renderings[name]) if doc]


def service_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for component in SETTINGS:
        kind = "StatefulSet" if component == "worker" else "Deployment"
        yield component, container(find(objects, kind, f"{RELEASE}-{component}"), component)


# --- lint and the validator ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_is_clean(name: str) -> None:
    done = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *set_args(VALUE_SETS[name]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_decodes_strictly_into_its_api_type(renderings: dict[str, str], name: str) -> None:
    done = validate(renderings[name])
    assert done.returncode == 0, done.stdout + done.stderr
    count = len(objects_of(renderings, name))
    assert f"{count} objects, 0 failed" in done.stdout


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("StatefulSet", "spec", "template", "spec", "containers", 0), "livenessProbes"),  # a typo
        (("ScaledObject", "spec"), "maxReplicas"),  # HPA's name, not KEDA's
        (("Job", "spec"), "ttlSecondsAfterFinish"),
    ],
)
def test_the_validator_refuses_an_unknown_field(renderings: dict[str, str], path: tuple[Any, ...], field: str) -> None:
    objects = objects_of(renderings, "keda")
    target = next(o for o in objects if o["kind"] == path[0])
    for step in path[1:]:
        target = target[step]
    target[field] = 1
    done = validate(yaml.safe_dump_all(objects))
    assert done.returncode == 1
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1, done.stdout
    assert failures[0].startswith(f"FAIL {path[0]}/")
    assert "unknown field" in failures[0] and field in failures[0]


def test_the_validator_refuses_an_unknown_kind_and_a_wrong_type(renderings: dict[str, str]) -> None:
    objects = objects_of(renderings, "default")
    objects.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    find(objects, "Deployment", f"{RELEASE}-ingest")["spec"]["replicas"] = "two"
    done = validate(yaml.safe_dump_all(objects))
    assert done.returncode == 1
    failures = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 2, done.stdout
    assert "Widget" in done.stdout and "no kind" in done.stdout
    assert "replicas" in done.stdout


def test_the_validator_runs_kedas_own_checks(renderings: dict[str, str]) -> None:
    objects = objects_of(renderings, "keda")
    scaled = find(objects, "ScaledObject", f"{RELEASE}-worker")
    scaled["spec"]["minReplicaCount"] = scaled["spec"]["maxReplicaCount"] + 1
    done = validate(yaml.safe_dump_all(objects))
    assert done.returncode == 1
    assert "MinReplicaCount" in done.stdout


# --- what the renderings say ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default", "sidecar", "sasl-tls"])
def test_every_aimesh_variable_is_a_setting_the_service_reads(
    renderings: dict[str, str], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for component, c in service_containers(objects_of(renderings, name)):
        cls = SETTINGS[component]
        known = {f"AIMESH_{field}".upper() for field in cls.model_fields}
        unknown = sorted(n for n in env_of(c) if n.startswith("AIMESH_") and n not in known)
        assert not unknown, f"{component} sets {unknown}, which {cls.__name__} does not read"
        settings_from(cls, kubelet_env(c, f"{RELEASE}-{component}-0"), monkeypatch)  # the service would start


def test_the_worker_transactional_id_comes_from_the_statefulset_ordinal(
    renderings: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = find(objects_of(renderings, "default"), "StatefulSet", f"{RELEASE}-worker")
    c = container(worker, "worker")
    names = [e["name"] for e in c["env"]]
    pod_name = env_of(c)["POD_NAME"]
    assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    # The kubelet expands $(POD_NAME) only from entries listed before it.
    assert names.index("POD_NAME") < names.index("AIMESH_TRANSACTIONAL_ID")
    settings = settings_from(WorkerSettings, kubelet_env(c, WORKER_POD), monkeypatch)
    assert settings.transactional_id == f"aimesh-{NAMESPACE}-{WORKER_POD}"
    assert settings.worker_id == WORKER_POD


def test_the_grpc_servers_are_probed_through_grpc_health(renderings: dict[str, str]) -> None:
    for component, c in service_containers(objects_of(renderings, "default")):
        if component == "worker":
            continue
        grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": grpc_port}, f"{component} {probe}"
    notifier = container(find(objects_of(renderings, "default"), "Deployment", f"{RELEASE}-notifier"), "notifier")
    assert notifier["startupProbe"]["grpc"]["port"] == 50052


def test_with_tls_the_probes_run_the_tls_health_check(renderings: dict[str, str]) -> None:
    objects = objects_of(renderings, "sasl-tls")
    script = find(objects, "ConfigMap", f"{RELEASE}-probe")["data"]["health_probe.py"]
    assert script == (CHART / "files" / "health_probe.py").read_text(encoding="utf-8")
    for component in ("ingest", "notifier"):
        c = container(find(objects, "Deployment", f"{RELEASE}-{component}"), component)
        command = c["readinessProbe"]["exec"]["command"]
        assert command[:2] == ["python", "/etc/aimesh/probe/health_probe.py"]
        assert "--server-name=aimesh.example.com" in command
        assert "--cert-file=/etc/aimesh/tls/tls.crt" in command  # mutual TLS: the probe presents a certificate
        assert command[-1] == f"127.0.0.1:{c['ports'][0]['containerPort']}"


def test_the_topics_job_creates_every_topic_replicated_three_times_with_two_in_sync(
    renderings: dict[str, str],
) -> None:
    job = find(objects_of(renderings, "default"), "Job", f"{RELEASE}-topics")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    creates = [line for line in script.splitlines() if "--create" in line]
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["topics"]
    expected = {t["name"]: t["partitions"] for t in values.values() if isinstance(t, dict) and "name" in t}
    assert len(creates) == len(expected) == 5
    for line in creates:
        match = re.search(r"--topic (\S+)", line)
        assert match, line
        topic = match[1]
        assert f"--partitions {expected[topic]} " in line
        assert "--replication-factor 3 " in line
        assert "--config min.insync.replicas=2" in line
        assert "--if-not-exists" in line


@pytest.mark.parametrize("name", ["keda", "hpa", "sasl-tls"])
def test_autoscaling_never_asks_for_more_workers_than_tasks_partitions(renderings: dict[str, str], name: str) -> None:
    objects = objects_of(renderings, name)
    worker = find(objects, "StatefulSet", f"{RELEASE}-worker")
    assert "replicas" not in worker["spec"]  # the autoscaler owns it: an upgrade must not reset it
    scaler = next(o for o in objects if o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler"))
    maximum = scaler["spec"].get("maxReplicaCount", scaler["spec"].get("maxReplicas"))
    assert scaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": f"{RELEASE}-worker",
    }
    assert 1 <= maximum <= 6


def test_more_workers_than_partitions_or_two_autoscalers_are_refused() -> None:
    too_many = helm(
        "template", RELEASE, str(CHART), *set_args(["autoscaling.keda.enabled=true", "autoscaling.maxReplicas=7"])
    )
    assert too_many.returncode != 0
    assert "may not exceed the partitions of aimesh.tasks (6)" in too_many.stderr
    both = helm(
        "template", RELEASE, str(CHART), *set_args(["autoscaling.keda.enabled=true", "autoscaling.hpa.enabled=true"])
    )
    assert both.returncode != 0
    assert "choose one" in both.stderr


def test_keda_measures_the_worker_group_on_both_tasks_topics(renderings: dict[str, str]) -> None:
    scaled = find(objects_of(renderings, "keda"), "ScaledObject", f"{RELEASE}-worker")
    triggers = scaled["spec"]["triggers"]
    assert {t["metadata"]["topic"] for t in triggers} == {"aimesh.tasks", "aimesh.tasks.batch"}
    for trigger in triggers:
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == "aimesh-workers"
        assert trigger["metadata"]["lagThreshold"] == "100"


def test_the_hpa_scales_on_the_workers_own_lag_metric(renderings: dict[str, str]) -> None:
    hpa = find(objects_of(renderings, "hpa"), "HorizontalPodAutoscaler", f"{RELEASE}-worker")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "aimesh_worker_consumer_lag_records"
    metrics_py = (ROOT / "src" / "aimesh" / "metrics.py").read_text(encoding="utf-8")
    assert '"aimesh_worker_consumer_lag_records"' in metrics_py


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("default", f"dns:///{RELEASE}-triton.{NAMESPACE}.svc.cluster.local:8001"),
        ("endpoints", "triton-0.gpu:8001,triton-1.gpu:8001"),
        ("sidecar", "127.0.0.1:8001"),
    ],
)
def test_the_workers_triton_url(renderings: dict[str, str], name: str, url: str) -> None:
    objects = objects_of(renderings, name)
    worker = find(objects, "StatefulSet", f"{RELEASE}-worker")
    assert env_of(container(worker, "worker"))["AIMESH_TRITON_URL"]["value"] == url
    pool = [o for o in objects if o["metadata"]["name"] == f"{RELEASE}-triton"]
    if name == "default":
        service = find(pool, "Service", f"{RELEASE}-triton")
        assert service["spec"]["clusterIP"] == "None"  # DNS lists every ready pod: round_robin over them
    else:
        assert not pool
    if name == "sidecar":
        triton = container(worker, "triton")
        assert triton["restartPolicy"] == "Always"  # a native sidecar: it outlives the draining worker


def test_kafka_credentials_reach_the_services_only_through_secrets(
    renderings: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = renderings["sasl-tls"]
    objects = objects_of(renderings, "sasl-tls")
    for component, c in service_containers(objects):
        env = env_of(c)
        assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "kafka-user", "key": "password"}
        config = json.loads(env["AIMESH_KAFKA_CONFIG"]["value"])
        assert config["sasl.password"] == "$(KAFKA_SASL_PASSWORD)"
        assert config["ssl.ca.location"] == "/etc/aimesh/kafka-ca/ca.crt"
        settings = settings_from(SETTINGS[component], kubelet_env(c, f"{RELEASE}-{component}-0"), monkeypatch)
        assert settings.kafka_client_config()["security.protocol"] == "SASL_SSL"  # not refused as reserved
    assert "from-a-secret" not in text
    auth = find(objects, "TriggerAuthentication", f"{RELEASE}-worker-kafka")
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"username", "password", "ca"}
    job = find(objects, "Job", f"{RELEASE}-topics")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "ScramLoginModule" in script and "ssl.truststore.location=/etc/aimesh/kafka-ca/ca.crt" in script
