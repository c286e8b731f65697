"""A server started with Medusa heads: speculation is reported, and greedy text does not change."""

import json

import pytest
from fastapi.testclient import TestClient

from medusa.checkpoints import HeadsLoadError, save_eagle, save_heads
from medusa.eagle import EagleConfig, random_drafter
from medusa.heads import MedusaConfig, MedusaHeads
from medusa.tree import TreeError
from server.app import create_app
from tests.server.support import tiny_loaded, tiny_settings

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def medusa_client(tmp_path_factory):
    loaded = tiny_loaded()
    config = loaded.model.config
    folder = tmp_path_factory.mktemp("heads")
    # zero-initialised blocks: every head guesses what the base model would say next
    heads_config = MedusaConfig(hidden_size=config.hidden_size, vocab_size=config.vocab_size)
    save_heads(MedusaHeads(heads_config), folder)
    settings = tiny_settings(medusa_heads=str(folder), tree="cpu")
    with TestClient(create_app(settings, loaded)) as client:
        yield client


def details(client, **parameters):
    body = {"inputs": PROMPT, "parameters": {"details": True, **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()["details"]


def test_info_describes_the_heads_and_tree(medusa_client):
    speculation = medusa_client.get("/info").json()["speculation"]
    assert speculation["enabled"] and speculation["num_heads"] == 4
    assert speculation["tree"] == "cpu" and speculation["tree_nodes"] > 1
    assert speculation["max_speculative_batch"] == 2  # the CPU default with heads, the engine's limit


def test_greedy_speculation_changes_nothing_but_the_step_count(medusa_client, client):
    plain = details(client, max_new_tokens=16)
    speculated = details(medusa_client, max_new_tokens=16)
    switched_off = details(medusa_client, max_new_tokens=16, speculate=False)
    def column(d, key):
        return [t[key] for t in d["tokens"]]

    assert column(speculated, "id") == column(plain, "id") == column(switched_off, "id")
    # verifying a tree changes the arithmetic a little, not the probabilities
    assert column(speculated, "logprob") == pytest.approx(column(plain, "logprob"), abs=1e-4)
    stats = speculated["speculation"]
    assert stats["steps"] >= 1 and stats["mean_accepted_len"] >= 1.0
    assert stats["mean_accepted_len"] == pytest.approx(1 + stats["accepted_tokens"] / stats["steps"])


def test_sampling_with_typical_acceptance_is_seeded(medusa_client):
    runs = [details(medusa_client, max_new_tokens=12, do_sample=True, seed=5, acceptance="typical")
            for _ in range(2)]
    assert runs[0]["tokens"] == runs[1]["tokens"]


def test_openai_responses_carry_the_same_speculation_figures(medusa_client):
    tgi = details(medusa_client, max_new_tokens=16)
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    whole = medusa_client.post("/v1/completions", json=body).json()
    assert whole["medusa"] == tgi["speculation"]
    events = medusa_client.post("/v1/completions", json=body | {"stream": True}).text.split("\n\n")
    last = json.loads(next(e for e in reversed(events) if e.startswith("data: {")).removeprefix("data: "))
    assert last["medusa"] == tgi["speculation"] and last["choices"][0]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def eagle_folder(tmp_path_factory):
    config = tiny_loaded().model.config
    folder = tmp_path_factory.mktemp("eagle")
    save_eagle(random_drafter(EagleConfig.for_base(config, window=8), seed=0), folder)
    return folder


@pytest.mark.parametrize("tree, nodes", [("mc_sim_7b_63", 64), ("dynamic:12,lookup=2", 14)])
def test_a_draft_layer_serves_the_same_greedy_text(eagle_folder, client, tree, nodes):
    settings = tiny_settings(medusa_heads=str(eagle_folder), drafter="eagle", tree=tree)
    with TestClient(create_app(settings, tiny_loaded())) as eagle_client:
        speculation = eagle_client.get("/info").json()["speculation"]
        assert speculation["enabled"] and speculation["drafter"] == "eagle"
        assert speculation["tree"] == tree and speculation["num_heads"] == 0
        assert speculation["tree_nodes"] == nodes
        speculated = details(eagle_client, max_new_tokens=16)
    plain = details(client, max_new_tokens=16)
    assert [t["id"] for t in speculated["tokens"]] == [t["id"] for t in plain["tokens"]]
    assert speculated["speculation"]["steps"] >= 1


def test_a_bad_dynamic_tree_stops_start_up_with_the_form_to_write(eagle_folder):
    settings = tiny_settings(medusa_heads=str(eagle_folder), drafter="eagle", tree="dynamic:12,width=3")
    with pytest.raises(TreeError, match="dynamic:N"):
        with TestClient(create_app(settings, tiny_loaded())):
            pass


def test_a_drafter_of_another_kind_than_asked_is_refused(eagle_folder):
    settings = tiny_settings(medusa_heads=str(eagle_folder), tree="cpu")  # --drafter heads, the default
    with pytest.raises(HeadsLoadError, match="--drafter eagle"):
        with TestClient(create_app(settings, tiny_loaded())):
            pass


def test_an_openai_responses_speculation_figures_add_up_its_choices(medusa_client):
    def figures(**fields) -> dict:
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, **fields}
        response = medusa_client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["medusa"]

    one, two = figures(), figures(prompt=[PROMPT, "Hello there"])
    other = figures(prompt="Hello there")
    assert two["steps"] == one["steps"] + other["steps"]
    assert two["accepted_tokens"] == one["accepted_tokens"] + other["accepted_tokens"]
    assert two["mean_accepted_len"] == pytest.approx(1 + two["accepted_tokens"] / two["steps"])
