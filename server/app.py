"""The HTTP face: TGI routes over the scheduler.

POST /generate, POST /generate_stream (Server-Sent Events), POST / (TGI's client: `stream` in the
body; a JSON list without streaming), GET /health, GET /info, GET /metrics (Prometheus text, see
`server.metrics`), and FastAPI's /docs.

A request's path: pydantic validates the body (422 naming the field) -> `prepare` tokenizes it
off the event loop and `server.validation` checks the server's limits (422) -> the scheduler
queues it (429 when full) -> Emitted tokens come back through a `RequestStream` -> `Generation`
decodes their text incrementally -> one SSE event per token, or one JSON body at the end.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from medusa.checkpoints import load_heads
from medusa.engine import Emitted, Engine, use_compile
from medusa.tree import get_tree
from runtime.loading import LoadedModel, load_model
from runtime.prompt import Prompter, PromptError
from server.body_limit import BodyLimit
from server.detokenize import IncrementalDecoder
from server.protocol import (
    Details,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    PrefillToken,
    Speculation,
    SpeculationInfo,
    StreamDetails,
    StreamResponse,
    Token,
)
from server.scheduler import QueueFull, RequestFailed, RequestStream, Scheduler, SchedulerUnavailable
from server.settings import Settings
from server.validation import InputError, Job, check_before_tokenizing, validate

log = logging.getLogger(__name__)

try:
    VERSION = version("medusa-serve")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    VERSION = "0.0.0+source"

ERROR_STATUS = {"validation": 422, "overloaded": 429, "generation": 424, "timeout": 504, "unhealthy": 503}
# Every error a generation route answers, as the OpenAPI document declares it.
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "Malformed JSON body (error_type 'validation')",
    413: "Request body over the server's size limit (error_type 'validation')",
    422: "A parameter out of range or not supported, or a prompt over the server's limits ('validation')",
    424: "Generation failed in the model ('generation')",
    429: "The queue is full; retry after the retry-after header's seconds ('overloaded')",
    503: "The server is unhealthy or shutting down ('unhealthy')",
    504: "The request's timeout passed before its last token ('timeout')",
}.items()}
# A streamed 200: Server-Sent Events, each one's data the JSON of a StreamResponse (one event per token)
# or, when generation fails after the stream began, of an ErrorResponse.
EVENT_STREAM = {
    "description": "Server-Sent Events: `data:{StreamResponse}` per token, or `data:{ErrorResponse}`",
    "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"type": "string", "contentMediaType": "application/json"}}}}},
}


def build_engine(settings: Settings, loaded: LoadedModel) -> Engine:
    """The engine for `loaded`, with Medusa heads and their tree when settings name heads, compiled as
    --compile says."""
    heads = tree = None
    if settings.heads_path is not None:
        model = loaded.model
        heads = load_heads(Path(settings.heads_path), model.config, model.lm_head,
                           device=settings.device, dtype=model.embed.weight.dtype)
        tree = get_tree(settings.tree_name)
    return Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, heads=heads, tree=tree,
                  max_batch_size=settings.max_batch_size, max_total_tokens=settings.max_total_tokens,
                  max_speculative_batch=settings.speculative_batch_limit,
                  compile=use_compile(settings.compile, settings.device))


class Generation:
    """One request's tokens as they arrive, with their text decoded incrementally, and the sums of its
    per-step speculation counts (None when the server does not speculate)."""

    def __init__(self, tokenizer, special_ids: frozenset[int], speculative: bool) -> None:
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens: list[Token] = []
        self.prefill_logprobs: list[float | None] | None = None
        self.finish_reason: str | None = None
        self.speculative = speculative
        self.spec_steps = 0
        self.accepted_tokens = 0

    def add(self, emitted: Emitted) -> list[Token]:
        """Record one Emitted; return its tokens, each with the text it adds."""
        new = [Token(id=t, text=self.decoder.push(t), logprob=logprob, special=t in self.special_ids)
               for t, logprob in zip(emitted.token_ids, emitted.logprobs, strict=True)]
        self.tokens += new
        if emitted.prefill_logprobs is not None:
            self.prefill_logprobs = emitted.prefill_logprobs
        self.spec_steps += emitted.speculated
        self.accepted_tokens += emitted.accepted
        self.finish_reason = emitted.finish_reason
        return new

    @property
    def speculation(self) -> Speculation | None:
        if not self.speculative:
            return None
        steps, accepted = self.spec_steps, self.accepted_tokens
        return Speculation(steps=steps, accepted_tokens=accepted,
                           mean_accepted_len=1.0 + accepted / steps if steps else 1.0)

    def text(self, job: Job) -> str:
        """The generated text without special tokens, after the prompt when return_full_text."""
        text = self.tokenizer.decode([t.id for t in self.tokens], skip_special_tokens=True)
        return job.inputs + text if job.return_full_text else text

    def details(self, job: Job) -> Details:
        prefill = []
        if job.prefill_details:
            texts = self.tokenizer.batch_decode([[t] for t in job.prompt_ids], skip_special_tokens=False)
            logprobs = self.prefill_logprobs or [None] * len(job.prompt_ids)
            prefill = [PrefillToken(id=t, text=text, logprob=lp)
                       for t, text, lp in zip(job.prompt_ids, texts, logprobs, strict=True)]
        return Details(finish_reason=self.finish_reason, generated_tokens=len(self.tokens), seed=job.seed,
                       prefill=prefill, tokens=self.tokens, speculation=self.speculation)

    def stream_details(self, job: Job) -> StreamDetails:
        return StreamDetails(finish_reason=self.finish_reason, generated_tokens=len(self.tokens),
                             seed=job.seed, input_length=len(job.prompt_ids), speculation=self.speculation)


class Service:
    """What the routes share: settings, the model's tokenizer and the scheduler."""

    def __init__(self, settings: Settings, loaded: LoadedModel, scheduler: Scheduler) -> None:
        self.settings = settings
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.prompter = Prompter(loaded.tokenizer, settings.use_chat_template)
        self.special_ids = frozenset(loaded.tokenizer.all_special_ids)
        self.scheduler = scheduler
        self.metrics = scheduler.metrics

    async def prepare(self, request: GenerateRequest, *, stream: bool) -> Job:
        """Check what needs no tokens, tokenize off the event loop, then validate against the server's
        limits (InputError: 422)."""
        self.metrics.requests.inc()
        check_before_tokenizing(request, self.prompter.max_token_chars, self.settings, stream=stream)
        try:
            prompt_ids = await asyncio.to_thread(self.prompter.encode, request.inputs,
                                                 request.parameters.truncate)
        except PromptError as e:
            raise InputError(str(e)) from e
        return validate(request, prompt_ids, self.settings)

    def generation(self) -> Generation:
        speculative = self.scheduler.engine.heads is not None
        return Generation(self.tokenizer, self.special_ids, speculative=speculative)

    def submit(self, job: Job) -> RequestStream:
        return self.scheduler.submit(job.prompt_ids, job.params, prompt_logprobs=job.prefill_details,
                                     timeout=job.timeout)

    def info(self) -> Info:
        s, engine = self.settings, self.scheduler.engine
        heads = engine.heads
        return Info(
            model_id=self.loaded.model_id, model_dtype=self.loaded.dtype_name,
            model_device_type=torch.device(s.device).type,
            max_concurrent_requests=s.max_batch_size + s.max_queue, max_input_tokens=s.max_input_tokens,
            max_input_length=s.max_input_tokens, max_total_tokens=s.max_total_tokens,
            max_batch_size=s.max_batch_size, max_queue=s.max_queue, version=VERSION,
            speculation=SpeculationInfo(enabled=heads is not None,
                                        num_heads=heads.config.num_heads if heads is not None else 0,
                                        tree=engine.tree.name if heads is not None else None,
                                        tree_nodes=engine.tree.num_nodes if heads is not None else 1))


# ---------------------------------------------------------------- generation, whole or streamed

class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its response was ready."""


async def cancel_on_disconnect(request: Request, stream: RequestStream) -> None:
    """Wait for the client to go away, then cancel its request: a queued one leaves the queue, a
    running one frees its slot at the next step. (A streaming response does this by itself.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stream.cancel()


async def generate_response(service: Service, job: Job, request: Request
                            ) -> tuple[GenerateResponse, dict[str, str]]:
    start = time.perf_counter()
    stream = service.submit(job)
    generation = service.generation()
    watcher = asyncio.create_task(cancel_on_disconnect(request, stream))
    try:
        async for emitted in stream:
            generation.add(emitted)
    finally:
        watcher.cancel()
        stream.cancel()  # no-op once finished; frees the slot if this handler was cancelled
    if generation.finish_reason is None:
        raise ClientGone()
    response = GenerateResponse(generated_text=generation.text(job),
                                details=generation.details(job) if job.details else None)
    return response, timing_headers(job, generation, stream, start)


def timing_headers(job: Job, generation: Generation, stream: RequestStream, start: float) -> dict[str, str]:
    end = time.perf_counter()
    admitted = stream.admitted_at or end
    inference_ms = (end - admitted) * 1000
    generated = len(generation.tokens)
    return {
        "x-compute-time": f"{end - start:.6f}",
        "x-compute-characters": str(len(job.inputs)),
        "x-total-time": str(round((end - start) * 1000)),
        "x-queue-time": str(round((admitted - stream.queued_at) * 1000)),
        "x-inference-time": str(round(inference_ms)),
        "x-time-per-token": str(round(inference_ms / max(generated, 1))),
        "x-prompt-tokens": str(len(job.prompt_ids)),
        "x-generated-tokens": str(generated),
    }


def sse(event: StreamResponse | ErrorResponse) -> str:
    return f"data:{event.model_dump_json()}\n\n"


async def stream_events(service: Service, job: Job, stream: RequestStream) -> AsyncIterator[str]:
    """One SSE event per generated token; the last one carries generated_text and details."""
    generation = service.generation()
    index = 0
    try:
        async for emitted in stream:
            tokens = generation.add(emitted)
            for i, token in enumerate(tokens):
                index += 1
                last = emitted.finish_reason is not None and i == len(tokens) - 1
                yield sse(StreamResponse(
                    index=index, token=token,
                    generated_text=generation.text(job) if last else None,
                    details=generation.stream_details(job) if last and job.details else None))
    except RequestFailed as e:
        yield sse(ErrorResponse(error=str(e), error_type=e.error_type))
    finally:
        stream.cancel()  # the client went away mid-stream: free the slot at the next step


async def stream_response(service: Service, request: GenerateRequest) -> StreamingResponse:
    job = await service.prepare(request, stream=True)
    stream = service.submit(job)  # before the response starts, so that 429 is a real status
    return StreamingResponse(stream_events(service, job, stream), media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


# ---------------------------------------------------------------- the application

def create_app(settings: Settings, loaded: LoadedModel | None = None, *, engine: Engine | None = None
               ) -> FastAPI:
    """The FastAPI app. Without `loaded`, the model named by settings is loaded at startup.

    `engine` replaces the one built from settings (tests inject engines that fail or stall).
    `app.state.draining`, an Event, is what a SIGTERM handler sets: new requests get 503 and
    /health 503, while the requests already taken run to their end.
    """
    draining = threading.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = loaded or await asyncio.to_thread(load_model, settings.model, settings.device, settings.dtype)
        scheduler = Scheduler(engine or build_engine(settings, model), max_queue=settings.max_queue,
                              max_prefill_tokens=settings.max_prefill_tokens, draining=draining)
        # warms the engine up (every compiled graph) before lifespan startup ends, and so before
        # uvicorn listens; in a worker thread, as it may take minutes
        await asyncio.to_thread(scheduler.start)
        app.state.service = Service(settings, model, scheduler)
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="medusa-serve", version=VERSION, lifespan=lifespan,
                  description="Medusa speculative decoding behind the Text Generation Inference protocol")
    app.state.draining = draining
    app.add_middleware(BodyLimit, limit=settings.payload_limit)
    add_error_handlers(app)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    def service_of(request: Request) -> Service:
        return request.app.state.service

    @app.post("/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """Generate text; `details` adds per-token information."""
        service = service_of(request)
        job = await service.prepare(body, stream=False)
        response, headers = await generate_response(service, job, request)
        return JSONResponse(dump(response), headers=headers)

    @app.post("/generate_stream", response_class=StreamingResponse,
              responses={200: EVENT_STREAM, **ERROR_RESPONSES})
    async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
        """Stream generated tokens as Server-Sent Events, one `data:` event per token."""
        return await stream_response(service_of(request), body)

    @app.post("/", response_model=list[GenerateResponse], responses={200: EVENT_STREAM, **ERROR_RESPONSES})
    async def compat_generate(body: GenerateRequest, request: Request) -> Response:
        """TGI's client route: `stream` in the body picks SSE or a JSON list with one response."""
        service = service_of(request)
        if body.stream:
            return await stream_response(service, body)
        job = await service.prepare(body, stream=False)
        response, headers = await generate_response(service, job, request)
        return JSONResponse([dump(response)], headers=headers)

    @app.get("/health", response_model=Health,
             responses={503: {"model": ErrorResponse, "description": "Unhealthy or shutting down"}})
    async def health(request: Request) -> Response:
        """200 when the model can serve; 503 when it cannot."""
        unhealthy = service_of(request).scheduler.unhealthy
        if unhealthy is not None:
            return error_response(503, unhealthy, "unhealthy")
        if draining.is_set():
            return error_response(503, "the server is shutting down", "unhealthy")
        return JSONResponse(Health(status="ok").model_dump())

    @app.get("/info", response_model=Info)
    async def info(request: Request) -> Info:
        """The served model, the server's limits and its speculation set-up."""
        return service_of(request).info()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        """Prometheus metrics: requests, latencies, batch and KV-slot use, speculation acceptance."""
        return Response(service_of(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


def dump(response: GenerateResponse) -> dict:
    """TGI leaves `details` out when it was not asked for."""
    return response.model_dump(mode="json", exclude={"details"} if response.details is None else None)


# ---------------------------------------------------------------- errors as {"error", "error_type"}

def error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=message, error_type=error_type).model_dump(), status_code=status,
                        headers=headers)


def describe_validation_error(error: dict) -> str:
    """One pydantic/FastAPI error as text that names the field, e.g. 'parameters.top_p: ...'."""
    if error["type"] == "json_invalid":
        return f"malformed JSON body: {error['ctx']['error']} (at character {error['loc'][-1]})"
    field = ".".join(str(part) for part in error["loc"] if part != "body")
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}" if field else f"request body: {message}"


def add_error_handlers(app: FastAPI) -> None:
    """Errors as JSON; refusals before the scheduler took a request are counted here (the scheduler
    counts the failures of the requests it took)."""

    def refused(request: Request, reason: str) -> None:
        request.app.state.service.metrics.failed(reason)

    def unread_body(request: Request) -> None:
        """A body refused before `Service.prepare` counted its request."""
        request.app.state.service.metrics.requests.inc()
        refused(request, "validation")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        unread_body(request)
        errors = exc.errors()
        details = "; ".join(describe_validation_error(e) for e in errors)
        # A body that is not JSON is a 400, as TGI (axum) answers a JSON syntax error; JSON that fails
        # validation is a 422
        status = 400 if any(e["type"] == "json_invalid" for e in errors) else 422
        return error_response(status, f"Input validation error: {details}", "validation")

    @app.exception_handler(InputError)
    async def invalid_input(request: Request, exc: InputError) -> JSONResponse:
        refused(request, "validation")
        return error_response(422, f"Input validation error: {exc}", "validation")

    @app.exception_handler(QueueFull)
    async def overloaded(request: Request, exc: QueueFull) -> JSONResponse:
        refused(request, "overloaded")
        return error_response(429, str(exc), "overloaded", headers={"retry-after": "1"})

    @app.exception_handler(RequestFailed)
    async def failed(request: Request, exc: RequestFailed) -> JSONResponse:
        prefix = "Input validation error: " if exc.error_type == "validation" else ""
        return error_response(ERROR_STATUS[exc.error_type], f"{prefix}{exc}", exc.error_type)

    @app.exception_handler(SchedulerUnavailable)
    async def unavailable(request: Request, exc: SchedulerUnavailable) -> JSONResponse:
        refused(request, "unhealthy")
        return error_response(503, str(exc), "unhealthy")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body as JSON at all (not UTF-8, too deep)
            unread_body(request)
            return error_response(400, f"Input validation error: malformed JSON body: {exc.detail}",
                                  "validation")
        return error_response(exc.status_code, str(exc.detail), "http", headers=exc.headers)
