"""The one owner of the model: a thread that batches every running request into each engine step.

HTTP handlers run on the asyncio event loop and never touch the engine. They `submit` a request
and read its `RequestStream`; the scheduler thread does all model work:

    first: make the engine's GPU this thread's current device, and warm the engine up (build every
           compiled graph); `start` returns once that is done, and the scheduler is healthy from then
    loop:  sleep until there is something to do (a request to admit into a free slot, one in the
               engine, a cancellation, a queued deadline to expire, a stop)
           drop cancelled requests and those past their deadline (waiting ones leave the queue,
                                                    the others leave the engine)
           admit waiting requests into free slots   (engine.start)
           prefill up to max_prefill_tokens prompt tokens, oldest prompt first (engine.prefill);
               a prompt's last chunk gives its first token and the request joins the batch
           one engine.step() for all running ones  (one batched forward; several tokens each
                                                    under speculation)
           hand every Emitted to its request's stream (loop.call_soon_threadsafe)

Every round starts (and every wake-up without work ends) by checking the invariants: the engine's
slots are free or held by exactly one live request, and the requests the engine holds are exactly
those this thread serves.

Continuous batching: requests join and leave the batch at every step, and a long prompt goes in
chunk by chunk between steps, so the running streams keep flowing while it is prefilled. A failure
while prefilling a request fails that request only; a failure inside a step fails the requests that
were in it, and the next request starts afresh. The engine frees the slots of the requests a
failing call was serving; this thread then fails every request it serves that the engine no longer
holds (`_settle`). A failure in one request's row of a step comes back as that request's `Emitted`
with `error` set, and fails that request alone. The thread dying or a broken invariant marks the
scheduler unhealthy (/health answers 503, logged). Once `draining` is set (SIGTERM), new requests are
refused (503) while those already taken run to their end.

The engine owns each request's state and slot; this thread keeps only the queue, deadlines,
cancellations and the streams.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from medusa.engine import Emitted, Engine, EngineError, InvariantError
from runtime.config import SamplingParams
from server.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room in the waiting queue: the client should retry later (429)."""


class SchedulerUnavailable(Exception):
    """The scheduler is stopped or broken and takes no requests (503)."""


class RequestFailed(Exception):
    """The engine could not serve a request.

    error_type: 'validation' (input refused), 'generation' (the engine failed) or 'timeout' (the
    request's deadline passed).
    """

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class RequestStream:
    """The event-loop side of one request: async-iterate it for its Emitted, in order.

    Iteration ends after the Emitted that carries a finish_reason, or raises RequestFailed.
    """

    def __init__(self, request_id: int, loop: asyncio.AbstractEventLoop,
                 cancel: Callable[[int], None]) -> None:
        self.request_id = request_id
        self.queued_at = time.perf_counter()
        self.admitted_at: float | None = None  # set by the scheduler thread at admission
        self.finished = False
        self._loop = loop
        self._cancel = cancel
        self._items: asyncio.Queue[Emitted | RequestFailed | None] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Emitted:
        if self.finished:
            raise StopAsyncIteration
        item = await self._items.get()
        if item is None:  # cancelled while waiting
            raise StopAsyncIteration
        if isinstance(item, RequestFailed):
            self.finished = True
            raise item
        self.finished = item.finish_reason is not None
        return item

    def cancel(self) -> None:
        """Stop generating (the client went away); the slot is freed at the next step boundary, and a
        reader waiting for the next item stops iterating."""
        if not self.finished:
            self.finished = True
            self._cancel(self.request_id)
            self._items.put_nowait(None)

    def put(self, item: Emitted | RequestFailed) -> bool:
        """Scheduler thread: hand an item to the event loop. False when the loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody will read this request
            return False
        return True


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    prompt_logprobs: bool
    timeout: float | None  # seconds after arrival at which the request fails with 'timeout'
    stream: RequestStream = field(repr=False)
    last_token_at: float | None = None

    @property
    def id(self) -> int:
        return self.stream.request_id

    def expired(self, now: float) -> bool:
        return self.timeout is not None and now > self.stream.queued_at + self.timeout


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int, max_prefill_tokens: int,
                 draining: threading.Event | None = None) -> None:
        """draining: once set (by the SIGTERM handler), new requests are refused with 503 while those
        already queued or running go on to their end."""
        self.engine = engine
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = Metrics()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # notified on submit, cancel and stop
        # shared with the event loop, guarded by _lock
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._stopping = False
        # the scheduler thread's own: the requests it serves that the engine holds (their state and
        # slot are the engine's)
        self._taken: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._run, name="medusa-scheduler", daemon=True)
        self._warm = threading.Event()  # set once the thread has warmed the engine up, or failed to
        self.broken: str | None = None  # why the scheduler cannot serve any more, once it cannot
        self.draining = draining or threading.Event()
        self.metrics.watch(running=lambda: self.running, waiting=lambda: self.waiting,
                           kv_slots_used=lambda: engine.num_slots - engine.free_slots,
                           kv_slots=engine.num_slots, head_positions=engine.tree.depth)

    # ---------------------------------------------------------------- event-loop side

    def start(self) -> None:
        """Start the thread and return once it has warmed the engine up: the server awaits this before
        it listens (as TGI does), so that no request waits for a graph to compile. Raises
        SchedulerUnavailable when warming up failed."""
        self._thread.start()
        self._warm.wait()
        if self.broken is not None:
            raise SchedulerUnavailable(self.broken)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; requests still waiting or running fail."""
        with self._lock:
            self._stopping = True
            self._work.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def unhealthy(self) -> str | None:
        """Why the scheduler cannot serve now (the 503 message), or None when it can."""
        if self.broken is not None:
            return self.broken
        if not self._thread.is_alive():
            return "the scheduler is not running"
        if not self._warm.is_set():
            return "warming up: building the compiled step before serving"
        return None

    @property
    def healthy(self) -> bool:
        return self.unhealthy is None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot: prefilling or in the batch (the engine's count)."""
        return len(self.engine.request_ids)

    def submit(self, prompt_ids: list[int], params: SamplingParams, prompt_logprobs: bool = False,
               timeout: float | None = None) -> RequestStream:
        """Queue a request; call from the event loop. Raises QueueFull or SchedulerUnavailable.

        timeout: seconds from now after which the request fails with error_type 'timeout', checked
        at every step boundary; None: no deadline.
        """
        stream = RequestStream(next(self._ids), asyncio.get_running_loop(), self._cancel)
        with self._lock:
            if self._stopping or self.draining.is_set():
                raise SchedulerUnavailable(self.broken or "the server is shutting down")
            if (unhealthy := self.unhealthy) is not None:
                raise SchedulerUnavailable(unhealthy)
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"Model is overloaded: {len(self._waiting)} requests are already waiting")
            self._waiting.append(_Request(prompt_ids, params, prompt_logprobs, timeout, stream))
            self._work.notify()
        return stream

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._work.notify()

    # ---------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        try:
            self._warm_up()
            while self._iterate():
                pass
        except Exception as e:  # a bug here must not leave clients waiting forever
            log.exception("the scheduler stopped")
            self.broken = f"the scheduler stopped: {e}"
        self._warm.set()  # after `broken`: a start() still waiting sees why warming up failed
        with self._lock:
            leftover = [*self._waiting, *self._taken.values()]
            self._waiting.clear()
        for request in self._taken.values():
            self.engine.cancel(request.id)
        self._taken.clear()
        for request in leftover:
            self._fail(request, RequestFailed(self.broken or "the server is shutting down", "generation"))

    def _warm_up(self) -> None:
        """Here, in the thread that runs every engine call: the current CUDA device is per thread and
        starts as cuda:0, so without set_device a `cuda:1` engine would allocate and launch on the
        wrong GPU; and torch.compile records its CUDA graphs per thread, so graphs built in another
        thread would be recorded again at the first request."""
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)
        started = time.perf_counter()
        self.engine.warm_up()
        log.info("engine warmed up in %.1f s (compile: %s)", time.perf_counter() - started,
                 "on" if self.engine.compile else "off")
        self._warm.set()

    def _idle(self) -> bool:
        """Nothing this thread can do now: queued requests need a free slot to move."""
        return not (self._cancelled or self._stopping or self._taken
                    or (self._waiting and self.engine.free_slots))

    def _next_deadline(self) -> float | None:
        """Seconds until the first queued request's deadline passes (None: no deadline)."""
        deadlines = [r.stream.queued_at + r.timeout for r in self._waiting if r.timeout is not None]
        return max(0.0, min(deadlines) - time.perf_counter()) if deadlines else None

    def _iterate(self) -> bool:
        """One scheduling round; False once stopping."""
        with self._lock:
            self._check()
            while self._idle():
                if not self._work.wait(self._next_deadline()):
                    break  # a queued request's deadline passed: expire it
                self._check()  # woken without work to do: a leaked slot would keep the queue waiting
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, set()
            now = time.perf_counter()
            leaving = [r for r in self._waiting if r.id in cancelled or r.expired(now)]
            if leaving:
                self._waiting = deque(r for r in self._waiting if not (r.id in cancelled or r.expired(now)))
            admitted = [self._waiting.popleft()
                        for _ in range(min(self.engine.free_slots, len(self._waiting)))]
        for request in leaving:
            self._end_early(request, cancelled, now)
        for request in list(self._taken.values()):
            if request.id in cancelled or request.expired(now):
                del self._taken[request.id]
                self.engine.cancel(request.id)
                self._end_early(request, cancelled, now)
        for request in admitted:
            self._admit(request, now)
        self._prefill()
        if self.engine.running:
            self._step()
        return True

    def _check(self) -> None:
        """The invariants, every round: cheap set comparisons. A broken one is a bug: log it and answer
        503 on /health (new requests are refused) rather than live with a leaked slot."""
        try:
            self.engine.check()
            if self._taken.keys() != self.engine.request_ids:
                raise InvariantError(f"the engine holds requests {sorted(self.engine.request_ids)} but the "
                                     f"scheduler serves {sorted(self._taken)}")
        except InvariantError as e:
            if self.broken is None:
                log.error("invariant broken: %s", e)
                self.broken = f"invariant broken: {e}"

    def _end_early(self, request: _Request, cancelled: set[int], now: float) -> None:
        """A request that leaves before its end: its client went away, or its deadline passed."""
        if request.id in cancelled:
            self.metrics.failed("cancelled")
            return
        where = "in the queue" if request.stream.admitted_at is None else "while generating"
        self._fail(request, RequestFailed(f"Request timed out {where}: not finished within its deadline "
                                          f"of {request.timeout:g} s", "timeout"))

    def _admit(self, request: _Request, now: float) -> None:
        request.stream.admitted_at = now
        self.metrics.admitted(now - request.stream.queued_at, len(request.prompt_ids))
        try:
            self.engine.start(request.id, request.prompt_ids, request.params, request.prompt_logprobs)
        except EngineError as e:
            self._fail(request, RequestFailed(str(e), "validation"))
            return
        except Exception as e:
            log.exception("adding request %s failed", request.id)
            self._fail(request, RequestFailed(f"Request failed during generation: {e}", "generation"))
            return
        self._taken[request.id] = request

    def _prefill(self) -> None:
        """Feed at most max_prefill_tokens prompt tokens to the engine, oldest prompt first."""
        budget = self.max_prefill_tokens
        for request_id, left in self.engine.prefilling.items():
            if budget == 0:
                break
            chunk = min(budget, left)
            budget -= chunk
            try:
                emitted = self.engine.prefill(request_id, chunk)
            except Exception as e:
                log.exception("prefilling request %s failed", request_id)
                self._settle(f"Request failed during generation: {e}")
                continue
            if emitted is not None:
                self._deliver(emitted)

    def _step(self) -> None:
        try:
            emitted = self.engine.step()
        except Exception as e:
            log.exception("an engine step failed; failing the %d requests in it", self.engine.running)
            self._settle(f"Request failed during generation: {e}")
            return
        for item in emitted:
            self._deliver(item)
        self.metrics.step(len(emitted), [item.accepted for item in emitted if item.speculated],
                          self.engine.tree.num_nodes - 1)

    def _deliver(self, item: Emitted) -> None:
        request = self._taken[item.request_id]
        if item.error is not None:
            del self._taken[item.request_id]
            error = RequestFailed(f"Request failed during generation: {item.error}", "generation")
            self._fail(request, error)
            return
        now = time.perf_counter()
        if request.last_token_at is None:
            self.metrics.first_token(now - request.stream.queued_at, item.cached_tokens)
        else:
            self.metrics.next_tokens(now - request.last_token_at, len(item.token_ids))
        request.last_token_at = now
        if item.finish_reason is not None:
            del self._taken[item.request_id]
            self.metrics.finished(item.finish_reason, now - request.stream.queued_at)
        if not request.stream.put(item) and item.finish_reason is None:  # nobody will read the rest
            del self._taken[item.request_id]
            self.engine.cancel(item.request_id)

    def _settle(self, message: str) -> None:
        """After an engine call raised: fail each request this thread serves that the engine dropped."""
        for request_id in list(self._taken.keys() - self.engine.request_ids):
            self._fail(self._taken.pop(request_id), RequestFailed(message, "generation"))

    def _fail(self, request: _Request, error: RequestFailed) -> None:
        self.metrics.failed(error.error_type)
        request.stream.put(error)
