"""deploy/observability/ and the observability services of docker-compose.yml, checked without Docker.

The collector, Prometheus and Grafana files are parsed and checked against the compose file that mounts them:
the OTLP endpoint the services export to is the collector's receiver, the collector's traces go to the jaeger
service, Prometheus scrapes every aimesh service at the metrics port its compose environment configures (and
Triton at triton:8002), and Grafana's dashboard provider reads the folder compose mounts. Every metric the dashboard
queries is one that ``aimesh.metrics`` defines (read from the metric objects themselves) or one of Triton's own,
listed in ``TRITON_METRICS`` below.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from compose_file import effective_settings, environment
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from pydantic_settings import BaseSettings

from aimesh.settings import IngestSettings, NotifierSettings, WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
COLLECTOR_CONFIG = OBSERVABILITY / "otel-collector.yaml"
PROMETHEUS_CONFIG = OBSERVABILITY / "prometheus.yml"
GRAFANA_PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"
GRAFANA_DATASOURCE = GRAFANA_PROVISIONING / "datasources" / "prometheus.yaml"
GRAFANA_DASHBOARD_PROVIDER = GRAFANA_PROVISIONING / "dashboards" / "aimesh.yaml"
GRAFANA_DASHBOARDS = OBSERVABILITY / "grafana" / "dashboards"
DASHBOARD = GRAFANA_DASHBOARDS / "aimesh.json"

SERVICE_SETTINGS: dict[str, type[BaseSettings]] = {
    "ingest": IngestSettings,
    "worker": WorkerSettings,
    "notifier": NotifierSettings,
}
# Observability service -> the image repository it runs (the tag must be pinned).
OBSERVABILITY_IMAGES = {
    "otel-collector": "otel/opentelemetry-collector-contrib",
    "jaeger": "jaegertracing/jaeger",
    "prometheus": "prom/prometheus",
    "grafana": "grafana/grafana",
}
# Triton's default metrics port (tritonserver --metrics-port).
TRITON_METRICS_PORT = 8002
# Triton's own metric names that a dashboard may query: the per-model inference counters and gauges, GPU and CPU
# metrics of Triton's metrics guide (docs/user_guide/metrics.md of triton-inference-server/server, Triton 2.51 as
# in nvcr.io/nvidia/tritonserver:24.10-py3). Not derived from code: Triton is not a Python dependency here.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
    }
)
METRIC_NAME = re.compile(r"\b(?:aimesh|nv)_[a-z_]+")
# What the operator view must show (the list), as metric names the dashboard queries.
REQUIRED_IN_DASHBOARD = {
    "throughput": ["aimesh_worker_results_total", "aimesh_ingest_tasks_accepted_total"],
    "queue wait": ["aimesh_worker_queue_wait_seconds_bucket"],
    "inference latency": ["aimesh_worker_inference_seconds_bucket"],
    "batch sizes": ["nv_inference_count", "nv_inference_exec_count", "aimesh_worker_inference_batch_items_bucket"],
    "consumer lag": ["aimesh_worker_consumer_lag_records"],
    "dead-lettered records": ["aimesh_worker_dead_lettered_total"],
    "Triton readiness as the workers see it": ["aimesh_worker_triton_ready"],
    "errors": ["aimesh_ingest_tasks_rejected_total", "aimesh_worker_retries_total"],
    "end-to-end latency": ["aimesh_notifier_end_to_end_seconds_bucket"],
    "active subscriptions": ["aimesh_notifier_active_subscriptions"],
    "in flight": ["aimesh_worker_tasks_in_flight"],
}
# The exposition suffixes of each metric type (prometheus_client's family names carry none of them).
SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
    "untyped": ("",),
}


# --- helpers ------------------------------------------------------------------------------------------------
def load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(REPO_ROOT)} is missing"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    compose = load_yaml(COMPOSE_FILE)
    assert isinstance(compose, dict)
    return compose["services"]


@pytest.fixture(scope="module")
def collector() -> dict[str, Any]:
    return load_yaml(COLLECTOR_CONFIG)


@pytest.fixture(scope="module")
def prometheus() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_CONFIG)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    assert DASHBOARD.is_file(), f"{DASHBOARD.relative_to(REPO_ROOT)} is missing"
    loaded = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def command_args(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def option(args: Iterable[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a command line."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every volume of a service, in either Compose form."""
    found = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, Mapping):
            found.append((str(volume.get("source", "")), str(volume["target"]), bool(volume.get("read_only"))))
        else:
            source, target, *mode = str(volume).split(":")
            found.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    return found


def bind_target(service: Mapping[str, Any], local: Path) -> str:
    """Where ``local`` (a file or folder of the repository) is bind-mounted in the service; read-only required."""
    targets = [
        (target, read_only)
        for source, target, read_only in mounts(service)
        if source.startswith((".", "/")) and (COMPOSE_FILE.parent / source).resolve() == local
    ]
    assert targets, f"{local.relative_to(REPO_ROOT)} is not mounted: {mounts(service)}"
    ((target, read_only),) = targets
    assert read_only, f"{local.relative_to(REPO_ROOT)} should be mounted read-only"
    return target


def host_port(endpoint: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or a URL."""
    parsed = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
    assert parsed.hostname and parsed.port, f"not host:port: {endpoint!r}"
    return parsed.hostname, parsed.port


def scrape_targets(prometheus: Mapping[str, Any]) -> dict[tuple[str, int], str]:
    """(host, port) of every static or DNS-discovered scrape target -> its job name."""
    targets: dict[tuple[str, int], str] = {}
    for job in prometheus.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                targets[host_port(target)] = job["job_name"]
        for dns in job.get("dns_sd_configs") or []:
            assert dns.get("type", "SRV") == "A", f"{job['job_name']}: only A-record discovery names its port here"
            for name in dns["names"]:
                targets[(name, int(dns["port"]))] = job["job_name"]
    return targets


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []


def query_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in panels(dashboard) if panel.get("type") != "row"]


def expressions(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and query variables."""
    exprs = [target.get("expr", "") for panel in query_panels(dashboard) for target in panel.get("targets") or []]
    for variable in (dashboard.get("templating") or {}).get("list") or []:
        if variable.get("type") == "query":
            query = variable.get("query")
            exprs.append(query.get("query", "") if isinstance(query, Mapping) else str(query))
    return exprs


# --- the metrics the code defines ---------------------------------------------------------------------------
# The metric containers of aimesh.metrics, one per service; each registers its metrics on the registry it is given.
METRIC_CONTAINERS = ("IngestMetrics", "WorkerMetrics", "NotifierMetrics")


def _collectors_of(module: Any) -> Iterator[Collector]:
    """The metrics ``module`` defines: every class of the module that can be built from a ``registry`` alone
    (``IngestMetrics(registry=...)`` and the like), built on a fresh registry each, plus any module-level
    registry or metric object. Nothing is served: building a container only registers its metrics."""
    for name, value in vars(module).items():
        if name.startswith("__"):
            continue
        if isinstance(value, CollectorRegistry | MetricWrapperBase):
            yield value
            continue
        if not inspect.isclass(value) or value.__module__ != module.__name__:
            continue
        parameters = inspect.signature(value).parameters
        required = [
            p for p in parameters.values() if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        if "registry" in parameters and all(p.name == "registry" for p in required):
            registry = CollectorRegistry()
            value(registry=registry)
            yield registry


@pytest.fixture(scope="module")
def defined_metrics() -> tuple[frozenset[str], frozenset[str]]:
    """(series names, family names) of every metric ``aimesh.metrics`` defines.

    Series names are what Prometheus stores (a counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and
    ``_count``); family names are the metric names as declared, which the dashboard's descriptions may use.
    """
    module = importlib.import_module("aimesh.metrics")
    missing = [name for name in METRIC_CONTAINERS if not inspect.isclass(getattr(module, name, None))]
    assert not missing, f"aimesh.metrics has no {missing}: update METRIC_CONTAINERS and _collectors_of"
    series: set[str] = set()
    families: set[str] = set()
    for collector in _collectors_of(module):
        for family in collector.collect():
            families.add(family.name)
            suffixes = SAMPLE_SUFFIXES.get(family.type)
            assert suffixes is not None, f"{family.name}: unexpected metric type {family.type}"
            series |= {family.name + suffix for suffix in suffixes}
            series |= {sample.name for sample in family.samples}  # whatever else it exposes (_created, ...)
    aimesh = {name for name in families if name.startswith("aimesh_")}
    assert aimesh, (
        "found no aimesh_* metric in aimesh.metrics: expected module-level metrics or a CollectorRegistry, or a "
        "class/function taking `registry` that registers them"
    )
    return frozenset(series), frozenset(families)


def test_metric_discovery_sees_every_kind_of_metric(defined_metrics: tuple[frozenset[str], frozenset[str]]) -> None:
    series, families = defined_metrics
    # One metric of each type the dashboard relies on, so a discovery that misses a whole kind fails loudly.
    for expected in (
        "aimesh_worker_results_total",
        "aimesh_worker_queue_wait_seconds_bucket",
        "aimesh_worker_tasks_in_flight",
    ):
        assert expected in series, f"aimesh.metrics does not define {expected} (it defines {sorted(families)})"


# --- docker-compose.yml ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OBSERVABILITY_IMAGES))
def test_observability_image_is_pinned(name: str, services: dict[str, dict[str, Any]]) -> None:
    assert name in services, f"docker-compose.yml has no {name} service"
    image = str(services[name].get("image", ""))
    repository, _, tag = image.partition(":")
    assert repository == OBSERVABILITY_IMAGES[name], f"{name} runs {image}"
    assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a release tag, not {tag or 'an implicit latest'!r}"


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_service_exports_traces_to_the_collector(
    name: str, services: dict[str, dict[str, Any]], collector: dict[str, Any]
) -> None:
    env = environment(services[name])
    assert env.get("OTEL_SERVICE_NAME") == f"aimesh-{name}"
    assert env.get("OTEL_TRACES_EXPORTER") == "otlp"
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL") == "grpc"
    assert env.get("OTEL_TRACES_SAMPLER") == "parentbased_always_on"
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or ""
    # http:// is how the OTLP/gRPC exporter is told to use plaintext.
    assert urlsplit(endpoint).scheme == "http", f"{name}: {endpoint!r} is not an http:// URL"
    host, port = host_port(endpoint)
    assert host == "otel-collector" and host in services, f"{name} exports to {endpoint}, not the collector"
    grpc_endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert port == host_port(grpc_endpoint)[1], (
        f"{name} exports to port {port}; the collector listens on {grpc_endpoint}"
    )


def test_services_have_distinct_trace_names(services: dict[str, dict[str, Any]]) -> None:
    names = [environment(services[name]).get("OTEL_SERVICE_NAME") for name in SERVICE_SETTINGS]
    assert len(set(names)) == len(names), names


def test_observability_services_depend_only_on_services_of_the_file(services: dict[str, dict[str, Any]]) -> None:
    for name in OBSERVABILITY_IMAGES:
        deps = services[name].get("depends_on") or {}
        for dependency in deps:
            assert dependency in services, f"{name} depends on unknown service {dependency}"


# --- the OpenTelemetry Collector ------------------------------------------------------------------------------
def test_collector_reads_the_repository_config(services: dict[str, dict[str, Any]]) -> None:
    collector = services["otel-collector"]
    target = bind_target(collector, COLLECTOR_CONFIG)
    config = option(command_args(collector), "--config")
    # The contrib image's default command reads /etc/otelcol-contrib/config.yaml.
    assert (config or "/etc/otelcol-contrib/config.yaml") == target, f"the collector reads {config}, not {target}"


def test_collector_receives_otlp_on_every_interface(collector: dict[str, Any]) -> None:
    protocols = collector["receivers"]["otlp"]["protocols"]
    assert set(protocols) >= {"grpc", "http"}
    for protocol, default_port in (("grpc", 4317), ("http", 4318)):
        host, port = host_port(protocols[protocol]["endpoint"])
        # Receivers default to localhost, which the other containers cannot reach.
        assert host in ("0.0.0.0", "::"), f"the OTLP {protocol} receiver binds {host}"
        assert port == default_port


def test_collector_sends_the_traces_pipeline_to_jaeger(
    collector: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    traces = collector["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    assert any(p.split("/")[0] == "batch" for p in traces.get("processors") or []), "the traces pipeline has no batch"
    for kind in ("receivers", "processors", "exporters"):
        undefined = [c for c in traces.get(kind) or [] if c not in (collector.get(kind) or {})]
        assert not undefined, f"the traces pipeline names undefined {kind}: {undefined}"
    jaeger_exporters = []
    for exporter in traces["exporters"]:
        # `otlp_grpc` since collector 0.144; `otlp` is its deprecated alias.
        if exporter.split("/")[0] not in ("otlp_grpc", "otlp"):
            continue
        settings = collector["exporters"][exporter] or {}
        host, port = host_port(settings["endpoint"])
        if host == "jaeger":
            jaeger_exporters.append(exporter)
            assert (settings.get("tls") or {}).get("insecure") is True, "jaeger's OTLP receiver is plaintext"
            assert port == 4317, f"{exporter} sends to port {port}, not Jaeger's OTLP/gRPC 4317"
    assert jaeger_exporters, f"no OTLP exporter of the traces pipeline points at jaeger: {traces['exporters']}"
    assert services["jaeger"]["image"].startswith("jaegertracing/")


def test_collector_debug_exporter_is_defined_but_off(collector: dict[str, Any]) -> None:
    assert "debug" in collector["exporters"], "keep the debug exporter defined, ready to switch on"
    for name, pipeline in collector["service"]["pipelines"].items():
        assert "debug" not in pipeline.get("exporters", []), f"the debug exporter is on in the {name} pipeline"


# --- Prometheus -----------------------------------------------------------------------------------------------
def test_prometheus_reads_the_repository_config(services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    target = bind_target(prometheus, PROMETHEUS_CONFIG)
    config = option(command_args(prometheus), "--config.file")
    assert (config or "/etc/prometheus/prometheus.yml") == target


@pytest.mark.parametrize("name", sorted(SERVICE_SETTINGS))
def test_prometheus_scrapes_the_service_at_its_metrics_port(
    name: str, services: dict[str, dict[str, Any]], prometheus: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = effective_settings(SERVICE_SETTINGS[name], services[name], monkeypatch)
    port = settings.metrics_port
    assert port > 0, f"{name} serves no metrics (AIMESH_METRICS_PORT is 0)"
    targets = scrape_targets(prometheus)
    assert (name, port) in targets, f"prometheus does not scrape {name}:{port}; it scrapes {sorted(targets)}"


def test_prometheus_scrapes_triton_metrics(services: dict[str, dict[str, Any]], prometheus: dict[str, Any]) -> None:
    args = command_args(services["triton"])
    assert option(args, "--allow-metrics") in (None, "true"), "tritonserver runs with its metrics off"
    assert int(option(args, "--metrics-port") or TRITON_METRICS_PORT) == TRITON_METRICS_PORT
    assert ("triton", TRITON_METRICS_PORT) in scrape_targets(prometheus)


def test_prometheus_scrapes_only_services_of_the_file(
    services: dict[str, dict[str, Any]], prometheus: dict[str, Any]
) -> None:
    for host, port in scrape_targets(prometheus):
        assert host == "localhost" or host in services, f"prometheus scrapes {host}:{port}, no service of the file"


# --- Grafana --------------------------------------------------------------------------------------------------
def test_grafana_provisions_from_the_repository(services: dict[str, dict[str, Any]]) -> None:
    assert bind_target(services["grafana"], GRAFANA_PROVISIONING) == "/etc/grafana/provisioning"


def test_grafana_dashboard_provider_reads_the_mounted_dashboards(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounted_at = bind_target(grafana, GRAFANA_DASHBOARDS)
    providers = load_yaml(GRAFANA_DASHBOARD_PROVIDER)["providers"]
    paths = [p["options"]["path"] for p in providers if p.get("type", "file") == "file"]
    assert paths == [mounted_at], f"the dashboard provider reads {paths}; compose mounts the dashboards at {mounted_at}"
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is not None:
        assert home == f"{mounted_at}/{DASHBOARD.name}", f"the home dashboard {home} is not the mounted aimesh.json"


def test_grafana_datasource_is_the_compose_prometheus(
    services: dict[str, dict[str, Any]], dashboard: dict[str, Any]
) -> None:
    datasources = load_yaml(GRAFANA_DATASOURCE)["datasources"]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert len(prometheus) == 1, datasources
    (source,) = prometheus
    host, port = host_port(source["url"])
    assert host == "prometheus" and services[host]["image"].startswith("prom/prometheus:")
    assert port == 9090
    used = {
        (thing.get("datasource") or {}).get("uid")
        for panel in query_panels(dashboard)
        for thing in [panel, *(panel.get("targets") or [])]
    }
    assert used == {source["uid"]}, f"the dashboard uses datasources {used}, not the provisioned {source['uid']!r}"


# --- the dashboard ------------------------------------------------------------------------------------------
def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard.get("uid") and dashboard.get("title")
    assert isinstance(dashboard.get("schemaVersion"), int)
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']} is wider than the 24-column grid"


def test_every_panel_queries_promql(dashboard: dict[str, Any]) -> None:
    found = query_panels(dashboard)
    assert found, "the dashboard has no panels"
    for panel in found:
        targets = panel.get("targets") or []
        assert targets, f"panel {panel.get('title')!r} has no query"
        for target in targets:
            expr = target.get("expr", "")
            assert expr.strip(), f"panel {panel.get('title')!r} has a target without a PromQL expr"
            assert METRIC_NAME.search(expr), f"{panel['title']}: {expr!r} queries no aimesh or Triton metric"
            for opening, closing in ("()", "[]", "{}"):
                assert expr.count(opening) == expr.count(closing), f"{panel['title']}: unbalanced {opening}: {expr}"


def test_dashboard_queries_only_metrics_the_code_defines(
    dashboard: dict[str, Any], defined_metrics: tuple[frozenset[str], frozenset[str]]
) -> None:
    series, families = defined_metrics
    queried = {name for expr in expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    unknown = sorted(queried - series - TRITON_METRICS)
    assert not unknown, f"the dashboard queries {unknown}, which neither aimesh.metrics nor Triton exposes"
    # Descriptions and titles may name a metric as declared (a histogram without _bucket); nothing else.
    mentioned = set(METRIC_NAME.findall(DASHBOARD.read_text(encoding="utf-8")))
    unknown = sorted(mentioned - series - families - TRITON_METRICS)
    assert not unknown, f"the dashboard mentions {unknown}, which neither aimesh.metrics nor Triton defines"


def test_dashboard_shows_the_operator_view(dashboard: dict[str, Any]) -> None:
    queried = {name for expr in expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    missing = {view: names for view, names in REQUIRED_IN_DASHBOARD.items() if not set(names) <= queried}
    assert not missing, f"the dashboard does not show {missing}"
    exprs = expressions(dashboard)
    assert any('status="failed"' in e and "aimesh_worker_results_total" in e for e in exprs), "no failed-results panel"
    assert any(re.search(r"by \(partition\)", e) and "consumer_lag" in e for e in exprs), "no lag by partition"


def test_dashboard_quantiles_come_from_histogram_buckets(dashboard: dict[str, Any]) -> None:
    for expr in expressions(dashboard):
        if "histogram_quantile" not in expr:
            continue
        assert "_bucket" in expr, f"histogram_quantile over something that is not a histogram: {expr}"
        assert re.search(r"by \([^)]*\ble\b", expr), f"histogram_quantile must keep the le label: {expr}"


# --- the docs -----------------------------------------------------------------------------------------------
def test_docker_guide_names_the_pinned_images(services: dict[str, dict[str, Any]]) -> None:
    guide = (REPO_ROOT / "docs" / "docker.md").read_text(encoding="utf-8")
    for name in OBSERVABILITY_IMAGES:
        row = f"| `{name}` | `{services[name]['image']}` |"
        assert row in guide, f"docs/docker.md's service table has no row {row!r}"
