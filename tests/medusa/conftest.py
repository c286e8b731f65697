"""Fixtures for the engine's tests: the real embedded model, loaded once per session."""

from __future__ import annotations

import pytest

from medusa.loading import LoadedModel, load_model


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    """SmolLM2-135M-Instruct on the CPU in float32 (converted into the cache on first use, ~25 s)."""
    return load_model(device="cpu", dtype="float32")
