"""API keys: with keys set, every route but /health, /metrics (unless asked) and the playground's page
answers 401 without a valid Bearer key, in the shape of the protocol called; any of several keys is
accepted; without keys nothing changes."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import settings_from
from tests.server.support import tiny_settings

GENERATE = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}


@pytest.fixture(scope="module")
def guarded(loaded):
    with TestClient(create_app(tiny_settings(api_key="first-key, second-key"), loaded)) as client:
        yield client


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Bearer first", "Basic first-key", "first-key",
                                    "Bearer first-key-and-more"])
def test_a_request_without_a_valid_key_is_refused_in_its_protocol_shape(guarded, header):
    headers = {} if header is None else {"authorization": header}
    tgi = guarded.post("/generate", json=GENERATE, headers=headers)
    assert tgi.status_code == 401 and tgi.headers["www-authenticate"] == "Bearer"
    assert tgi.json()["error_type"] == "unauthorized"
    openai = guarded.get("/v1/models", headers=headers)
    assert openai.status_code == 401
    assert openai.json()["error"]["code"] == "invalid_api_key"
    assert guarded.get("/info", headers=headers).status_code == 401


@pytest.mark.parametrize("key", ["first-key", "second-key"])
def test_each_key_opens_every_route(guarded, key):
    headers = {"authorization": f"bearer {key}"}
    assert guarded.post("/generate", json=GENERATE, headers=headers).status_code == 200
    assert guarded.get("/v1/models", headers=headers).status_code == 200
    assert guarded.get("/info", headers=headers).status_code == 200


def test_health_and_metrics_stay_open(guarded):
    assert guarded.get("/health").status_code == 200
    assert guarded.get("/metrics").status_code == 200


def test_metrics_asks_for_a_key_when_told(loaded):
    settings = tiny_settings(api_key="key", metrics_api_key_required=True)
    with TestClient(create_app(settings, loaded)) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"authorization": "Bearer key"}).status_code == 200
        assert client.get("/health").status_code == 200


def test_metrics_behind_a_key_without_keys_is_refused_at_start_up(capsys):
    with pytest.raises(SystemExit):
        settings_from([], {"MEDUSA_METRICS_API_KEY_REQUIRED": "true"})
    assert "metrics_api_key_required needs api_key" in capsys.readouterr().err
    assert settings_from(["--metrics-api-key-required"], {"API_KEY": "k"}).metrics_api_key_required


def test_without_keys_no_route_asks_for_one(client):
    assert client.post("/generate", json=GENERATE).status_code == 200


def test_keys_come_from_the_flag_or_api_key():
    assert settings_from([], {"API_KEY": "a,b"}).api_keys == ("a", "b")
    assert settings_from(["--api-key", "c"], {"API_KEY": "a"}).api_keys == ("c",)
    assert settings_from([], {}).api_keys == ()


def test_cors_is_off_by_default_and_answers_the_origins_it_is_given(loaded, client):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    assert "access-control-allow-origin" not in client.options("/generate", headers=preflight).headers
    settings = tiny_settings(api_key="k", cors_allow_origins="https://app.example, https://other.example")
    with TestClient(create_app(settings, loaded)) as browser_facing:
        answer = browser_facing.options("/generate", headers=preflight)  # no key: a preflight never has one
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        refused = browser_facing.post("/generate", json=GENERATE, headers={"origin": "https://app.example"})
        assert refused.status_code == 401  # and the browser can read why
        assert refused.headers["access-control-allow-origin"] == "https://app.example"
        other = browser_facing.options("/generate", headers=preflight | {"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("value", [",", " , ,"])
def test_an_api_key_setting_without_a_key_is_refused_at_start_up(value):
    with pytest.raises(SystemExit):
        settings_from(["--api-key", value], {})
