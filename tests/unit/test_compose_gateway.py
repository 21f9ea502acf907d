"""docker-compose.yml's HTTP gateway, checked without Docker against the settings it reads (GatewaySettings): where
it listens and what it publishes, whom it calls, its metrics, its health check and its stop."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_file import effective_settings, environment

from aimesh.settings import GatewaySettings

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


@pytest.fixture
def settings(services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> GatewaySettings:
    gateway: GatewaySettings = effective_settings(GatewaySettings, services["gateway"], monkeypatch)
    return gateway


def published_ports(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> the host address and port it is published on ("${AIMESH_PUBLISH_HOST:-127.0.0.1}:8080")."""
    return {int(str(entry).rsplit(":", 1)[1]): str(entry).rsplit(":", 1)[0] for entry in service.get("ports") or []}


def test_the_gateway_runs_its_console_script_from_the_services_image(services: dict[str, dict[str, Any]]) -> None:
    gateway, ingest = services["gateway"], services["ingest"]
    assert gateway["build"] == ingest["build"] and gateway["image"] == ingest["image"]
    assert gateway["command"] == ["aimesh-gateway"]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"]["aimesh-gateway"] == "aimesh.gateway.__main__:main"


def test_the_gateway_sets_only_variables_its_settings_read(services: dict[str, dict[str, Any]]) -> None:
    readable = {f"AIMESH_{name}".upper() for name in GatewaySettings.model_fields}
    unknown = sorted(k for k in environment(services["gateway"]) if k.startswith("AIMESH_") and k not in readable)
    assert not unknown, f"the gateway sets {unknown}, which GatewaySettings does not read"


def test_the_gateway_binds_every_interface_and_publishes_its_port_on_loopback(
    services: dict[str, dict[str, Any]], settings: GatewaySettings
) -> None:
    host, _, port = settings.gateway_address.rpartition(":")
    assert host == "0.0.0.0", f"the gateway binds {settings.gateway_address}: unreachable from outside its container"
    assert published_ports(services["gateway"]).get(int(port)) == f"${{AIMESH_PUBLISH_HOST:-127.0.0.1}}:{port}"


def test_the_gateway_calls_ingest_and_the_notifier_by_service_name_once_they_are_healthy(
    services: dict[str, dict[str, Any]], settings: GatewaySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, address in (("ingest", settings.ingest_address), ("notifier", settings.notifier_address)):
        host, _, port = address.rpartition(":")
        assert host == name, f"the gateway calls {address}, not the {name} service"
        assert int(port) in published_ports(services[name]), f"{name} does not listen on {port}"
        assert services["gateway"]["depends_on"][name]["condition"] == "service_healthy"


def test_the_gateway_metrics_are_exposed_to_prometheus_and_not_published(
    services: dict[str, dict[str, Any]], settings: GatewaySettings
) -> None:
    assert settings.metrics_port and settings.metrics_host == "0.0.0.0"
    assert str(settings.metrics_port) in [str(p) for p in services["gateway"]["expose"]]
    assert settings.metrics_port not in published_ports(services["gateway"])
    prometheus = yaml.safe_load((REPO_ROOT / "deploy" / "observability" / "prometheus.yml").read_text())
    targets = [(c["names"], c["port"]) for job in prometheus["scrape_configs"] for c in job.get("dns_sd_configs", [])]
    assert (["gateway"], settings.metrics_port) in targets


def test_the_gateway_health_check_asks_its_own_port(
    services: dict[str, dict[str, Any]], settings: GatewaySettings
) -> None:
    port = settings.gateway_address.rpartition(":")[2]
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(services["gateway"]["healthcheck"]["test"])


def test_the_gateway_drains_before_docker_kills_it(
    services: dict[str, dict[str, Any]], settings: GatewaySettings
) -> None:
    stop_s = float(str(services["gateway"]["stop_grace_period"]).removesuffix("s"))
    assert stop_s > settings.shutdown_grace_s
