"""OpenAI's Responses API (POST /v1/responses): the `openai` SDK's `client.responses` against a real
server on a loopback port; each request is the chat completion it stands for."""

import json
from types import SimpleNamespace

import openai
import pytest

from server.app import create_app
from server.responses import MessageItem, ResponseBody, ResponseStore, Stored
from tests.server.support import save_tiny_heads, serve, tiny_settings
from tests.server.test_openai_tools import LIMITS, TOOLS, arguments_follow_their_tools_schema

QUESTION = "What is the capital?"


@pytest.fixture(scope="module")
def sdk(loaded, tmp_path_factory):
    heads = save_tiny_heads(tmp_path_factory.mktemp("heads"), loaded)
    with serve(create_app(tiny_settings(**LIMITS, medusa_heads=heads, tree="cpu"), loaded)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def chat(sdk, **kwargs):
    return sdk.chat.completions.create(model="m", temperature=0, **kwargs)


@pytest.mark.parametrize("max_output_tokens", [6, 200])
def test_a_response_is_the_chat_completion_it_stands_for(sdk, max_output_tokens):
    response = sdk.responses.create(model="m", input=QUESTION, instructions="Be brief.", temperature=0,
                                    max_output_tokens=max_output_tokens)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    expected = chat(sdk, messages=messages, max_tokens=max_output_tokens)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == expected.choices[0].message.content
    assert response.usage.input_tokens == expected.usage.prompt_tokens
    assert response.usage.output_tokens == expected.usage.completion_tokens
    cut = expected.choices[0].finish_reason == "length"
    assert response.status == ("incomplete" if cut else "completed")
    assert (response.incomplete_details is not None) == cut
    assert response.model_extra["medusa"]["steps"] >= 1  # the extension, as on the chat route


def test_a_streamed_response_sends_its_text_in_deltas_and_ends_with_the_whole(sdk):
    whole = sdk.responses.create(model="m", input=QUESTION, temperature=0, max_output_tokens=24)
    events = list(sdk.responses.create(model="m", input=QUESTION, temperature=0, max_output_tokens=24,
                                       stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 24


def test_function_tools_are_called_and_an_agents_loop_replayed(sdk):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    response = sdk.responses.create(model="m", input=[{"role": "user", "content": "Weather in Paris?"}],
                                    tools=tools, tool_choice="required", temperature=0, max_output_tokens=60,
                                    parallel_tool_calls=False)
    (call,) = response.output
    assert call.type == "function_call" and call.call_id.startswith("call_")
    arguments_follow_their_tools_schema(SimpleNamespace(function=call))  # name and arguments at the top
    arguments = '{"city": "Paris"}'
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": arguments},
               {"type": "function_call_output", "call_id": "c1", "output": "Sunny"}]
    again = sdk.responses.create(model="m", input=history, tools=tools, temperature=0, max_output_tokens=4)
    expected = chat(sdk, tools=TOOLS, max_tokens=4, messages=[
        history[0], {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"}])
    assert again.usage.input_tokens == expected.usage.prompt_tokens


def test_under_tools_an_answer_streams_and_a_call_comes_whole(sdk):
    """With one tool, `oboe`, the tiny model's greedy reply under "auto" is an answer (with 14 other
    names tried it called the tool): its text streams as it is written. Required, it calls the tool."""
    tools = [{"type": "function", "name": "oboe"}]

    def create(**kwargs):
        return sdk.responses.create(model="m", input="Weather in Paris?", tools=tools, temperature=0,
                                    max_output_tokens=60, **kwargs)

    whole = create()
    events = list(create(stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 5 and "".join(deltas) == whole.output_text == events[-1].response.output_text
    assert whole.output[0].type == "message" and not whole.output_text.startswith("{")
    required = create(stream=True, tool_choice="required")
    added = [e.item for e in required if e.type == "response.output_item.added"]
    assert [(item.type, item.name, item.arguments) for item in added] == [("function_call", "oboe", "{}")]


def test_a_chats_prediction_is_drafted_from(sdk):
    """OpenAI's Predicted Outputs on /v1/chat/completions: the same reply, in fewer steps, when the
    prediction is most of it (here the reply itself, one word changed)."""
    messages = [{"role": "user", "content": QUESTION}]
    plain = chat(sdk, messages=messages, max_tokens=40)
    text = plain.choices[0].message.content
    edited = text[:len(text) // 2] + " edited " + text[len(text) // 2:]
    predicted = chat(sdk, messages=messages, max_tokens=40, prediction={"type": "content", "content": edited})
    assert predicted.choices[0].message.content == text
    steps = [reply.model_extra["medusa"]["steps"] for reply in (plain, predicted)]
    assert steps[1] < 0.8 * steps[0], steps  # 25 against 38: a 4-token lookup branch (tree "cpu")


def test_a_text_format_gives_json_of_its_schema(sdk):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "answer", "schema": schema}}
    response = sdk.responses.create(model="m", input=QUESTION, temperature=0, max_output_tokens=40, text=text)
    assert set(json.loads(response.output_text)) == {"ok"}


@pytest.mark.parametrize("change, param, message", [
    ({"background": True}, "background", "background"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "reasoning"),
    ({"input": []}, "input", "non-empty"),
    ({"tools": [{"type": "function", "name": "w"}], "tool_choice": {"type": "function", "name": "nope"}},
     None, "no tool is named 'nope'"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}}, "text.format",
     "objectx"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than 0"),
    ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"truncation": "auto"}, "truncation", "not supported"),
    ({"tools": [{"type": "function", "name": "two words"}]}, "tools.0.name", "pattern"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "input items"),
])
def test_what_cannot_be_answered_is_400(sdk, change, param, message):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model="m", **({"input": QUESTION} | change))
    assert refused.value.body["param"] == param and message in refused.value.body["message"]


def test_a_stored_response_is_continued_as_the_conversation_sent_whole(sdk):
    """previous_response_id: the new input follows the stored conversation (the earlier instructions
    are not carried over, as OpenAI's), with the reply and input tokens of that conversation sent
    whole, and the prefix cache holds the stored part; streamed responses are stored too."""
    first = sdk.responses.create(model="m", input=QUESTION, instructions="Be brief.", temperature=0,
                                 max_output_tokens=8)
    assert first.store is True and first.previous_response_id is None
    follow = {"input": "And why?", "temperature": 0, "max_output_tokens": 8}
    second = sdk.responses.create(model="m", previous_response_id=first.id, **follow)
    whole = sdk.responses.create(model="m", temperature=0, max_output_tokens=8, input=[
        {"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And why?"}])
    assert second.previous_response_id == first.id and second.output_text == whole.output_text
    assert second.usage.input_tokens == whole.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0

    events = list(sdk.responses.create(model="m", previous_response_id=second.id, stream=True, **follow))
    streamed = events[-1].response
    third = sdk.responses.create(model="m", previous_response_id=streamed.id, **follow)
    assert third.usage.input_tokens > streamed.usage.input_tokens > second.usage.input_tokens


def test_a_call_and_its_output_continue_a_stored_response(sdk):
    tools = [{"type": "function", **t["function"]} for t in TOOLS]
    kwargs = {"model": "m", "tools": tools, "temperature": 0, "max_output_tokens": 60}
    called = sdk.responses.create(input="Weather in Paris?", tool_choice="required",
                                  parallel_tool_calls=False, **kwargs)
    (call,) = called.output
    answered = sdk.responses.create(previous_response_id=called.id, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}], **kwargs)
    whole = sdk.responses.create(input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}], **kwargs)
    assert answered.usage.input_tokens == whole.usage.input_tokens
    assert [o.type for o in answered.output] == [o.type for o in whole.output]


def test_an_unknown_or_unstored_previous_response_is_404(sdk):
    unstored = sdk.responses.create(model="m", input=QUESTION, max_output_tokens=2, store=False)
    assert unstored.store is False
    for response_id in ("resp_nowhere", unstored.id):
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.responses.create(model="m", input="And?", previous_response_id=response_id)
        assert missing.value.body["param"] == "previous_response_id"
        assert response_id in missing.value.body["message"]


def test_the_store_keeps_the_last_responses_used():
    def stored(i: int) -> Stored:
        response = ResponseBody(id=f"resp_{i}", created_at=0, model="m", status="completed")
        return Stored(response, [MessageItem(role="user", content=str(i))])

    store = ResponseStore(size=2)
    for i in range(3):
        store.put(stored(i))
    assert store.get("resp_0") is None and store.get("resp_1") is not None
    store.put(stored(3))
    assert store.get("resp_2") is None and store.get("resp_1") is not None  # read last: kept


def test_a_stored_response_is_retrieved_and_deleted(sdk):
    created = sdk.responses.create(model="m", input=QUESTION, temperature=0, max_output_tokens=4)
    retrieved = sdk.responses.retrieve(created.id)
    assert retrieved.model_dump() == created.model_dump()
    sdk.responses.delete(created.id)
    for call in (sdk.responses.retrieve, sdk.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="m", input="And?", previous_response_id=created.id)
