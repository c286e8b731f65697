"""The one owner of the model: a thread that batches every running request into each engine step.

HTTP handlers run on the asyncio event loop and never touch the engine. They `submit` a request
and read its `RequestStream`; the scheduler thread does all model work:

    loop:  wait until there is work
           drop cancelled requests (waiting ones leave the queue, running ones leave the engine)
           admit waiting requests into free slots   (engine.add: prefill + first token)
           one engine.step() for all running ones  (one batched forward; several tokens each
                                                    under speculation)
           hand every Emitted to its request's stream (loop.call_soon_threadsafe)

Continuous batching: requests join and leave the batch at every step. A failure while adding a
request fails that request only; a failure inside a step fails the requests that were in it, and
the next request starts afresh. The thread dying, or the engine refusing to free a failed
request's slot, marks the scheduler unhealthy (/health answers 503).
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

from medusa.config import SamplingParams
from medusa.engine import Emitted, Engine, EngineError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room in the waiting queue: the client should retry later (429)."""


class SchedulerUnavailable(Exception):
    """The scheduler is stopped or broken and takes no requests (503)."""


class RequestFailed(Exception):
    """The engine could not serve a request. error_type: 'validation' (input refused) or 'generation'."""

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
        self._items: asyncio.Queue[Emitted | RequestFailed] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Emitted:
        if self.finished:
            raise StopAsyncIteration
        item = await self._items.get()
        if isinstance(item, RequestFailed):
            self.finished = True
            raise item
        self.finished = item.finish_reason is not None
        return item

    def cancel(self) -> None:
        """Stop generating (the client went away); the slot is freed at the next step boundary."""
        if not self.finished:
            self.finished = True
            self._cancel(self.request_id)

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
    stream: RequestStream = field(repr=False)

    @property
    def id(self) -> int:
        return self.stream.request_id


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # notified on submit, cancel and stop
        # shared with the event loop, guarded by _lock
        self._waiting: deque[_Request] = deque()
        self._cancelled: set[int] = set()
        self._stopping = False
        # the scheduler thread's own
        self._running: dict[int, _Request] = {}
        self._thread = threading.Thread(target=self._run, name="medusa-scheduler", daemon=True)
        self.broken: str | None = None  # why the scheduler cannot serve any more, once it cannot

    # ---------------------------------------------------------------- event-loop side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; requests still waiting or running fail."""
        with self._lock:
            self._stopping = True
            self._work.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self.broken is None and self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, prompt_ids: list[int], params: SamplingParams, prompt_logprobs: bool = False
               ) -> RequestStream:
        """Queue a request; call from the event loop. Raises QueueFull or SchedulerUnavailable."""
        stream = RequestStream(next(self._ids), asyncio.get_running_loop(), self._cancel)
        with self._lock:
            if self._stopping or not self.healthy:
                raise SchedulerUnavailable(self.broken or "the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"Model is overloaded: {len(self._waiting)} requests are already waiting")
            self._waiting.append(_Request(prompt_ids, params, prompt_logprobs, stream))
            self._work.notify()
        return stream

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._work.notify()

    # ---------------------------------------------------------------- scheduler thread

    def _run(self) -> None:
        try:
            while self._iterate():
                pass
        except Exception as e:  # a bug here must not leave clients waiting forever
            log.exception("the scheduler stopped")
            self.broken = f"the scheduler stopped: {e}"
        with self._lock:
            leftover = [*self._waiting, *self._running.values()]
            self._waiting.clear()
        self._running.clear()
        reason = self.broken or "the server is shutting down"
        for request in leftover:
            request.stream.put(RequestFailed(reason, "generation"))

    def _iterate(self) -> bool:
        """One scheduling round; False once stopping."""
        with self._lock:
            while not (self._waiting or self._running or self._cancelled or self._stopping):
                self._work.wait()
            if self._stopping:
                return False
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                self._waiting = deque(r for r in self._waiting if r.id not in cancelled)
            admitted = [self._waiting.popleft()
                        for _ in range(min(self.engine.free_slots, len(self._waiting)))]
        for request_id in cancelled & self._running.keys():
            del self._running[request_id]
            self.engine.cancel(request_id)
        for request in admitted:
            self._admit(request)
        if self._running:
            self._step()
        return True

    def _admit(self, request: _Request) -> None:
        request.stream.admitted_at = time.perf_counter()
        try:
            emitted = self.engine.add(request.id, request.prompt_ids, request.params, request.prompt_logprobs)
        except EngineError as e:
            request.stream.put(RequestFailed(str(e), "validation"))
            return
        except Exception as e:
            log.exception("adding request %s failed", request.id)
            request.stream.put(RequestFailed(f"Request failed during generation: {e}", "generation"))
            return
        if emitted.finish_reason is None:
            self._running[request.id] = request
        self._deliver(request, emitted)

    def _step(self) -> None:
        try:
            emitted = self.engine.step()
        except Exception as e:
            log.exception("an engine step failed; failing the %d requests in it", len(self._running))
            self._fail_running(f"Request failed during generation: {e}")
            return
        for item in emitted:
            request = self._running[item.request_id]
            if item.finish_reason is not None:
                del self._running[item.request_id]
            self._deliver(request, item)

    def _deliver(self, request: _Request, item: Emitted) -> None:
        if not request.stream.put(item) and request.id in self._running:
            del self._running[request.id]
            self.engine.cancel(request.id)

    def _fail_running(self, message: str) -> None:
        failed = list(self._running.values())
        self._running.clear()
        for request in failed:
            request.stream.put(RequestFailed(message, "generation"))
            try:
                self.engine.cancel(request.id)
            except Exception as e:
                log.exception("the engine could not free request %s's slot", request.id)
                self.broken = f"the engine could not recover from a failed step: {e}"
