"""docker-compose.yml's replicas, checked without Docker: two of each aimesh service, as ``make up`` runs with
``AIMESH_STACK_INGEST_REPLICAS=2`` and ``AIMESH_STACK_NOTIFIER_REPLICAS=2``; each extra ingest or notifier replica is
the first one's service on a host port of its own, found inside the network under the first one's name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_file import effective_settings

from aimesh.settings import IngestSettings, NotifierSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
REPLICAS = {"ingest": 2, "worker": 2, "notifier": 2}
GRPC = {"ingest": (IngestSettings, "ingest_address"), "notifier": (NotifierSettings, "notifier_address")}
# Everything a replica must share with the first one; only its published ports, network aliases, volumes and the
# address it advertises to its peers differ.
SHARED = ("build", "image", "command", "environment", "healthcheck", "expose", "depends_on", "stop_grace_period")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def replicas_of(name: str, services: dict[str, dict[str, Any]]) -> list[str]:
    return [n for n in services if n == name or re.fullmatch(rf"{name}-\d+", n)]


def host_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) of each published port, in the short form the file uses."""
    pairs = [str(entry).rsplit(":", 2)[-2:] for entry in service.get("ports") or []]
    return [(int(host), int(container)) for host, container in pairs]


@pytest.mark.parametrize(("name", "count"), sorted(REPLICAS.items()))
def test_every_aimesh_service_runs_as_many_replicas_as_the_stack_can(
    name: str, count: int, services: dict[str, dict[str, Any]]
) -> None:
    running = sum(int(services[n].get("deploy", {}).get("replicas", 1)) for n in replicas_of(name, services))
    assert running == count, f"{name} runs {running} replicas, not {count}"


@pytest.mark.parametrize("name", sorted(GRPC))
def test_an_extra_replica_is_the_same_service_under_the_same_name_on_a_host_port_of_its_own(
    name: str, services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, *others = (services[n] for n in replicas_of(name, services))
    assert others, f"{name} has a single replica"
    cls, field = GRPC[name]
    port = int(getattr(effective_settings(cls, first, monkeypatch), field).rpartition(":")[2])
    own = {"AIMESH_NOTIFIER_ADVERTISED_ADDRESS"}  # each replica's own name, by which its peers reach it
    for replica in others:
        kept = set(SHARED) - {"environment"}
        assert {key: replica.get(key) for key in kept} == {key: first.get(key) for key in kept}
        assert {k: v for k, v in replica["environment"].items() if k not in own} == {
            k: v for k, v in first["environment"].items() if k not in own
        }
        assert replica["networks"]["default"]["aliases"] == [name], "the service's name must resolve to it too"
        assert [container for _, container in host_ports(replica)] == [port]
    published = [host for service in services.values() for host, _ in host_ports(service)]
    assert len(published) == len(set(published)), f"a host port is published twice: {sorted(published)}"


def test_prometheus_finds_every_replica_under_the_services_name(services: dict[str, dict[str, Any]]) -> None:
    prometheus = yaml.safe_load((REPO_ROOT / "deploy" / "observability" / "prometheus.yml").read_text())
    looked_up = {
        name for job in prometheus["scrape_configs"] for c in job.get("dns_sd_configs", []) for name in c["names"]
    }
    for name in GRPC:
        assert name in looked_up
        for replica in replicas_of(name, services)[1:]:
            assert name in services[replica]["networks"]["default"]["aliases"]


def test_each_partitioned_notifier_advertises_a_name_only_it_answers_to_and_keeps_its_own_state(
    services: dict[str, dict[str, Any]],
) -> None:
    replicas = replicas_of("notifier", services)
    names: dict[str, list[str]] = {}  # a DNS name on the network -> the services it resolves to
    for name, service in services.items():
        for alias in [name, *service.get("networks", {}).get("default", {}).get("aliases", [])]:
            names.setdefault(alias, []).append(name)
    advertised = [services[r]["environment"]["AIMESH_NOTIFIER_ADVERTISED_ADDRESS"] for r in replicas]
    assert len(set(advertised)) == len(replicas)
    for replica, address in zip(replicas, advertised, strict=True):
        assert services[replica]["environment"]["AIMESH_NOTIFIER_PARTITIONED"] == "true"
        assert names[address.rpartition(":")[0]] == [replica]
    state_volumes = [services[r]["volumes"][0].partition(":")[0] for r in replicas]
    assert len(set(state_volumes)) == len(replicas)  # RocksDB locks its directory: one each
