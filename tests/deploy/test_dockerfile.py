"""The Dockerfile, as Docker's own parser reads it: no Docker engine builds it here, so these are the
promises it must keep for a GPU host (CUDA base, a C compiler for Triton, CI's install, a non-root user,
a health check, SIGTERM and the caches on a volume), and its .dockerignore."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.deploy.support import (
    REPO,
    RUNTIME_VARIABLES,
    SETTINGS_VARIABLES,
    docker_args,
    docker_env,
    docker_instructions,
    image_environment,
    image_uid,
    medusa_variables,
    settings_of,
)


def only(cmd: str):
    [instruction] = [c for c in docker_instructions() if c.cmd == cmd]
    return instruction


def runs() -> list[str]:
    return [c.value[0] for c in docker_instructions() if c.cmd == "RUN"]


def substituted(text: str) -> str:
    """`text` with each ${ARG} at its default."""
    return re.sub(r"\$\{(\w+)\}", lambda m: docker_args()[m[1]], text)


def test_the_base_is_a_cuda_runtime_image():
    [stage] = [c for c in docker_instructions() if c.cmd == "FROM"]
    base = substituted(stage.value[0])
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base) or \
        re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base), base


def test_c_and_cpp_compilers_and_python_headers_are_installed():
    """Triton builds its kernel launchers at run time with the host's C compiler, against Python.h; on a
    CPU, our kernels (runtime/*.cpp, attention/cpu_attention.cpp) and inductor's are C++ built there."""
    [install] = [run for run in runs() if "apt-get install" in run]
    packages = set(install.split())
    assert packages & {"gcc", "clang", "build-essential"} and {"python3-dev", "libc6-dev"} <= packages
    assert packages & {"g++", "clang", "build-essential"}


def makefile_prerequisites(target: str) -> set[str]:
    """`target` and every target it depends on, from the Makefile's rules."""
    rules: dict[str, list[str]] = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        if match := re.match(r"^([\w.$()/-]+)\s*:(?!=)\s*(.*)$", line):
            rules.setdefault(match[1], []).extend(match[2].split())
    found, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(rules.get(name, []))
    return found


def make_install() -> tuple[int, str]:
    """The instruction's index and the target of the one RUN that calls `make TARGET` (as a command of
    its own, after &&, ; or variable assignments: not apt's package of that name)."""
    [(index, target)] = [(i, target) for i, c in enumerate(docker_instructions()) if c.cmd == "RUN"
                         for target in re.findall(r"(?:^|&&|;)\s*(?:\w+=\S+\s+)*make\s+(\w+)", c.value[0])]
    return index, target


def test_the_image_installs_with_the_make_target_ci_runs():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    _, target = make_install()
    assert target in makefile_prerequisites("test") - {"test"}
    assert "install" in makefile_prerequisites(target)
    assert not any("pip install" in run for run in runs())  # no second way to install


def test_it_runs_as_a_numeric_user_that_is_not_root():
    """Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd."""
    assert image_uid() != 0


def test_it_listens_on_every_address_at_the_exposed_port_and_serves_on_the_gpu():
    settings = settings_of(image_environment())
    assert only("EXPOSE").value == (str(settings.port),)
    assert (settings.host, settings.device) == ("0.0.0.0", "cuda")


def test_the_health_check_asks_health_on_that_port_after_a_long_start():
    check = only("HEALTHCHECK")
    assert check.value[0] == "CMD" and "127.0.0.1:${PORT}/health" in check.value[1]
    flags = dict(flag.removeprefix("--").split("=") for flag in check.flags)
    assert re.fullmatch(r"\d+m", flags["start-period"]) and int(flags["start-period"][:-1]) >= 5


def test_medusa_serve_is_the_entrypoint_configured_by_the_environment_and_stopped_by_sigterm():
    entrypoint = only("ENTRYPOINT")
    assert entrypoint.json and entrypoint.value[-1] == "medusa-serve"  # exec form: the signal reaches it
    assert entrypoint.value[0].endswith("tini")  # PID 1 forwards SIGTERM, even before uvicorn handles it
    assert not [c for c in docker_instructions() if c.cmd == "CMD"]  # no flags: settings come from ENV
    assert only("STOPSIGNAL").value == ("SIGTERM",)


def test_the_caches_are_on_the_volume_and_filled_before_it_is_declared():
    """Docker throws away what a build step writes under a path once it is declared a volume."""
    [volume] = only("VOLUME").value
    env = docker_env()
    caches = {name: env[name] for name in ("MEDUSA_CACHE_DIR", "HF_HOME", "TRITON_CACHE_DIR",
                                           "TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR")}
    assert all(path.startswith(volume + "/") for path in caches.values()), caches
    order = [c.cmd for c in docker_instructions()]
    assert make_install()[0] < order.index("VOLUME")


def test_every_variable_it_sets_is_read_by_the_server_or_its_libraries():
    assert set(docker_env()) <= SETTINGS_VARIABLES | RUNTIME_VARIABLES
    text = (REPO / "Dockerfile").read_text()
    assert medusa_variables(text) <= SETTINGS_VARIABLES | RUNTIME_VARIABLES


def test_the_cpu_variant_is_build_arguments_of_the_same_file():
    args = docker_args()
    assert {"BASE_IMAGE", "TORCH_INDEX", "DEVICE"} <= set(args)
    assert docker_env()["MEDUSA_DEVICE"] == "${DEVICE}"
    assert "--build-arg DEVICE=cpu" in (REPO / "Dockerfile").read_text()


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a path: the last matching pattern decides, a `!` one keeps the path; a pattern
    matching a folder takes what is under it."""
    verdict = False
    parts = path.split("/")
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        anywhere = pattern.removeprefix("**/")
        if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes for p in (pattern, anywhere)):
            verdict = not keep
    return verdict


def test_the_dockerignore_keeps_what_the_install_reads_and_nothing_the_host_made():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = [name.rstrip("*") for name in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = ["pyproject.toml", "Makefile", project["project"]["readme"], *packages,
              "medusa/weights", "medusa/trees", "server/cli.py"]
    assert [path for path in needed if ignored(path, patterns)] == []
    assert all(ignored(path, patterns) for path in (".venv", ".git", "server/__pycache__", "runs/x", "tests"))
