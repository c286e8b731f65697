"""Fixtures for the HTTP tests: the tiny model, an app over it, and the real embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from runtime.loading import LoadedModel
from server.app import create_app
from tests.server.support import tiny_loaded, tiny_settings


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return tiny_loaded()


@pytest.fixture(scope="session")
def client(loaded) -> Iterator[TestClient]:
    """One app over the tiny model for tests that only read."""
    with TestClient(create_app(tiny_settings(), loaded)) as test_client:
        yield test_client

