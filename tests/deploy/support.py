"""What the deployment files are checked against: the server's own settings, variables and metrics, read
from the code, so that a renamed setting or metric fails here instead of in a cluster."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import dockerfile
from prometheus_client.parser import text_string_to_metric_families

from server.cli import settings_from
from server.metrics import Metrics
from server.settings import ENVIRONMENT, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# read by the libraries and the runtime, not by Settings: the caches' places, the hub's token, the image's
RUNTIME_VARIABLES = frozenset({"MEDUSA_CACHE_DIR", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                               "TORCH_EXTENSIONS_DIR", "HF_TOKEN", "PATH", "PYTHONUNBUFFERED"})
SETTINGS_VARIABLES = frozenset(ENVIRONMENT.values())


def settings_of(environment: dict[str, str]) -> Settings:
    """The settings a server started with `environment` runs with (a bad name or value fails here)."""
    unknown = set(environment) - SETTINGS_VARIABLES - RUNTIME_VARIABLES
    assert not unknown, f"variables no setting reads: {sorted(unknown)}"
    with_values = {name: value for name, value in environment.items() if name in SETTINGS_VARIABLES}
    return settings_from([], with_values)


def medusa_variables(text: str) -> set[str]:
    """Every MEDUSA_* name a file mentions, comments included."""
    return set(re.findall(r"\bMEDUSA_[A-Z0-9_]*[A-Z0-9]\b", text))


@functools.cache
def exposed_metrics() -> frozenset[str]:
    """The sample names a server's /metrics page holds (counters with _total, histograms with _bucket...)."""
    metrics = Metrics()
    metrics.watch(running=lambda: 0, waiting=lambda: 0, kv_slots_used=lambda: 0, kv_slots=1, head_positions=1)
    families = text_string_to_metric_families(metrics.exposition().decode())
    return frozenset(sample.name for family in families for sample in family.samples)


def queried_metrics(expression: str) -> set[str]:
    return set(re.findall(r"\bmedusa_[a-z0-9_]+\b", expression))


@functools.cache
def docker_instructions() -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def docker_args() -> dict[str, str]:
    """Each ARG's default."""
    return dict(c.value[0].split("=", 1) for c in docker_instructions() if c.cmd == "ARG")


def docker_env() -> dict[str, str]:
    pairs = [c.value for c in docker_instructions() if c.cmd == "ENV"]
    return {name: value for values in pairs for name, value in zip(values[::2], values[1::2], strict=True)}


def image_environment() -> dict[str, str]:
    """The variables a container of the default image starts with (ARGs at their defaults)."""
    return {name: re.sub(r"\$\{(\w+)\}", lambda m: docker_args()[m[1]], value)
            for name, value in docker_env().items() if name != "PATH"}


def image_uid() -> int:
    [user] = [c.value[0] for c in docker_instructions() if c.cmd == "USER"]
    return int(user.split(":")[0])
