"""POST /generate and POST /: the TGI response body, details, finish reasons, headers, seeds."""

import json

import transformers
from fastapi.testclient import TestClient

from runtime.config import SamplingParams
from server.app import create_app
from tests.server.support import tiny_engine, tiny_loaded, tiny_settings

PROMPT = "What is the capital of France?"


def generate(client, inputs=PROMPT, route="/generate", **parameters):
    response = client.post(route, json={"inputs": inputs, "parameters": parameters})
    assert response.status_code == 200, response.text
    return response


def greedy_ids(loaded, prompt=PROMPT, max_new_tokens=12):
    """What the engine generates greedily for `prompt`, without the server in between."""
    engine = tiny_engine(loaded, tiny_settings())
    prompt_ids = loaded.tokenizer.encode(prompt)
    return engine.generate([prompt_ids], SamplingParams(max_new_tokens=max_new_tokens))[0]


def test_generate_returns_text_only_unless_details_asked(client):
    body = generate(client, max_new_tokens=5).json()
    assert set(body) == {"generated_text"}
    assert isinstance(body["generated_text"], str)


def test_details_fields(client, loaded):
    body = generate(client, max_new_tokens=6, details=True).json()
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 6 == len(details["tokens"])
    assert details["seed"] is None  # greedy
    assert details["prefill"] == []
    for token in details["tokens"]:
        assert set(token) == {"id", "text", "logprob", "special"}
        assert token["logprob"] <= 0.0
        assert token["special"] == (token["id"] in loaded.tokenizer.all_special_ids)
    ids = [t["id"] for t in details["tokens"]]
    assert body["generated_text"] == loaded.tokenizer.decode(ids, skip_special_tokens=True)


def test_greedy_equals_the_engine_alone(client, loaded):
    body = generate(client, max_new_tokens=12, details=True).json()
    assert [t["id"] for t in body["details"]["tokens"]] == greedy_ids(loaded)


def test_decoder_input_details_lists_the_prompt_tokens(client, loaded):
    details = generate(client, max_new_tokens=2, decoder_input_details=True).json()["details"]
    prompt_ids = loaded.tokenizer.encode(PROMPT)
    assert [t["id"] for t in details["prefill"]] == prompt_ids
    assert "".join(t["text"] for t in details["prefill"]) == PROMPT
    assert details["prefill"][0]["logprob"] is None
    assert all(t["logprob"] <= 0.0 for t in details["prefill"][1:])


def test_return_full_text_prepends_the_prompt(client):
    plain = generate(client, max_new_tokens=4).json()["generated_text"]
    full = generate(client, max_new_tokens=4, return_full_text=True).json()["generated_text"]
    assert full == PROMPT + plain


def test_seeded_sampling_is_reproducible_and_reports_its_seed(client):
    def sample(**parameters):
        return generate(client, max_new_tokens=16, details=True, **parameters).json()

    first, again = sample(do_sample=True, seed=7), sample(do_sample=True, seed=7)
    assert first["generated_text"] == again["generated_text"]
    assert first["details"]["seed"] == 7
    assert sample(do_sample=True, seed=8)["generated_text"] != first["generated_text"]
    # a sampling knob implies sampling; without a seed the server picks one and reports it
    unseeded = sample(temperature=0.9)
    replay = sample(temperature=0.9, seed=unseeded["details"]["seed"])
    assert isinstance(unseeded["details"]["seed"], int)
    assert replay["generated_text"] == unseeded["generated_text"]


def test_stop_sequence_ends_generation(client, loaded):
    free_text = loaded.tokenizer.decode(greedy_ids(loaded, max_new_tokens=8))
    stop = free_text[3:5]
    details = generate(client, max_new_tokens=8, stop=[stop], details=True).json()["details"]
    assert details["finish_reason"] == "stop_sequence"
    text = loaded.tokenizer.decode([t["id"] for t in details["tokens"]])
    assert stop in text and stop not in loaded.tokenizer.decode([t["id"] for t in details["tokens"][:-1]])


def test_eos_token_ends_generation():
    loaded = tiny_loaded()
    free = greedy_ids(loaded, max_new_tokens=8)
    eos = free[4]  # pretend the fifth greedy token is the end of sequence
    with TestClient(create_app(tiny_settings(), tiny_loaded(eos_token_ids=(eos,)))) as client:
        details = generate(client, max_new_tokens=8, details=True).json()["details"]
        past = generate(client, max_new_tokens=8, details=True, ignore_eos=True).json()["details"]
        chat = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                                                    "ignore_eos": True}).json()
    assert details["finish_reason"] == "eos_token"
    assert [t["id"] for t in details["tokens"]] == free[:free.index(eos) + 1]
    # ignore_eos (vLLM's extension, on both protocols) runs on past it
    assert past["finish_reason"] == "length" and [t["id"] for t in past["tokens"]] == free
    assert chat["usage"]["completion_tokens"] == 8 and chat["choices"][0]["finish_reason"] == "length"


def test_min_tokens_holds_off_eos_on_both_protocols():
    """TGI's parameters take min_new_tokens, OpenAI bodies vLLM's min_tokens: the text goes past the
    EOS token greedy decoding would end at, to where EOS is allowed again; then the engine's own
    output under the ban."""
    loaded = tiny_loaded()
    free = greedy_ids(loaded, max_new_tokens=12)
    eos = free[2]  # greedy would end at the third token
    loaded = tiny_loaded(eos_token_ids=(eos,))
    expected = tiny_engine(loaded, tiny_settings()).generate(
        [loaded.tokenizer.encode(PROMPT)], SamplingParams(max_new_tokens=12, min_tokens=6))[0]
    assert len(expected) > 6 and eos not in expected[:6]
    with TestClient(create_app(tiny_settings(), loaded)) as client:
        details = generate(client, max_new_tokens=12, details=True, min_new_tokens=6).json()["details"]
        assert [t["id"] for t in details["tokens"]] == expected
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "min_tokens": 6}
        completion = client.post("/v1/completions", json=body).json()
        assert completion["usage"]["completion_tokens"] == len(expected)
        for parameters in ({"max_new_tokens": 4, "min_new_tokens": 5}, {"min_new_tokens": -1}):
            response = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
            assert response.status_code == 422 and "min_new_tokens" in response.json()["error"]
        refused = client.post("/v1/completions", json={"prompt": PROMPT, "min_tokens": 17})  # max_tokens 16
        assert refused.status_code == 400 and "min_tokens" in refused.json()["error"]["message"]


def test_stop_token_ids_end_the_text_on_both_protocols(client, loaded):
    free = greedy_ids(loaded, max_new_tokens=12)
    stop = free[4]
    details = generate(client, max_new_tokens=12, details=True, stop_token_ids=[stop]).json()["details"]
    assert details["finish_reason"] == "eos_token" and [t["id"] for t in details["tokens"]] == free[:5]
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop_token_ids": [stop]}
    completion = client.post("/v1/completions", json=body).json()
    assert completion["usage"]["completion_tokens"] == 5
    assert completion["choices"][0]["finish_reason"] == "stop"
    vocab = loaded.model.config.vocab_size
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": {"stop_token_ids": [vocab]}})
    assert response.status_code == 422 and "outside the vocabulary" in response.json()["error"]
    response = client.post("/v1/completions", json={"prompt": PROMPT, "stop_token_ids": [vocab]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stop_token_ids"


def test_root_route_answers_a_list_like_tgi(client):
    response = generate(client, route="/", max_new_tokens=3, details=True)
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["details"]["generated_tokens"] == 3


def test_timing_headers(client, loaded):
    headers = generate(client, max_new_tokens=5).headers
    assert headers["x-prompt-tokens"] == str(len(loaded.tokenizer.encode(PROMPT)))
    assert headers["x-generated-tokens"] == "5"
    assert float(headers["x-compute-time"]) > 0
    assert int(headers["x-time-per-token"]) >= 0


def test_truncate_keeps_the_last_prompt_tokens(client, loaded):
    details = generate(client, max_new_tokens=1, truncate=3, decoder_input_details=True).json()["details"]
    assert [t["id"] for t in details["prefill"]] == loaded.tokenizer.encode(PROMPT)[-3:]


def test_health_info_and_docs(client):
    assert client.get("/health").status_code == 200
    info = client.get("/info").json()
    assert info["model_id"] == "tiny-random-llama"
    assert (info["max_input_tokens"], info["max_total_tokens"], info["max_batch_size"]) == (64, 128, 4)
    assert info["speculation"] == {"enabled": False, "drafter": None, "num_heads": 0, "tree": None,
                                   "tree_nodes": 1, "max_speculative_batch": None}
    assert "version" in info and info["compiled"] is False  # --compile auto on the CPU
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/generate_stream", "/", "/health", "/info"} <= set(paths)


def test_without_a_loaded_model_the_app_loads_the_one_settings_name(tmp_path):
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=112,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path)
    tiny_loaded().tokenizer.save_pretrained(tmp_path)
    with TestClient(create_app(tiny_settings(model=str(tmp_path)))) as client:
        assert client.get("/info").json()["model_id"] == tmp_path.name
        assert generate(client, max_new_tokens=3, details=True).json()["details"]["generated_tokens"] == 3


def test_info_reports_the_dtype_auto_chose(loaded):
    """`model_dtype` is the weights' dtype, not the setting: "auto" resolves at load."""
    settings = tiny_settings(dtype="auto")
    with TestClient(create_app(settings, loaded)) as client:
        assert client.get("/info").json()["model_dtype"] == "float32"  # the tiny model's weights


def test_top_n_tokens_gives_each_token_its_most_likely_tokens_whole_and_streamed(client):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True, "top_n_tokens": 3}}
    details = client.post("/generate", json=body).json()["details"]
    assert len(details["top_tokens"]) == len(details["tokens"]) == 6
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        # greedy: the token is the most likely one (its text on its own: a token holding part of a
        # character adds "" to the text, and alone decodes to U+FFFD)
        assert len(top) == 3 and (top[0]["id"], top[0]["logprob"]) == (token["id"], token["logprob"])
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
    events = [json.loads(line[5:]) for line in client.post("/generate_stream", json=body).text.splitlines()
              if line.startswith("data:")]
    assert [e["top_tokens"] for e in events] == details["top_tokens"]
    plain = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True}}
    assert "top_tokens" not in client.post("/generate", json=plain).json()["details"]  # TGI's: unless asked


def test_best_of_returns_the_sample_of_highest_mean_logprob_and_lists_the_others(client):
    body = generate(client, max_new_tokens=8, do_sample=True, best_of=3, details=True).json()
    details = body["details"]
    others = details["best_of_sequences"]
    assert len(others) == 2
    assert len({details["seed"], *(o["seed"] for o in others)}) == 3  # each sample its own seed

    def mean(tokens):
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert all(mean(details["tokens"]) >= mean(o["tokens"]) for o in others)
    assert all(o["generated_text"] and o["generated_tokens"] == len(o["tokens"]) for o in others)
    # without best_of, or without details, no best_of_sequences
    assert "best_of_sequences" not in generate(client, max_new_tokens=4, do_sample=True, details=True).json()[
        "details"]
    assert set(generate(client, max_new_tokens=4, do_sample=True, best_of=2).json()) == {"generated_text"}
    # TGI's refusal when streaming
    response = client.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"best_of": 2,
                                                                                     "do_sample": True}})
    assert response.status_code == 422 and "best_of" in response.json()["error"]
    assert client.get("/info").json()["max_best_of"] == 8
