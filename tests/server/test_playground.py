"""The playground at GET /: the page and its files are served (and stay open under API keys), POST /
stays TGI's route, and in headless Chromium against a real server the page streams an answer whose
runs of tokens are shaded by the step that emitted them.

The browser test serves the embedded SmolLM2-135M-Instruct with its shipped heads: a tiny random model
accepts almost no drafts and writes no readable text, and the screenshot is meant to show what
speculation does. Chromium is Debian's, installed by the `chromium` fixture where missing (as root,
with apt-get), driven by the `playwright` package, which downloads no browser of its own here.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.server.support import save_tiny_heads, serve, tiny_settings

CHROMIUM = Path("/usr/bin/chromium")
# no sandbox: CI runs as root, where Chromium's sandbox refuses to start; the rest keeps it off the network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "playground.png"  # gitignored
PROMPT = "Write a short poem about the sea."
GENERATE = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}


def test_the_page_and_its_files_are_served_and_post_root_still_generates(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path, kind in [("static/playground.js", "javascript"), ("static/playground.css", "text/css")]:
        assert f'"{path}"' in page.text
        assert kind in client.get("/" + path).headers["content-type"]
    assert client.get("/static/nothing.js").status_code == 404
    answer = client.post("/", json=GENERATE)  # TGI's client route
    assert answer.status_code == 200 and isinstance(answer.json(), list)
    assert "get" not in client.get("/openapi.json").json()["paths"]["/"]  # a page, not an API operation


def test_the_page_stays_open_under_api_keys_and_generating_does_not(loaded):
    with TestClient(create_app(tiny_settings(api_key="key"), loaded)) as guarded:
        assert guarded.get("/").status_code == 200
        assert guarded.get("/static/playground.js").status_code == 200
        assert guarded.post("/", json=GENERATE).status_code == 401
        assert guarded.post("/", json=GENERATE, headers={"authorization": "Bearer key"}).status_code == 200
        assert guarded.post("/static/playground.js").status_code == 401  # only reading the files is open


@pytest.mark.parametrize("speculate", [True, False])
def test_each_streamed_token_names_the_step_that_emitted_it(loaded, tmp_path, speculate):
    """What the page shades by: `step` counts engine calls from 1 (the prefill), so with speculation
    the steps after the first are the speculative ones and their tokens are 1 + the accepted drafts."""
    settings = tiny_settings(medusa_heads=save_tiny_heads(tmp_path, loaded), tree="cpu")
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 40, "details": True,
                                                            "speculate": speculate}}
    with TestClient(create_app(settings, loaded)) as client:
        text = client.post("/generate_stream", json=body).text
    events = [json.loads(line.removeprefix("data:")) for line in text.split("\n\n") if line]
    steps = [event["step"] for event in events]
    assert steps[0] == 1 and all(b - a in (0, 1) for a, b in itertools.pairwise(steps))
    speculation = events[-1]["details"]["speculation"]
    assert speculation["steps"] == (steps[-1] - 1 if speculate else 0)
    assert len(events) == steps[-1] + speculation["accepted_tokens"]


# ---------------------------------------------------------------- in headless Chromium

@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt-get when missing and this process is root; else a skip."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"no Chromium at {CHROMIUM}, and installing it needs root and apt-get "
                    "(`apt-get install -y chromium`)")
    environment = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=900, env=environment)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            output = getattr(e, "stderr", b"") or b""
            pytest.skip(f"could not install Chromium: {' '.join(command)}: {e}; {output.decode()[-500:]}")
    assert CHROMIUM.exists(), "apt-get installed chromium, but not at /usr/bin/chromium"
    return CHROMIUM


@pytest.fixture(scope="module")
def page(chromium, real_model):
    """A Chromium page on the playground of a real server over the embedded model and its heads."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with serve(create_app(Settings(), real_model)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1000})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url + "/")
            yield page
        finally:
            browser.close()
    assert not errors, f"the page raised: {errors}"


def generate(page, *, speculate: bool) -> list[dict]:
    """Run the form once; the answer's runs, in order: step, token count, text, background colour."""
    runs_before = page.locator("#history tbody tr").count()
    page.set_checked("#speculate", speculate)
    page.click("#generate")
    page.locator("#history tbody tr").nth(runs_before).wait_for(timeout=30_000)  # added when a run ends
    assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
    return page.eval_on_selector_all("#answer .run", """spans => spans.map(s => ({
        step: Number(s.dataset.step), tokens: Number(s.dataset.tokens), text: s.textContent,
        shade: getComputedStyle(s).backgroundColor}))""")


@pytest.mark.slow
def test_the_answer_is_shaded_by_step_and_speculation_can_be_switched_off(page):
    page.locator("#model").filter(has_text="Medusa heads").wait_for()  # /info answered: the server speculates
    page.fill("#prompt", PROMPT)
    page.fill("#max-new-tokens", "32")

    plain = generate(page, speculate=False)
    assert [run["tokens"] for run in plain] == [1] * len(plain)  # one token per step
    assert page.text_content("#tokens-per-step") == "1.00"

    speculated = generate(page, speculate=True)
    page.screenshot(path=SCREENSHOT, full_page=True)
    print(f"playground screenshot: {SCREENSHOT}")
    steps = [run["step"] for run in speculated]
    assert len(steps) > 1 and steps == sorted(set(steps))  # one span per step, in order
    assert max(run["tokens"] for run in speculated) > 1  # a step that accepted drafts
    assert sum(run["tokens"] for run in speculated) == sum(run["tokens"] for run in plain)
    # greedy speculation changes how many steps the answer took, not the answer
    assert "".join(run["text"] for run in speculated) == "".join(run["text"] for run in plain)
    assert "".join(run["text"] for run in plain).strip()
    # a run's shade says how many tokens its step gave
    single = {run["shade"] for run in speculated if run["tokens"] == 1}
    several = {run["shade"] for run in speculated if run["tokens"] > 1}
    assert several and not single & several
    assert float(page.text_content("#tokens-per-step")) > 1.0
    assert page.locator("#history tbody tr").count() == 2
