"""The Kubernetes manifests: valid against the API's schemas (strict: an unknown or misspelled field fails),
consistent with each other (selectors, ports, the autoscaled Deployment), and with the server (its
settings' variables, its drain timeout, the metric the autoscaler follows)."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest
import yaml

from server.settings import ENVIRONMENT
from tests.deploy.support import (
    DEPLOY,
    RUNTIME_VARIABLES,
    SETTINGS_VARIABLES,
    exposed_metrics,
    image_environment,
    image_uid,
    medusa_variables,
    queried_metrics,
    settings_of,
)

KUBERNETES = DEPLOY / "kubernetes"
# the oldest Kubernetes still commonly run, and the newest the validator knows
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# a first start may download a model of tens of GB and compile every graph
FIRST_START_SECONDS = 600


def kustomization() -> dict:
    return yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())


def manifests() -> dict[str, dict]:
    """The objects the kustomization lists, by kind."""
    objects = [doc for name in kustomization()["resources"]
               for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects), "one object of each kind"
    return by_kind


def pod() -> dict:
    return manifests()["Deployment"]["spec"]["template"]


def container() -> dict:
    [server] = pod()["spec"]["containers"]
    return server


def environment() -> dict[str, str]:
    """The container's variables with a plain value."""
    return {var["name"]: var["value"] for var in container()["env"] if "value" in var}


def test_the_kustomization_lists_every_manifest_beside_it():
    listed = set(kustomization()["resources"])
    assert listed == {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    [image] = kustomization()["images"]
    assert image["name"] == container()["image"].split(":")[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version):
    for obj in manifests().values():
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_refuses_a_misspelled_field():
    """What the test above is worth: strict validation fails a field the API does not have."""
    deployment = copy.deepcopy(manifests()["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_service_budget_and_autoscaler_all_select_the_deployments_pods():
    objects = manifests()
    labels = pod()["metadata"]["labels"]
    selectors = [objects["Deployment"]["spec"]["selector"]["matchLabels"],
                 objects["Service"]["spec"]["selector"],
                 objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]]
    assert all(selector.items() <= labels.items() for selector in selectors)
    target = objects["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", objects["Deployment"]["metadata"]["name"])
    assert "replicas" not in objects["Deployment"]["spec"]  # the autoscaler's to set
    port_names = {port["name"] for port in container()["ports"]}
    assert {port["targetPort"] for port in objects["Service"]["spec"]["ports"]} <= port_names


def test_each_pod_gets_a_gpu_on_a_gpu_node():
    resources = container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] >= 1
    assert any(key.startswith("nvidia.com/") for key in pod()["spec"]["nodeSelector"])
    settings = settings_of(image_environment() | environment())  # the pod's variables over the image's
    assert settings.device.startswith("cuda") and settings.host == "0.0.0.0"


def test_probes_ask_health_and_the_first_start_has_time_to_load_the_model():
    port_names = {port["name"] for port in container()["ports"]}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container()[kind]
        assert probe["httpGet"]["path"] == "/health" and probe["httpGet"]["port"] in port_names
    startup = container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= FIRST_START_SECONDS


def test_the_grace_period_covers_the_pre_stop_pause_and_the_drain():
    settings = settings_of(environment())
    assert settings.json_output  # a cluster's log collector reads JSON lines
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(command[-1]) if command[0] == "sleep" else 0.0
    assert pod()["spec"]["terminationGracePeriodSeconds"] > pause + settings.drain_timeout


def test_the_api_key_comes_from_a_secret():
    [key] = [var for var in container()["env"] if var["name"] == ENVIRONMENT["api_key"]]
    assert set(key["valueFrom"]["secretKeyRef"]) == {"name", "key"}


def test_every_variable_is_a_setting_and_the_settings_are_valid():
    names = {var["name"] for var in container()["env"]}
    assert names <= SETTINGS_VARIABLES | RUNTIME_VARIABLES
    settings_of(environment())  # e.g. max_input_tokens below max_total_tokens
    for path in KUBERNETES.glob("*.yaml"):  # the comments too
        assert medusa_variables(path.read_text()) <= SETTINGS_VARIABLES | RUNTIME_VARIABLES, path.name


def test_the_pods_run_as_the_images_user():
    security = pod()["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == image_uid()


def test_prometheus_scrapes_the_container_port():
    annotations = pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) in {port["containerPort"] for port in container()["ports"]}


def test_the_autoscaler_follows_a_metric_the_adapter_serves_from_one_the_server_exposes():
    [metric] = manifests()["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    adapter = yaml.safe_load((DEPLOY / "prometheus" / "adapter-values.yaml").read_text())
    served = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    rule = served[metric["pods"]["metric"]["name"]]
    assert queried_metrics(rule["seriesQuery"]) == {"medusa_num_requests_waiting"}  # the queue depth
    assert queried_metrics(rule["seriesQuery"]) <= exposed_metrics()
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
