"""docker-compose.yml, valid against the Compose specification, with Prometheus scraping the server and
Grafana's dashboard asking only for metrics the server exposes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import (
    DEPLOY,
    REPO,
    RUNTIME_VARIABLES,
    SETTINGS_VARIABLES,
    docker_args,
    exposed_metrics,
    image_environment,
    medusa_variables,
    queried_metrics,
    settings_of,
)

COMPOSE = REPO / "docker-compose.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounted(service: str, inside: str) -> Path:
    """The file or folder of this repository that `service` mounts at `inside`."""
    mounts = dict(volume.split(":")[:2] for volume in compose()["services"][service]["volumes"])
    return (REPO / {inside_: host for host, inside_ in mounts.items()}[inside]).resolve()


def servers() -> dict[str, dict]:
    """The services built from this repository's Dockerfile."""
    return {name: service for name, service in compose()["services"].items() if "build" in service}


def check_compose_file(path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, capture_output=True, text=True)


def test_the_file_is_valid_against_the_compose_specification(tmp_path):
    checked = check_compose_file(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    misspelled = tmp_path / "docker-compose.yml"  # what the check is worth: a field Compose lacks fails
    misspelled.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_periode:"))
    assert check_compose_file(misspelled).returncode != 0


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * units[unit] for number, unit in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


@pytest.mark.parametrize("name", ["medusa", "medusa-cpu"])
def test_the_server_keeps_its_caches_and_stops_only_after_its_drain(name):
    service = servers()[name]
    environment = {key: str(value) for key, value in service["environment"].items()}
    settings = settings_of(image_environment() | {k: v for k, v in environment.items() if v and "$" not in v})
    assert seconds(service["stop_grace_period"]) > settings.drain_timeout
    assert any(volume.endswith(":/cache") for volume in service["volumes"])
    assert service["ports"] == [f"{settings.port}:{settings.port}"]


def test_the_gpu_service_reserves_a_gpu_and_the_cpu_one_is_the_dockerfiles_cpu_variant():
    [device] = servers()["medusa"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    cpu = servers()["medusa-cpu"]
    assert set(cpu["build"]["args"]) <= set(docker_args())
    assert cpu["build"]["args"]["DEVICE"] == "cpu" and "cuda" not in cpu["build"]["args"]["BASE_IMAGE"]
    assert cpu["profiles"] == ["cpu"]  # `docker compose up` alone starts the GPU one


def test_every_variable_named_is_a_setting_or_one_the_runtime_reads():
    for service in servers().values():
        assert set(service["environment"]) <= SETTINGS_VARIABLES | RUNTIME_VARIABLES
    for path in (COMPOSE, DEPLOY / "prometheus" / "prometheus.yml"):
        assert medusa_variables(path.read_text()) <= SETTINGS_VARIABLES | RUNTIME_VARIABLES, path.name


def test_prometheus_scrapes_every_server_service_on_its_port():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    [discovery] = job["dns_sd_configs"]
    assert set(discovery["names"]) == set(servers())
    assert discovery["port"] == settings_of(image_environment()).port
    assert mounted("prometheus", "/etc/prometheus/prometheus.yml") == DEPLOY / "prometheus" / "prometheus.yml"


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "medusa-serve.json").read_text())


def test_the_dashboard_asks_only_for_metrics_the_server_exposes():
    expressions = [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    asked = set().union(*map(queried_metrics, expressions))
    assert asked and asked <= exposed_metrics(), asked - exposed_metrics()


def test_the_dashboard_shows_throughput_latency_queue_batch_and_acceptance_per_position():
    expressions = " ".join(target["expr"] for panel in dashboard()["panels"] for target in panel["targets"])
    for needed in ("rate(medusa_generation_tokens_total", "histogram_quantile(0.99",
                   "medusa_num_requests_waiting", "medusa_batch_size", "by (position)",
                   "medusa_prompt_tokens_cached_total"):
        assert needed in expressions
    assert len({panel["id"] for panel in dashboard()["panels"]}) == len(dashboard()["panels"])


def test_grafana_is_provisioned_with_the_composes_prometheus_and_the_dashboard():
    provisioning = mounted("grafana", "/etc/grafana/provisioning")
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "medusa-serve.yml").read_text())["providers"]
    assert mounted("grafana", provider["options"]["path"]) == DEPLOY / "grafana" / "dashboards"
