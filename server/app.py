"""The HTTP face: TGI routes over the scheduler.

POST /generate, POST /generate_stream (Server-Sent Events), POST / (TGI's client: `stream` in the
body; a JSON list without streaming), GET /health, GET /info, GET /metrics (Prometheus text, see
`server.metrics`), FastAPI's /docs, the OpenAI-compatible routes under /v1 (`server.openai_routes`,
which share `server.service` with these and answer errors in OpenAI's shape), and the browser
playground at GET / (`server.playground`).

A request's path: pydantic validates the body (422 naming the field) -> `prepare` tokenizes it
off the event loop and `server.validation` checks the server's limits (422) -> the scheduler
queues it (429 when full) -> Emitted tokens come back through a `RequestStream` -> `Generation`
decodes their text incrementally -> one SSE event per token, or one JSON body at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.routing import Match

from medusa.checkpoints import HeadsLoadError, load_drafter
from medusa.draft import drafter_kind
from medusa.engine import Engine, use_compile
from medusa.tree import get_tree
from runtime.loading import LoadedModel, load_model
from server.auth import ApiKeys
from server.body_limit import BodyLimit
from server.openai_protocol import protocol_error
from server.openai_routes import openai_router
from server.playground import add_playground
from server.protocol import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    Info,
    SimpleToken,
    StreamResponse,
    event_stream,
)
from server.request_id import HEADER as REQUEST_ID_HEADER
from server.request_id import RequestIds
from server.responses import ResponseStore, responses_router
from server.scheduler import QueueFull, RequestFailed, RequestStream, Scheduler, SchedulerUnavailable
from server.service import VERSION, ClientGone, Service, generate
from server.settings import Settings
from server.validation import InputError, Job

log = logging.getLogger(__name__)

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
EVENT_STREAM = event_stream(
    "Server-Sent Events: `data:{StreamResponse}` per token, or `data:{ErrorResponse}`")


def build_engine(settings: Settings, loaded: LoadedModel) -> Engine:
    """The engine for `loaded`, with Medusa heads and their tree when settings name heads, compiled as
    --compile says."""
    heads = tree = None
    path = settings.heads_path_for(loaded.dtype_name)
    if path is not None:
        model = loaded.model
        heads = load_drafter(Path(path), model.config, model.lm_head, device=settings.device,
                             dtype=model.embed.weight.dtype)
        if drafter_kind(heads) != settings.drafter:
            kind = drafter_kind(heads)
            raise HeadsLoadError(f"{path!r} holds a drafter of kind {kind!r} but --drafter is "
                                 f"{settings.drafter!r}: give --drafter {kind}")
        tree = get_tree(settings.tree_for(loaded.dtype_name))
    return Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids, heads=heads, tree=tree,
                  max_batch_size=settings.max_batch_size, max_total_tokens=settings.max_total_tokens,
                  max_speculative_batch=settings.speculative_batch_limit,
                  compile=use_compile(settings.compile, settings.device),
                  eager_if_compile_fails=settings.compile == "auto", prefix_caching=settings.prefix_caching)


def load_engine(settings: Settings, loaded: LoadedModel | None = None) -> tuple[LoadedModel, Engine]:
    """The model (`loaded`, or the one settings name) and its engine, built in a thread of their own
    that ends once they are built.

    Not in the calling thread: libgomp keeps a team of worker threads for each thread that ran a
    parallel region, for as long as that thread lives, and once a process holds more of them than it
    has CPUs, every team sleeps between regions instead of spinning (~70 us to wake, per operation,
    against ~12 us). Loaded in the main thread, the model left a team behind, and the scheduler
    thread's steps ran at 35.6 tok/s instead of 59.4 (bf16 Medusa, 2-core Xeon with AMX)."""
    def build() -> tuple[LoadedModel, Engine]:
        model = loaded or load_model(settings.model, settings.device, settings.dtype)
        return model, build_engine(settings, model)

    with ThreadPoolExecutor(1, thread_name_prefix="medusa-load") as pool:  # joined on leaving
        return pool.submit(build).result()


# ---------------------------------------------------------------- generation, whole or streamed

async def generate_response(service: Service, job: Job, request: Request
                            ) -> tuple[GenerateResponse, dict[str, str]]:
    """The response to a job; with best_of, that many samples side by side, each a request of its own
    with its own random seed, and the one of highest mean logprob returned, as TGI does."""
    reseeded = [dataclasses.replace(job.params, seed=random.randrange(2**63)) for _ in range(job.best_of - 1)]
    jobs = [job] + [dataclasses.replace(job, params=params) for params in reseeded]
    service.metrics.requests.inc(len(jobs) - 1)  # each sample counts, as an OpenAI request's choices do
    generations, headers = await generate(service, jobs, request)
    best = max(range(len(jobs)), key=lambda i: generations[i].mean_logprob)
    details = None
    if job.details:
        details = generations[best].details(jobs[best])
        if len(jobs) > 1:
            details.best_of_sequences = [generations[i].best_of_sequence(jobs[i])
                                         for i in range(len(jobs)) if i != best]
    return GenerateResponse(generated_text=generations[best].text(jobs[best]), details=details), headers


def sse(event: StreamResponse | ErrorResponse) -> str:
    unasked = isinstance(event, StreamResponse) and event.top_tokens is None
    return f"data:{event.model_dump_json(exclude={'top_tokens'} if unasked else None)}\n\n"


async def stream_events(service: Service, job: Job, stream: RequestStream) -> AsyncIterator[str]:
    """One SSE event per generated token; the last one carries generated_text and details."""
    generation = service.generation()
    index = step = 0
    try:
        async for emitted in stream:
            tokens = generation.add(emitted)
            step += bool(tokens)
            for i, token in enumerate(tokens):
                index += 1
                last = emitted.finish_reason is not None and i == len(tokens) - 1
                yield sse(StreamResponse(
                    index=index, token=token, step=step,
                    generated_text=generation.text(job) if last else None,
                    details=generation.stream_details(job) if last and job.details else None,
                    top_tokens=generation.top_tokens[index - 1] if job.params.top_n else None))
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
        model, serving = loaded, engine
        if serving is None:
            model, serving = await asyncio.to_thread(load_engine, settings, loaded)
        elif model is None:  # an injected engine (tests)
            model = await asyncio.to_thread(load_model, settings.model, settings.device, settings.dtype)
        scheduler = Scheduler(serving, max_queue=settings.max_queue,
                              max_prefill_tokens=settings.max_prefill_tokens, draining=draining)
        # warms the engine up (every compiled graph) before lifespan startup ends, and so before
        # uvicorn listens; in a worker thread, as it may take minutes
        await asyncio.to_thread(scheduler.start)
        app.state.service = Service(settings, model, scheduler)
        app.state.responses = ResponseStore()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="medusa-serve", version=VERSION, lifespan=lifespan,
                  description="Medusa speculative decoding behind the Text Generation Inference protocol")
    app.state.draining = draining
    app.add_middleware(BodyLimit, limit=settings.payload_limit)
    if settings.api_keys:  # added after the body limit, so it runs first: no body is read for a refusal
        app.add_middleware(ApiKeys, keys=settings.api_keys,
                           open_metrics=not settings.metrics_api_key_required)
    if settings.cors_origins:  # outermost: a browser's preflight needs no key, and 401s carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER])
    app.add_middleware(RequestIds)  # outermost of all: every answer carries its x-request-id, refusals too
    add_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(responses_router)
    add_playground(app)

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

    @app.post("/tokenize", response_model=list[SimpleToken],
              responses={status: ERROR_RESPONSES[status] for status in (400, 413, 422)})
    async def tokenize(body: GenerateRequest, request: Request) -> Response:
        """TGI's: the prompt's tokens as /generate feeds them to the model (chat template and `truncate`
        applied), each with its text and that text's span in the prompt (characters); nothing is
        generated, and a prompt over max_input_tokens is counted all the same."""
        try:
            tokens = await service_of(request).tokenize(body)
        except InputError as e:  # not a generation request: the requests' metrics do not count it
            return error_response(422, f"Input validation error: {e}", "validation", request=request)
        return JSONResponse([t.model_dump() for t in tokens])

    @app.get("/health", response_model=Health,
             responses={503: {"model": ErrorResponse, "description": "Draining after SIGTERM (error_type "
                              "'draining') or unable to serve ('unhealthy')"}})
    async def health(request: Request) -> Response:
        """200 when the model can serve. 503 'draining' from SIGTERM on: the requests taken still run, a
        load balancer should send no more (`server.cli.DrainingServer` listens on until they end); 503
        'unhealthy' when it cannot serve. While the model loads and warms up nothing listens yet: a
        probe's connection is refused."""
        if draining.is_set():
            return error_response(503, "draining: the server is shutting down and takes no new request",
                                  "draining")
        unhealthy = service_of(request).scheduler.unhealthy
        if unhealthy is not None:
            return error_response(503, unhealthy, "unhealthy")
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
    """TGI leaves `details` out when it was not asked for, and `top_tokens` without top_n_tokens."""
    if response.details is None:
        return response.model_dump(mode="json", exclude={"details"})
    unasked = {"top_tokens"} if response.details.top_tokens is None else set()
    if response.details.best_of_sequences is None:
        unasked.add("best_of_sequences")
    return response.model_dump(mode="json", exclude={"details": unasked} if unasked else None)


# ---------------------------------------------------------------- errors as {"error", "error_type"}

def error_response(status: int, message: str, error_type: str, headers: dict[str, str] | None = None, *,
                   request: Request | None = None, param: str | None = None) -> JSONResponse:
    """The error in the protocol of the request's route (`protocol_error`)."""
    path = request.url.path if request is not None else ""
    return protocol_error(path, status, message, error_type, param=param, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app takes at the request's path (GET / is the playground, POST /
    TGI's client route: two routes, one path)."""
    return [method for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
                   for route in request.app.router.routes)]


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
        param = ".".join(str(part) for part in errors[0]["loc"] if part != "body") if errors else None
        return error_response(status, f"Input validation error: {details}", "validation", request=request,
                              param=param or None)

    @app.exception_handler(InputError)
    async def invalid_input(request: Request, exc: InputError) -> JSONResponse:
        refused(request, "validation")
        return error_response(422, f"Input validation error: {exc}", "validation", request=request,
                              param=exc.param)

    @app.exception_handler(QueueFull)
    async def overloaded(request: Request, exc: QueueFull) -> JSONResponse:
        refused(request, "overloaded")
        return error_response(429, str(exc), "overloaded", headers={"retry-after": "1"}, request=request)

    @app.exception_handler(RequestFailed)
    async def failed(request: Request, exc: RequestFailed) -> JSONResponse:
        prefix = "Input validation error: " if exc.error_type == "validation" else ""
        return error_response(ERROR_STATUS[exc.error_type], f"{prefix}{exc}", exc.error_type, request=request)

    @app.exception_handler(SchedulerUnavailable)
    async def unavailable(request: Request, exc: SchedulerUnavailable) -> JSONResponse:
        refused(request, "unhealthy")
        return error_response(503, str(exc), "unhealthy", request=request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body as JSON at all (not UTF-8, too deep)
            unread_body(request)
            return error_response(400, f"Input validation error: malformed JSON body: {exc.detail}",
                                  "validation", request=request)
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the methods of the first route with this path only
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(exc.status_code, str(exc.detail), "http", headers=headers, request=request)
