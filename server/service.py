"""What the routes of every protocol share: the `Service` (settings, tokenizer, scheduler), a request's
`Generation` as its tokens arrive, and running a request to its end with cancellation when the client
disconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import Request

from medusa.draft import drafter_kind
from medusa.engine import Emitted
from medusa.heads import MedusaHeads
from runtime.grammar import GrammarError
from runtime.loading import LoadedModel
from runtime.prompt import Prompter, PromptError
from server.detokenize import IncrementalDecoder
from server.protocol import (
    BestOfSequence,
    Details,
    GenerateRequest,
    Info,
    PrefillToken,
    SimpleToken,
    Speculation,
    SpeculationInfo,
    StreamDetails,
    Token,
)
from server.scheduler import RequestStream, Scheduler
from server.settings import Settings
from server.validation import GrammarRefused, InputError, Job, check_before_tokenizing, validate

try:
    VERSION = version("medusa-serve")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    VERSION = "0.0.0+source"


class Generation:
    """One request's tokens as they arrive, with their text decoded incrementally, and the sums of its
    per-step speculation counts (None when the server does not speculate)."""

    def __init__(self, tokenizer, special_ids: frozenset[int], speculative: bool) -> None:
        self.tokenizer = tokenizer
        self.special_ids = special_ids
        self.decoder = IncrementalDecoder(tokenizer)
        self.tokens: list[Token] = []
        self.top_tokens: list[list[Token]] = []  # each token's most likely tokens, where the request asks
        self.prefill_top: list[list[Token] | None] | None = None  # the prompt's, with its logprobs
        self.prefill_logprobs: list[float | None] | None = None
        self.finish_reason: str | None = None
        self.speculative = speculative
        self.spec_steps = 0
        self.accepted_tokens = 0
        self.cached_tokens = 0  # prompt tokens whose K/V the prefix cache held

    def add(self, emitted: Emitted) -> list[Token]:
        """Record one Emitted; return its tokens, each with the text it adds."""
        new = [Token(id=t, text=self.decoder.push(t), logprob=logprob, special=t in self.special_ids)
               for t, logprob in zip(emitted.token_ids, emitted.logprobs, strict=True)]
        self.tokens += new
        if emitted.top_tokens is not None:
            self.top_tokens += [self._alternatives(top) for top in emitted.top_tokens]
        if emitted.prefill_top_tokens is not None:
            self.prefill_top = [None if top is None else self._alternatives(top)
                                for top in emitted.prefill_top_tokens]
        if emitted.prefill_logprobs is not None:
            self.prefill_logprobs = emitted.prefill_logprobs
        self.spec_steps += emitted.speculated
        self.cached_tokens += emitted.cached_tokens
        self.accepted_tokens += emitted.accepted
        self.finish_reason = emitted.finish_reason
        return new

    def _alternatives(self, top: list[tuple[int, float]]) -> list[Token]:
        """(id, logprob) pairs as tokens, each one's text on its own, as TGI gives it."""
        return [Token(id=t, text=self.tokenizer.decode([t]), logprob=logprob, special=t in self.special_ids)
                for t, logprob in top]

    @property
    def speculation(self) -> Speculation | None:
        return speculation_of([self])

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
                       prefill=prefill, tokens=self.tokens, speculation=self.speculation,
                       top_tokens=self.top_tokens if job.params.top_n else None)

    @property
    def mean_logprob(self) -> float:
        """The mean logprob of the generated tokens (-inf for one that is not finite): best_of's measure."""
        logprobs = [-math.inf if t.logprob is None else t.logprob for t in self.tokens]
        return sum(logprobs) / len(logprobs) if logprobs else -math.inf

    def best_of_sequence(self, job: Job) -> BestOfSequence:
        d = self.details(job)
        return BestOfSequence(generated_text=self.text(job), finish_reason=d.finish_reason,
                              generated_tokens=d.generated_tokens, seed=d.seed, prefill=d.prefill,
                              tokens=d.tokens, top_tokens=d.top_tokens)

    def stream_details(self, job: Job) -> StreamDetails:
        return StreamDetails(finish_reason=self.finish_reason, generated_tokens=len(self.tokens),
                             seed=job.seed, input_length=len(job.prompt_ids), speculation=self.speculation)


def speculation_of(generations: list[Generation]) -> Speculation | None:
    """The speculation figures of these generations together (one request's, or an OpenAI request's
    choices); None when the server does not speculate."""
    if not generations or not generations[0].speculative:
        return None
    steps = sum(g.spec_steps for g in generations)
    accepted = sum(g.accepted_tokens for g in generations)
    return Speculation(steps=steps, accepted_tokens=accepted,
                       mean_accepted_len=1.0 + accepted / steps if steps else 1.0)


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
        self.started = time.time()  # when the model was ready: /v1/models' `created`

    async def prepare(self, request: GenerateRequest, *, stream: bool,
                      encode: Callable[[str, int | None], list[int]] | None = None,
                      fill_context: bool = False) -> Job:
        """Check what needs no tokens, tokenize off the event loop, then validate against the server's
        limits (InputError: 422).

        encode: text and truncate -> prompt ids; the server's prompter (chat template or not) by default.
        fill_context: max_new_tokens becomes what max_total_tokens leaves after the prompt.
        """
        self.metrics.requests.inc()
        prompt_ids = await self._prompt_ids(request, encode or self.prompter.encode, stream=stream)
        if fill_context:
            room = max(self.settings.max_total_tokens - len(prompt_ids), 1)
            request = request.model_copy(update={
                "parameters": request.parameters.model_copy(update={"max_new_tokens": room})})
        job = validate(request, prompt_ids, self.settings)
        self.in_vocabulary(job.params.stop_token_ids, "stop_token_ids")
        if request.parameters.prediction:  # tokenized off the event loop, as the prompt is
            prediction = await asyncio.to_thread(self.tokenizer.encode, request.parameters.prediction,
                                                 add_special_tokens=False)
            job = dataclasses.replace(job, params=dataclasses.replace(
                job.params, prediction=tuple(prediction[:self.settings.max_total_tokens])))
        if job.params.grammar is not None:  # against the tokenizer (built for grammars at the first one)
            try:
                await asyncio.to_thread(self.scheduler.engine.grammars.check, job.params.grammar)
            except GrammarError as e:
                raise GrammarRefused(e) from e
        return job

    def in_vocabulary(self, ids: Iterable[int], field: str) -> None:
        """InputError, naming `field`, for a token id outside the model's vocabulary."""
        vocab = self.scheduler.engine.model.config.vocab_size
        if outside := [t for t in ids if t >= vocab]:
            raise InputError(f"`{field}`: token id {outside[0]} is outside the vocabulary (0 to {vocab - 1})",
                             param=field)

    async def tokenize(self, request: GenerateRequest) -> list[SimpleToken]:
        """The prompt's tokens as generation would feed them to the model (chat template and `truncate`
        applied), each with the text it adds to the prompt's decoded text and that text's span there
        (a token inside a character adds "", the one that completes it the character). The prompt's
        length is not held to the server's limits: a client may ask how far over them it is."""
        ids = await self._prompt_ids(request, self.prompter.encode, stream=False)

        def spans() -> list[SimpleToken]:
            decoder, tokens, start = IncrementalDecoder(self.tokenizer), [], 0
            for t in ids:
                text = decoder.push(t)
                tokens.append(SimpleToken(id=t, text=text, start=start, stop=start + len(text)))
                start += len(text)
            return tokens

        return await asyncio.to_thread(spans)  # a decode per token: off the event loop, as tokenizing is

    async def _prompt_ids(self, request: GenerateRequest, encode: Callable[[str, int | None], list[int]], *,
                          stream: bool) -> list[int]:
        """Refuse what needs no tokens to refuse, then tokenize off the event loop (InputError: 422)."""
        check_before_tokenizing(request, self.prompter.max_token_chars, self.settings, stream=stream)
        try:
            return await asyncio.to_thread(encode, request.inputs, request.parameters.truncate)
        except PromptError as e:
            raise InputError(str(e)) from e

    def generation(self) -> Generation:
        speculative = self.scheduler.engine.heads is not None
        return Generation(self.tokenizer, self.special_ids, speculative=speculative)

    def submit(self, job: Job) -> RequestStream:
        return self.scheduler.submit(job.prompt_ids, job.params, prompt_logprobs=job.prefill_details,
                                     timeout=job.timeout)

    def info(self) -> Info:
        s, engine = self.settings, self.scheduler.engine
        heads = engine.heads
        num_heads = heads.config.num_heads if isinstance(heads, MedusaHeads) else 0
        return Info(
            model_id=self.loaded.model_id, model_sha=self.loaded.commit, model_dtype=self.loaded.dtype_name,
            model_device_type=torch.device(s.device).type,
            max_concurrent_requests=s.max_batch_size + s.max_queue, max_input_tokens=s.max_input_tokens,
            max_input_length=s.max_input_tokens, max_total_tokens=s.max_total_tokens,
            max_batch_size=s.max_batch_size, max_queue=s.max_queue, version=VERSION, compiled=engine.compile,
            prefix_caching=engine.prefix_caching,
            speculation=SpeculationInfo(enabled=heads is not None,
                                        drafter=drafter_kind(heads) if heads is not None else None,
                                        num_heads=num_heads,
                                        tree=engine.tree.name if heads is not None else None,
                                        tree_nodes=engine.tree.num_nodes if heads is not None else 1,
                                        max_speculative_batch=None if heads is None
                                        else engine.max_speculative_batch))


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its response was ready."""


async def cancel_on_disconnect(request: Request, streams: list[RequestStream]) -> None:
    """Wait for the client to go away, then cancel its requests: a queued one leaves the queue, a
    running one frees its slot at the next step. (A streaming response does this by itself.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for stream in streams:
        stream.cancel()


def submit_all(service: Service, jobs: list[Job]) -> list[RequestStream]:
    """Queue every job, or none: where one is refused (QueueFull, SchedulerUnavailable), those queued
    before it are cancelled and the refusal raised."""
    streams: list[RequestStream] = []
    try:
        for job in jobs:
            streams.append(service.submit(job))
    except Exception:
        for stream in streams:
            stream.cancel()
        raise
    return streams


async def generate(service: Service, jobs: list[Job], request: Request
                   ) -> tuple[list[Generation], dict[str, str]]:
    """Run the jobs of one request (an OpenAI request's choices; a TGI request's one) side by side to
    their end, all cancelled if the client disconnects or one fails; their generations and the
    request's timing headers."""
    start = time.perf_counter()
    streams = submit_all(service, jobs)
    generations = [service.generation() for _ in jobs]

    async def collect(stream: RequestStream, generation: Generation) -> None:
        async for emitted in stream:
            generation.add(emitted)

    watcher = asyncio.create_task(cancel_on_disconnect(request, streams))
    tasks = [asyncio.ensure_future(collect(s, g)) for s, g in zip(streams, generations, strict=True)]
    try:
        await asyncio.gather(*tasks)
    finally:
        watcher.cancel()
        for task, stream in zip(tasks, streams, strict=True):
            task.cancel()
            stream.cancel()  # no-op once finished; frees the slot if this handler was cancelled
    if any(g.finish_reason is None for g in generations):
        raise ClientGone()
    return generations, timing_headers(jobs, generations, streams, start)


def timing_headers(jobs: list[Job], generations: list[Generation], streams: list[RequestStream], start: float
                   ) -> dict[str, str]:
    end = time.perf_counter()
    admitted = min((s.admitted_at or end) for s in streams)
    inference_ms = (end - admitted) * 1000
    generated = sum(len(g.tokens) for g in generations)
    return {
        "x-compute-time": f"{end - start:.6f}",
        "x-compute-characters": str(sum(len(job.inputs) for job in jobs)),
        "x-total-time": str(round((end - start) * 1000)),
        "x-queue-time": str(round((admitted - min(s.queued_at for s in streams)) * 1000)),
        "x-inference-time": str(round(inference_ms)),
        "x-time-per-token": str(round(inference_ms / max(generated, 1))),
        "x-prompt-tokens": str(sum(len(job.prompt_ids) for job in jobs)),
        "x-generated-tokens": str(generated),
    }
