"""The OpenAI-compatible routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

A request takes the TGI routes' path (`Service.prepare` -> the scheduler -> `Generation`), so the
limits, deadlines, cancellation on disconnect and metrics are the same; only the body going in and
the bodies coming out differ (`server.openai_protocol`). A chat's messages go through the model's
chat template; a completion's prompt is tokenized as it is.

Several choices (`n`, a list of prompts) are requests of their own to the engine, run side by side
(continuous batching takes them together) and answered together; a refusal or failure of one ends all.

Streaming: one `data: {chunk}` event per engine step of a choice (several tokens under speculation),
the choice's `index` in it, its last one with its finish_reason and `medusa` figures (with tools, a
call comes whole in that last one, an answer's content as it is written); then a usage
chunk when `stream_options.include_usage`, then `data: [DONE]`. A stop sequence is not sent: text that
could begin one is held back until the next step shows whether it does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError

from medusa.engine import Emitted
from runtime.prompt import PromptError
from server.openai_protocol import (
    DEFAULT_COMPLETION_TOKENS,
    FINISH_REASONS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    GrammarFormat,
    JsonObjectFormat,
    JsonSchemaFormat,
    Model,
    ModelList,
    OpenAIErrorResponse,
    PromptTokensDetails,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
    openai_error,
)
from server.protocol import GenerateRequest, Grammar, Parameters, PrefillToken, Token, event_stream
from server.scheduler import RequestFailed, RequestStream
from server.service import Generation, Service, generate, speculation_of, submit_all
from server.tools import Tools, conversation
from server.validation import GrammarRefused, InputError, Job

ERROR_RESPONSES = {status: {"model": OpenAIErrorResponse, "description": text} for status, text in {
    400: "A malformed body, a parameter out of range or not supported, or a prompt over the server's limits "
         "(type 'invalid_request_error')",
    413: "Request body over the server's size limit ('invalid_request_error')",
    424: "Generation failed in the model ('server_error')",
    429: "The queue is full; retry after the retry-after header's seconds ('rate_limit_error')",
    503: "The server is unhealthy or shutting down ('server_error')",
    504: "The request's deadline passed before its last token ('timeout_error')",
}.items()}
EVENT_STREAM = event_stream(
    "With `stream`: Server-Sent Events, `data: {chunk}` per step, then `data: [DONE]`; "
    "`data: {\"error\": ...}` when generation fails mid-stream")

openai_router = APIRouter(prefix="/v1", tags=["OpenAI"])


@dataclass(frozen=True)
class Reply:
    """What every chunk and body of one response repeats, and how its text is made."""

    id: str
    created: int
    model: str
    chat: bool
    stops: list[str]
    logprobs: bool
    top_n: int  # the most likely tokens reported beside each token
    tools: Tools | None  # a chat's tools: its text is the JSON of a call (or of an answer), held to the end

    @classmethod
    def of(cls, service: Service, body: ChatCompletionRequest | CompletionRequest) -> Reply:
        chat = isinstance(body, ChatCompletionRequest)
        return cls(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                   model=service.loaded.model_id, chat=chat, stops=body.stops,
                   logprobs=body.logprobs is not None and body.logprobs is not False, top_n=body.top_n,
                   tools=Tools.of(body) if chat else None)

    def message(self, text: str, finish_reason: str) -> tuple[ChatMessageOut, str]:
        """A chat choice's message and OpenAI finish_reason, from its whole text and TGI finish_reason."""
        message, finish = (self.tools.reply(text) if self.tools is not None else None) or (
            ChatMessageOut(content=text), None)
        return message, finish or FINISH_REASONS[finish_reason]

    def body(self, choices: list[tuple[str, list[Scored], str]], usage: Usage, medusa
             ) -> ChatCompletion | Completion:
        """The whole response: each choice's (text, scored tokens, finish_reason), in index order."""
        head = {"id": self.id, "created": self.created, "model": self.model, "usage": usage, "medusa": medusa}
        if self.chat:
            chat_choices = []
            for i, (text, tokens, end) in enumerate(choices):
                message, finish = self.message(text, end)
                chat_choices.append(ChatChoice(index=i, message=message, finish_reason=finish,
                                               logprobs=self.chat_logprobs(tokens)))
            return ChatCompletion(**head, choices=chat_choices)
        return Completion(**head, choices=[
            CompletionChoice(index=i, text=text, finish_reason=FINISH_REASONS[end],
                             logprobs=self.completion_logprobs(tokens))
            for i, (text, tokens, end) in enumerate(choices)])

    def chunk(self, index: int, text: str | None, tokens: list[Scored], finish_reason: str | None = None, *,
              role: bool = False, medusa=None, offset: int = 0) -> str:
        """One SSE event of choice `index` (`offset`: the length of the choice's text sent before: with
        tools, of the answer's content). With tools, the last event's `text` is the choice's whole
        text: its call, or the rest of its answer."""
        finish = FINISH_REASONS[finish_reason] if finish_reason else None
        if self.chat:
            delta = ChatDelta(role="assistant" if role else None, content=text)
            if finish_reason and self.tools is not None:
                message, finish = self.message(text or "", finish_reason)
                calls = [ToolCallDelta(index=k, **c.model_dump())
                         for k, c in enumerate(message.tool_calls or [])]
                rest = None if message.content is None else message.content[offset:]
                delta = ChatDelta(content=rest, tool_calls=calls or None)
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                                     logprobs=self.chat_logprobs(tokens))
            chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice],
                                        medusa=medusa)
        else:
            choice = CompletionChoice(index=index, text=text or "", finish_reason=finish,
                                      logprobs=self.completion_logprobs(tokens, offset))
            chunk = Completion(id=self.id, created=self.created, model=self.model, choices=[choice],
                               medusa=medusa)
        return f"data: {chunk.model_dump_json()}\n\n"

    def usage_chunk(self, usage: Usage) -> str:
        """The stream's usage chunk, with no choices."""
        kind = ChatCompletionChunk if self.chat else Completion
        chunk = kind(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)
        return f"data: {chunk.model_dump_json()}\n\n"

    def chat_logprobs(self, tokens: list[Scored]) -> ChoiceLogprobs | None:
        if not self.logprobs or not tokens:
            return None
        def scored(t: Token | PrefillToken) -> dict:
            return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}

        return ChoiceLogprobs(content=[
            TokenLogprob(**scored(t), top_logprobs=[TopLogprob(**scored(a)) for a in top or []])
            for t, top in tokens])

    def completion_logprobs(self, tokens: list[Scored], start: int = 0) -> CompletionLogprobs | None:
        """The tokens' logprobs, each token's text_offset in the choice's text (`start`: the offset of
        the first: a stream's text sent before it), and with logprobs > 0 the most likely tokens."""
        if not self.logprobs or not tokens:
            return None
        offsets, offset = [], start
        for t, _ in tokens:
            offsets.append(offset)
            offset += len(t.text)
        # text -> logprob: where two tokens have one text (parts of characters), the likelier one's
        top = [None if alternatives is None else {a.text: a.logprob for a in reversed(alternatives)}
               for _, alternatives in tokens] if self.top_n else None
        return CompletionLogprobs(tokens=[t.text for t, _ in tokens],
                                  token_logprobs=[t.logprob for t, _ in tokens], top_logprobs=top,
                                  text_offset=offsets)


def cut_at_stop(text: str, stops: list[str]) -> str:
    """The text before the first stop sequence in it."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[:min(found)] if found else text


class StopHold:
    """Streamed text with stop sequences held back: what is released never holds, nor ends with the
    start of, a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> str:
        self.pending += text
        if any(stop in self.pending for stop in self.stops):
            return ""  # the engine finishes at this token; `finish` cuts the text
        keep = max((k for stop in self.stops for k in range(1, len(stop))
                    if self.pending.endswith(stop[:k])), default=0)
        cut = len(self.pending) - keep
        released, self.pending = self.pending[:cut], self.pending[cut:]
        return released

    def finish(self) -> str:
        rest, self.pending = cut_at_stop(self.pending, self.stops), ""
        return rest


def parameters(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> Parameters:
    """OpenAI's sampling semantics in TGI's parameters: temperature 1 unless given, 0 greedy; a
    completion echoed with logprobs has its prompt tokens' logprobs too."""
    temperature = 1.0 if body.temperature is None else body.temperature
    sampled = temperature > 0
    return Parameters(do_sample=sampled, max_new_tokens=max_tokens or DEFAULT_COMPLETION_TOKENS,
                      temperature=temperature if sampled else None,
                      top_p=body.top_p if sampled and body.top_p is not None and body.top_p < 1 else None,
                      top_k=body.top_k if sampled and body.top_k is not None and body.top_k > 0 else None,
                      repetition_penalty=body.repetition_penalty,
                      seed=body.seed if sampled else None, stop=body.stops, ignore_eos=bool(body.ignore_eos),
                      min_new_tokens=body.min_tokens, stop_token_ids=body.stop_token_ids or [],
                      frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                      decoder_input_details=echoed_logprobs(body), top_n_tokens=body.top_n,
                      grammar=grammar[1] if (grammar := grammar_of(body)) else None,
                      prediction=body.prediction.text() if getattr(body, "prediction", None) else None)


def grammar_of(body: ChatCompletionRequest | CompletionRequest) -> tuple[str, Grammar] | None:
    """The request's grammar as TGI's, and the field it came from: a chat's tools (the JSON of a call,
    `server.tools`) or response format (any JSON object, the schema given, or TGI's grammar), or
    vLLM's guided_json, guided_regex or guided_choice (one of the texts)."""
    if isinstance(body, ChatCompletionRequest):
        if (tools := Tools.of(body)) is not None:
            return "tools", Grammar(type="json", value=tools.schema())
        response_format = body.response_format
        if isinstance(response_format, JsonObjectFormat):
            return "response_format", Grammar(type="json", value={"type": "object"})
        if isinstance(response_format, JsonSchemaFormat):
            return "response_format", Grammar(type="json", value=response_format.json_schema.schema_)
        if isinstance(response_format, GrammarFormat):  # TGI's own
            return "response_format", Grammar(type=response_format.type, value=response_format.value)
    if body.guided_json is not None:
        return "guided_json", Grammar(type="json", value=body.guided_json)
    if body.guided_regex is not None:
        return "guided_regex", Grammar(type="regex", value=body.guided_regex)
    if body.guided_choice is not None:
        return "guided_choice", Grammar(type="regex", value="|".join(map(_literal, body.guided_choice)))
    return None


def _literal(text: str) -> str:
    """A regular expression (llguidance's syntax) matching `text` alone."""
    return "".join(f"\\{c}" if c in r"\.+*?()|[]{}^$#&-~" else c for c in text)


def echoed_logprobs(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return isinstance(body, CompletionRequest) and bool(body.echo) and body.logprobs is not None


def chat_encoder(service: Service, body: ChatCompletionRequest):
    """The prompt ids of the chat's messages (and tools) in the model's chat template (PromptError when it
    cannot be built)."""
    tokenizer = service.tokenizer

    def encode(_text: str, _truncate: int | None) -> list[int]:
        if not tokenizer.chat_template:
            raise PromptError("the model has no chat template: use /v1/completions")
        messages = conversation(body.messages, Tools.of(body))
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            raise PromptError(f"`messages`: the model's chat template refuses them: {e}") from e
        return tokenizer.encode(rendered, add_special_tokens=False)

    return encode


def completion_encoder(service: Service, prompt: str | list[int]):
    """The prompt's ids: a text tokenized as it is, token ids taken as they are."""
    def encode(text: str, _truncate: int | None) -> list[int]:
        return service.tokenizer.encode(text) if isinstance(prompt, str) else list(prompt)

    return encode


def prompt_text(service: Service, prompt: str | list[int]) -> str:
    """The prompt as text: token ids decoded (InputError for one outside the vocabulary)."""
    if isinstance(prompt, str):
        return prompt
    service.in_vocabulary(prompt, "prompt")
    return service.tokenizer.decode(prompt)


async def prepare(service: Service, body: ChatCompletionRequest | CompletionRequest) -> list[Job]:
    """The request's choices, in index order: `candidates` (n, or a completion's best_of) for each
    prompt, choice j of a sampled prompt with its seed + j (so that they differ, and each is
    reproducible)."""
    chat = isinstance(body, ChatCompletionRequest)
    max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    bias = tuple((int(token), bias) for token, bias in (body.logit_bias or {}).items())
    service.in_vocabulary([t for t, _ in bias], "logit_bias")
    jobs = []
    for prompt in body.prompts:
        encode = chat_encoder(service, body) if chat else completion_encoder(service, prompt)
        # a chat's messages' text stands for the prompt in the length check before tokenizing (the
        # rendered template holds all of it); token ids, their text (for echo)
        request = GenerateRequest.model_construct(inputs=prompt_text(service, prompt),
                                                  parameters=parameters(body, max_tokens), stream=False)
        # a chat without max_tokens may use what the context leaves, as OpenAI's does
        try:
            job = await service.prepare(request, stream=bool(body.stream), encode=encode,
                                        fill_context=chat and max_tokens is None)
        except GrammarRefused as e:  # named by the field it came from
            field = grammar_of(body)[0]
            raise InputError(f"`{field}`: {e.reason}", param=field) from e
        jobs.append(dataclasses.replace(job, params=dataclasses.replace(job.params, logit_bias=bias)))

    def choice(job: Job, j: int) -> Job:
        if j == 0 or job.params.greedy:
            return job
        seed = (job.params.seed + j) % 2**64
        return dataclasses.replace(job, params=dataclasses.replace(job.params, seed=seed))

    n = body.candidates
    service.metrics.requests.inc(len(jobs) * (n - 1))  # each choice counts, as it succeeds or fails alone
    return [choice(job, j) for job in jobs for j in range(n)]


def best(jobs: list[Job], generations: list[Generation], candidates: int, n: int
         ) -> tuple[list[Job], list[Generation]]:
    """Of each prompt's candidates, the n of highest mean logprob (OpenAI's best_of), best first."""
    kept = [i + j for i in range(0, len(jobs), candidates)
            for j in sorted(range(candidates), key=lambda j: -generations[i + j].mean_logprob)[:n]]
    return [jobs[i] for i in kept], [generations[i] for i in kept]


def usage(jobs: list[Job], generations: list[Generation], n: int) -> Usage:
    """OpenAI's usage: each prompt counted once however many choices it has (its first choice's cached
    tokens); every choice's tokens."""
    prompt = sum(len(job.prompt_ids) for job in jobs[::n])
    completion = sum(len(g.tokens) for g in generations)
    cached = sum(g.cached_tokens for g in generations[::n])
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


# a token with its most likely alternatives where they were asked for (None: not asked, or a prompt token)
Scored = tuple[Token | PrefillToken, list[Token] | None]


def visible(generation: Generation, tokens: list[Token]) -> list[Scored]:
    """The tokens that are text (not special), each with its alternatives where they were asked for;
    `tokens`: the generation's last ones."""
    first = len(generation.tokens) - len(tokens)
    tops = generation.top_tokens[first:] if generation.top_tokens else [None] * len(tokens)
    return [(t, top) for t, top in zip(tokens, tops, strict=True) if not t.special]


async def respond(body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
    service: Service = request.app.state.service
    reply = Reply.of(service, body)
    jobs = await prepare(service, body)
    n = body.n or 1
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    if body.stream:
        streams = submit_all(service, jobs)  # before the response starts, so that 429 is a real status
        return StreamingResponse(events(service, reply, jobs, streams, n, include_usage=body.include_usage,
                                        echo=echo),
                                 media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
    generations, headers = await generate(service, jobs, request)
    all_tokens = usage(jobs, generations, body.candidates)  # best_of's candidates count, as OpenAI's do
    if body.candidates > n:
        jobs, generations = best(jobs, generations, body.candidates, n)
    choices = []
    for i, (job, generation) in enumerate(zip(jobs, generations, strict=True)):
        text = generation.text(job)
        if generation.finish_reason == "stop_sequence":
            text = cut_at_stop(text, reply.stops)
        tokens = visible(generation, generation.tokens)
        if echo:
            text = job.inputs + text
            if echoed_logprobs(body):  # the prompt's tokens first, as OpenAI lists them
                prompt = generation.details(job).prefill
                scored = zip(prompt, generation.prefill_top or [None] * len(prompt), strict=True)
                # every token of a prompt of token ids (its text, decoded, holds special ones: a client
                # slices them by its own count); a text's special ones (a BOS) are not in its text
                ids = not isinstance(body.prompts[i // n], str)
                tokens = [(t, top) for t, top in scored if ids or t.id not in service.special_ids] + tokens
        choices.append((text, tokens, generation.finish_reason))
    response = reply.body(choices, all_tokens, speculation_of(generations))
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Emitted]]:
    """(index, Emitted) from every stream as each comes; a stream's failure is raised."""
    if len(streams) == 1:
        async for emitted in streams[0]:
            yield 0, emitted
        return
    queue: asyncio.Queue[tuple[int, Emitted | None, Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for emitted in stream:
                queue.put_nowait((index, emitted, None))
        except Exception as e:  # RequestFailed, for the response to report
            queue.put_nowait((index, None, e))
        queue.put_nowait((index, None, None))

    pumps = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, emitted, error = await queue.get()
            if error is not None:
                raise error
            if emitted is None:
                running -= 1
            else:
                yield index, emitted
    finally:
        for task in pumps:
            task.cancel()


async def events(service: Service, reply: Reply, jobs: list[Job], streams: list[RequestStream], n: int, *,
                 include_usage: bool, echo: bool) -> AsyncIterator[str]:
    """The stream of a response; `echo`: each completion's prompt first, a chunk of its own."""
    generations = [service.generation() for _ in jobs]
    holds = [StopHold(reply.stops) for _ in jobs]
    sent = [0] * len(jobs)  # the length of each choice's text so far: its next token's text_offset
    held = [""] * len(jobs)  # with tools: each choice's text (a call is sent whole at its end)
    try:
        for index, job in enumerate(jobs):
            if reply.chat:
                yield reply.chunk(index, "", [], role=True)
            elif echo:
                yield reply.chunk(index, job.inputs, [])
                sent[index] = len(job.inputs)
        async for index, emitted in merged(streams):
            generation, hold = generations[index], holds[index]
            tokens = visible(generation, generation.add(emitted))
            text = "".join(t.text for t, _ in tokens)
            if emitted.finish_reason is None:
                text = hold.push(text)
                if reply.tools is not None:  # an answer's content as it comes; a call waits for its end
                    held[index] += text
                    answer = reply.tools.answer_so_far(held[index]) or ""
                    text, sent[index] = answer[sent[index]:] or None, max(sent[index], len(answer))
                if text or (reply.logprobs and tokens):
                    yield reply.chunk(index, text, tokens, offset=sent[index])
            else:  # a last character cut short ends the text as U+FFFD, as it ends the whole text
                text = held[index] + hold.push(text + generation.decoder.flush()) + hold.finish()
                yield reply.chunk(index, text, tokens, emitted.finish_reason, medusa=generation.speculation,
                                  offset=sent[index])
            if reply.tools is None:
                sent[index] += sum(len(t.text) for t, _ in tokens)
        if include_usage:
            yield reply.usage_chunk(usage(jobs, generations, n))
        yield "data: [DONE]\n\n"
    except RequestFailed as e:
        error = openai_error(500, str(e), e.error_type)
        yield f"data: {error.body.decode()}\n\n"
    finally:
        for stream in streams:
            stream.cancel()  # the client went away mid-stream, or a choice failed: free the slots


@openai_router.post("/chat/completions", response_model=ChatCompletion,
                    responses={200: EVENT_STREAM, **ERROR_RESPONSES})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    """OpenAI's chat completion: the messages in the model's chat template."""
    return await respond(body, request)


@openai_router.post("/completions", response_model=Completion,
                    responses={200: EVENT_STREAM, **ERROR_RESPONSES})
async def completions(body: CompletionRequest, request: Request) -> Response:
    """OpenAI's (legacy) text completion: the prompt as it is."""
    return await respond(body, request)


@openai_router.get("/models", response_model=ModelList)
async def models(request: Request) -> ModelList:
    """The one model this server serves."""
    service: Service = request.app.state.service
    return ModelList(data=[Model(id=service.loaded.model_id, created=int(service.started))])
