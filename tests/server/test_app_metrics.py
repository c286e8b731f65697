"""GET /metrics: every metric is listed, and the counts move as requests are served."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from tests.server.support import (
    ControlledEngine,
    metric_values,
    save_tiny_heads,
    serve,
    tiny_engine,
    tiny_settings,
    wait_until,
)

PROMPT = "Hello world!"
NAMES = [
    "medusa_requests_total", "medusa_request_success_total", "medusa_request_failure_total",
    "medusa_prompt_tokens_total", "medusa_generation_tokens_total",
    "medusa_request_queue_time_seconds", "medusa_time_to_first_token_seconds",
    "medusa_inter_token_latency_seconds", "medusa_e2e_request_latency_seconds",
    "medusa_num_requests_running", "medusa_num_requests_waiting", "medusa_batch_size",
    "medusa_kv_cache_slots_used", "medusa_kv_cache_slots",
    "medusa_spec_decode_num_drafts_total", "medusa_spec_decode_num_draft_tokens_total",
    "medusa_spec_decode_num_accepted_tokens_total", "medusa_spec_decode_num_accepted_tokens_per_pos_total",
    "medusa_spec_decode_mean_accepted_length",
]


def scrape(client) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return metric_values(response.text)


def test_the_page_lists_every_metric(client):
    text = client.get("/metrics").text
    for name in NAMES:
        assert f"\n# TYPE {name} " in text, name
    assert 'medusa_request_failure_total{reason="overloaded"} ' in text  # listed at zero


def test_counts_move_with_requests(loaded):
    prompt_tokens = len(loaded.tokenizer.encode(PROMPT))
    with TestClient(create_app(tiny_settings(), loaded)) as client:
        before = scrape(client)
        def post(inputs=PROMPT, **parameters):
            return client.post("/generate", json={"inputs": inputs, "parameters": parameters}).status_code

        assert post(max_new_tokens=5) == 200
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
        with client.stream("POST", "/generate_stream", json=body) as response:
            response.read()
        assert post(top_k=0) == 422  # the body
        assert post(PROMPT * 40) == 422  # the prompt is too long
        after = scrape(client)

    def moved(name):
        return after[name] - before[name]

    assert moved("medusa_requests_total") == 4
    assert moved('medusa_request_success_total{finish_reason="length"}') == 2
    assert moved('medusa_request_failure_total{reason="validation"}') == 2
    assert moved("medusa_prompt_tokens_total") == 2 * prompt_tokens
    assert moved("medusa_generation_tokens_total") == 8
    for histogram in ("request_queue_time", "time_to_first_token", "e2e_request_latency"):
        assert moved(f"medusa_{histogram}_seconds_count") == 2
    assert moved("medusa_inter_token_latency_seconds_count") == 4 + 2  # every token after the first
    assert moved("medusa_batch_size_count") == 4 + 2  # one step per token after the first
    assert after["medusa_time_to_first_token_seconds_sum"] > before["medusa_time_to_first_token_seconds_sum"]
    assert (after["medusa_num_requests_running"], after["medusa_num_requests_waiting"]) == (0, 0)
    assert (after["medusa_kv_cache_slots_used"], after["medusa_kv_cache_slots"]) == (0, 4)


def test_gauges_show_running_waiting_and_slots_and_a_departure_counts_as_cancelled(loaded):
    settings = tiny_settings(max_batch_size=1)
    engine = tiny_engine(loaded, settings, ControlledEngine)
    app = create_app(settings, loaded, engine=engine)
    post = {"json": {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, "timeout": 30}
    with serve(app) as url, ThreadPoolExecutor(2) as pool:
        scheduler = app.state.service.scheduler
        engine.gate.clear()
        requests = [pool.submit(httpx.post, url + "/generate", **post)]
        wait_until(lambda: scheduler.running == 1)
        requests.append(pool.submit(httpx.post, url + "/generate", **post))
        wait_until(lambda: scheduler.waiting == 1)
        during = metric_values(httpx.get(url + "/metrics").text)
        engine.gate.set()
        assert all(r.result().status_code == 200 for r in requests)

        engine.step_delay = 0.05
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 100}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=30) as response:
            next(response.iter_lines())
        wait_until(lambda: scheduler.running == 0)
        after = metric_values(httpx.get(url + "/metrics").text)
    assert during["medusa_num_requests_running"] == 1 and during["medusa_num_requests_waiting"] == 1
    assert during["medusa_kv_cache_slots_used"] == 1
    assert after['medusa_request_failure_total{reason="cancelled"}'] == 1
    assert after['medusa_request_success_total{finish_reason="length"}'] == 2


def test_speculation_counts_agree_with_the_responses(loaded, tmp_path):
    settings = tiny_settings(medusa_heads=save_tiny_heads(tmp_path, loaded), tree="cpu")
    with TestClient(create_app(settings, loaded)) as client:
        tree_nodes = client.get("/info").json()["speculation"]["tree_nodes"]
        stats = [client.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 24,
                                                                                  "details": True}}
                             ).json()["details"]["speculation"]
                 for prompt in ("Hello world!", "The quick brown fox", "Paris is")]
        after = scrape(client)
    drafts, accepted = sum(s["steps"] for s in stats), sum(s["accepted_tokens"] for s in stats)
    assert drafts > 0 and accepted > 0
    assert after["medusa_spec_decode_num_drafts_total"] == drafts
    assert after["medusa_spec_decode_num_draft_tokens_total"] == drafts * (tree_nodes - 1)
    assert after["medusa_spec_decode_num_accepted_tokens_total"] == accepted
    per_position = [after.get(f'medusa_spec_decode_num_accepted_tokens_per_pos_total{{position="{k}"}}', 0)
                    for k in range(1, 5)]  # a position appears once a draft there was accepted
    assert sum(per_position) == accepted
    assert per_position == sorted(per_position, reverse=True)  # position k needs positions 1..k-1
    assert after["medusa_spec_decode_mean_accepted_length"] == pytest.approx(1 + accepted / drafts)
