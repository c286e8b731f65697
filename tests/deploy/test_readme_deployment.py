"""README's Deployment section names only variables that something reads, and the files it describes."""

from __future__ import annotations

import re

from tests.deploy.support import REPO, RUNTIME_VARIABLES, SETTINGS_VARIABLES, docker_args, medusa_variables


def section() -> str:
    return (REPO / "README.md").read_text().split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]


def test_every_variable_it_names_is_read():
    text = section()
    named = set(re.findall(r"-e ([A-Z][A-Z0-9_]*)", text)) | medusa_variables(text)
    named |= set(re.findall(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`", text)) - set(docker_args())
    unknown = named - SETTINGS_VARIABLES - RUNTIME_VARIABLES
    assert named and not unknown, unknown


def test_every_path_it_names_exists():
    paths = set(re.findall(r"`((?:deploy|tests)/[\w./-]+|Dockerfile|docker-compose\.yml|\.dockerignore)`",
                           section()))
    assert paths and all((REPO / path).exists() for path in paths), paths
