"""OpenAI's Responses API, POST /v1/responses (what the `openai` SDK's `client.responses.create` and
agent frameworks built on it send).

A request becomes the chat completion it stands for (`instructions` the system message, `input` the
messages, an earlier `function_call` an assistant's call and its `function_call_output` the tool's
message, function `tools` a chat's tools, `text.format` a response format), which takes the chat
route's path (`openai_routes.prepare`: limits, grammar, the scheduler). Its reply becomes output
items: a `message` of `output_text`, or `function_call`s.

Unless `store` is false, a response's conversation (its input items, those of the response it
continued, and its output) is kept in memory (`ResponseStore`: the last STORED of this process, so
a replica knows its own), and a request naming it as `previous_response_id` continues it: its input
follows that conversation, which the prefix cache then holds. As OpenAI's, the earlier
`instructions` and tools are not carried over. GET and DELETE /v1/responses/{id} read and forget a
stored response. An id the store does not hold is a 404.

Streaming: OpenAI's events (`response.created`, `response.in_progress`, the message's
`output_item.added` / `content_part.added`, one `response.output_text.delta` per engine step, their
`.done` events, `response.completed` or `response.incomplete`), each with its `sequence_number`. With
tools a call comes whole at the end and an answer as it is written, as on /v1/chat/completions.
"""

from __future__ import annotations

import dataclasses
import typing
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from server.openai_protocol import (
    Body,
    ChatCompletionRequest,
    ChatMessageOut,
    Empty,
    OpenAIErrorResponse,
    PromptTokensDetails,
    Usage,
    openai_error,
    refused,
)
from server.openai_routes import ERROR_RESPONSES, EVENT_STREAM, Reply, merged, prepare, visible
from server.protocol import Speculation, Text, described_when_invalid, strict_bool
from server.scheduler import RequestFailed, RequestStream
from server.service import Generation, Service, generate, submit_all
from server.validation import InputError, Job

responses_router = APIRouter(prefix="/v1", tags=["OpenAI"])
RENAMED = {"response_format": "text.format", "max_tokens": "max_output_tokens"}  # chat's field -> ours
STORED = 1024  # responses whose conversations a process keeps


# ---------------------------------------------------------------- requests

class InputText(Body):
    type: Literal["input_text", "output_text"]  # an assistant's earlier turn holds output_text
    text: str


class MessageItem(Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str  # JSON text


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem


class FunctionTool(Body):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class FunctionChoice(Body):
    type: Literal["function"]
    name: str


class TextFormatText(Body):
    type: Literal["text"]


class TextFormatJsonObject(Body):
    type: Literal["json_object"]


class TextFormatJsonSchema(Body):
    type: Literal["json_schema"]
    name: str
    schema_: dict = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(Body):
    format: Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema,
                      Field(discriminator="type")] | None = None


class ResponseRequest(Body):
    model: str | None = None
    input: Text | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="must be a non-empty text or a non-empty list of input items (messages, function_call, "
                    "function_call_output)")
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool | None = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None  # None: true, as OpenAI's
    text: TextConfig | None = None
    store: bool | None = None  # None: true, as OpenAI's
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    background: Annotated[Literal[False], BeforeValidator(strict_bool)] | None = refused(
        "only false or null: background responses are")
    reasoning: None = refused("only null: reasoning settings are")
    include: Empty | None = refused("only null or []: more output (logprobs, sources) is")
    truncation: Literal["disabled"] | None = refused("only 'disabled' or null: 'auto' truncation (the "
                                                      "conversation's start dropped to fit) is")

    _described = described_when_invalid("background", "reasoning", "input", "include", "truncation")

    @property
    def items(self) -> list[InputItem]:
        """The input as items (a text is a user's message)."""
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def as_chat(self, earlier: list[InputItem] = ()) -> ChatCompletionRequest:
        """The chat completion this request stands for, after the `earlier` items of the conversation it
        continues (InputError where it is malformed as one)."""
        messages: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        for item in [*earlier, *self.items]:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                    messages[-1]["tool_calls"].append(call)  # calls made together: one turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        chat = {"messages": messages, "max_tokens": self.max_output_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "stream": self.stream, "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools:
            functions = [t.model_dump(exclude={"type"}, exclude_none=True) for t in self.tools]
            chat["tools"] = [{"type": "function", "function": f} for f in functions]
        if self.tool_choice is not None:
            chat["tool_choice"] = self.tool_choice if isinstance(self.tool_choice, str) else {
                "type": "function", "function": {"name": self.tool_choice.name}}
        if self.text is not None and self.text.format is not None:
            f = self.text.format
            chat["response_format"] = {"type": f.type} if not isinstance(f, TextFormatJsonSchema) else {
                "type": "json_schema", "json_schema": {"name": f.name, "schema": f.schema_}}
        try:
            return ChatCompletionRequest.model_validate(chat)
        except ValidationError as e:
            error = e.errors()[0]
            where = ".".join(map(str, error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            raise InputError(f"{where}: {message}" if where else message) from None


# ---------------------------------------------------------------- responses

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list = []


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class FunctionCallOutput(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["completed"] = "completed"


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict = {"cached_tokens": 0}
    output_tokens_details: dict = {"reasoning_tokens": 0}


class ResponseBody(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    model: str
    status: Literal["in_progress", "completed", "incomplete"]
    incomplete_details: dict | None = None  # {"reason": "max_output_tokens"}
    error: None = None
    instructions: str | None = None
    output: list[OutputMessage | FunctionCallOutput] = []
    parallel_tool_calls: bool = False
    tool_choice: str | dict = "auto"
    tools: list[dict] = []
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    previous_response_id: str | None = None
    store: bool = True
    usage: ResponseUsage | None = None
    medusa: Speculation | None = None  # extension: the request's speculation figures, as on /v1/chat


class LifecycleEvent(BaseModel):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    sequence_number: int
    response: ResponseBody


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputMessage | FunctionCallOutput


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list = []


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list = []


class ErrorEvent(BaseModel):
    type: Literal["error"]
    sequence_number: int
    code: str | None
    message: str
    param: str | None = None


StreamEvent = (LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent
               | ErrorEvent)
EVENTS = {kind: event for event in typing.get_args(StreamEvent)
          for kind in typing.get_args(event.model_fields["type"].annotation)}


def output_items(message: ChatMessageOut, finish: str) -> list[OutputMessage | FunctionCallOutput]:
    """A chat reply as the Responses API's output items."""
    if message.tool_calls:
        return [FunctionCallOutput(id=f"fc_{uuid.uuid4().hex}", call_id=c.id, name=c.function.name,
                                   arguments=c.function.arguments) for c in message.tool_calls]
    return [OutputMessage(id=f"msg_{uuid.uuid4().hex}", status=status_of(finish),
                          content=[OutputText(text=message.content or "")])]


@dataclasses.dataclass(frozen=True)
class Stored:
    response: ResponseBody  # as it was returned (GET /v1/responses/{id})
    conversation: list[InputItem]  # the input items that continue it (`ResponseRequest.as_chat`'s `earlier`)


class ResponseStore:
    """The last `size` stored responses, by id, the least recently used dropped first."""

    def __init__(self, size: int = STORED) -> None:
        self.size = size
        self._stored: OrderedDict[str, Stored] = OrderedDict()

    def get(self, response_id: str) -> Stored | None:
        stored = self._stored.get(response_id)
        if stored is not None:
            self._stored.move_to_end(response_id)
        return stored

    def put(self, stored: Stored) -> None:
        self._stored[stored.response.id] = stored
        while len(self._stored) > self.size:
            self._stored.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._stored.pop(response_id, None) is not None

    def keep(self, body: ResponseRequest, earlier: list[InputItem], response: ResponseBody) -> None:
        """Keep a finished response's conversation, unless its request said store: false."""
        if body.store is False:
            return
        said: list[InputItem] = []
        for out in response.output:
            if isinstance(out, OutputMessage):
                said.append(MessageItem(role="assistant", content="".join(part.text for part in out.content)))
            else:
                said.append(FunctionCallItem(type="function_call", call_id=out.call_id, name=out.name,
                                             arguments=out.arguments))
        self.put(Stored(response, [*earlier, *body.items, *said]))


def status_of(finish: str) -> Literal["completed", "incomplete"]:
    """A response's status from its OpenAI finish_reason: cut by max_output_tokens, incomplete."""
    return "incomplete" if finish == "length" else "completed"


def usage_of(job: Job, generation: Generation) -> Usage:
    return Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=len(generation.tokens),
                 total_tokens=len(job.prompt_ids) + len(generation.tokens),
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=generation.cached_tokens))


def response_of(body: ResponseRequest, reply: Reply, status: str, output: list, usage: Usage | None = None,
                medusa: Speculation | None = None) -> ResponseBody:
    tool_choice = body.tool_choice or ("auto" if body.tools else "none")
    return ResponseBody(
        id=reply.id, created_at=reply.created, model=reply.model, status=status,
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        instructions=body.instructions, output=output,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        tool_choice=tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump(),
        tools=[t.model_dump(exclude_none=True) for t in body.tools or []], temperature=body.temperature,
        top_p=body.top_p, max_output_tokens=body.max_output_tokens, metadata=body.metadata,
        previous_response_id=body.previous_response_id, store=body.store is not False,
        usage=None if usage is None else ResponseUsage(
            input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details={"cached_tokens": usage.prompt_tokens_details.cached_tokens}),
        medusa=medusa)


NOT_STORED = {"model": OpenAIErrorResponse,
              "description": "No stored response has that id ('invalid_request_error')"}


def not_stored(response_id: str, param: str | None = None) -> Response:
    return openai_error(404, f"Response with id '{response_id}' not found: it was stored with store false, "
                        "by another replica, or too long ago", "validation", param=param)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: Literal[True] = True


@responses_router.post("/responses", response_model=ResponseBody,
                       responses={200: EVENT_STREAM, **ERROR_RESPONSES, 404: NOT_STORED})
async def responses(body: ResponseRequest, request: Request) -> Response:
    """OpenAI's Responses API: one reply to `input`, through the chat route's path."""
    service: Service = request.app.state.service
    store: ResponseStore = request.app.state.responses
    earlier: list[InputItem] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            return not_stored(body.previous_response_id, "previous_response_id")
        earlier = previous.conversation
    chat = body.as_chat(earlier)
    reply = dataclasses.replace(Reply.of(service, chat), id=f"resp_{uuid.uuid4().hex}")
    try:
        jobs = await prepare(service, chat)
    except InputError as e:  # named as the chat request names it
        if e.param not in RENAMED:
            raise
        raise InputError(str(e).replace(f"`{e.param}`", f"`{RENAMED[e.param]}`"), RENAMED[e.param]) from e
    if body.stream:
        streams = submit_all(service, jobs)  # before the response starts, so that 429 is a real status
        return StreamingResponse(events(service, body, reply, jobs[0], streams[0], store.keep, earlier),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    (generation,), headers = await generate(service, jobs, request)
    message, finish = reply.message(generation.text(jobs[0]), generation.finish_reason)
    response = response_of(body, reply, status_of(finish), output_items(message, finish),
                           usage_of(jobs[0], generation), generation.speculation)
    store.keep(body, earlier, response)
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


@responses_router.get("/responses/{response_id}", response_model=ResponseBody, responses={404: NOT_STORED})
async def retrieve(response_id: str, request: Request) -> Response:
    """A stored response, as it was returned."""
    stored = request.app.state.responses.get(response_id)
    if stored is None:
        return not_stored(response_id)
    return JSONResponse(stored.response.model_dump(mode="json"))


@responses_router.delete("/responses/{response_id}", response_model=DeletedResponse,
                         responses={404: NOT_STORED})
async def delete(response_id: str, request: Request) -> Response:
    """Forget a stored response (what continued from it stays)."""
    if not request.app.state.responses.delete(response_id):
        return not_stored(response_id)
    return JSONResponse(DeletedResponse(id=response_id).model_dump())


async def events(service: Service, body: ResponseRequest, reply: Reply, job: Job, stream: RequestStream,
                 keep: Callable, earlier: list[InputItem]) -> AsyncIterator[str]:
    """The stream of one response, its events numbered in order; `keep` stores it once complete."""
    sequence = iter(range(1 << 62))

    def event(kind: str, **fields) -> str:
        data = EVENTS[kind](type=kind, sequence_number=next(sequence), **fields)
        return f"event: {kind}\ndata: {data.model_dump_json()}\n\n"

    generation = service.generation()
    started = response_of(body, reply, "in_progress", [])
    item = OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[])
    where = {"item_id": item.id, "output_index": 0, "content_index": 0}
    raw, sent = "", None  # the text written; how much of the message's text is sent (None: not begun)

    def send(text: str) -> list[str]:
        """The events that send the message's text up to `text`'s end: the message item and its text
        part opened first, where they are not yet."""
        nonlocal sent
        out = []
        if sent is None:
            out += [event("response.output_item.added", output_index=0, item=item),
                    event("response.content_part.added", **where, part=OutputText(text=""))]
            sent = 0
        if len(text) > sent:
            out.append(event("response.output_text.delta", **where, delta=text[sent:]))
            sent = len(text)
        return out
    try:
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        async for _, emitted in merged([stream]):
            raw += "".join(t.text for t, _ in visible(generation, generation.add(emitted)))
            if emitted.finish_reason is not None:
                raw += generation.decoder.flush()
            # the message's text so far: all of it without tools; with them, an answer's once known
            answer = raw if reply.tools is None else reply.tools.answer_so_far(raw)
            for sending in [] if answer is None else send(answer):
                yield sending
        message, finish = reply.message(raw, generation.finish_reason)
        status = status_of(finish)
        if message.tool_calls:
            output = output_items(message, finish)
            for index, out in enumerate(output):
                yield event("response.output_item.added", output_index=index, item=out)
                yield event("response.output_item.done", output_index=index, item=out)
        else:  # a message: the rest of its text (a call cut short comes as its text, as on /v1/chat)
            text = message.content or ""
            for sending in send(text):
                yield sending
            done = OutputText(text=text)
            item = OutputMessage(id=item.id, status=status, content=[done])
            yield event("response.output_text.done", **where, text=text)
            yield event("response.content_part.done", **where, part=done)
            yield event("response.output_item.done", output_index=0, item=item)
            output = [item]
        final = response_of(body, reply, status, output, usage_of(job, generation), generation.speculation)
        keep(body, earlier, final)
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
    except RequestFailed as e:
        yield event("error", code=e.error_type, message=str(e), param=None)
    finally:
        stream.cancel()  # the client went away mid-stream, or generation failed: free the slot


