"""The scheduler driven directly from an asyncio loop, over the tiny engine: requests complete with the
tokens each gets alone, the queue is bounded, cancelled and expired waiting requests never take a
slot, and a slot held behind the scheduler's back marks it broken (its invariant check). Its thread
warms the engine up, on the engine's GPU, before it is healthy."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from medusa.engine import Emitted, Engine
from runtime.config import SamplingParams
from runtime.loading import LoadedModel
from server.scheduler import QueueFull, RequestFailed, RequestStream, Scheduler, SchedulerUnavailable
from tests.server.support import ControlledEngine, WarmingEngine, tiny_engine, tiny_settings

PROMPTS = [[5, 6, 7], [40, 41], [100, 3, 9, 27, 81], [250], [17, 18, 19, 20], [60, 61, 62]]


class RecordingEngine(ControlledEngine):
    """The controlled engine, also recording the requests that took a slot."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started: list = []

    def start(self, request_id, *args, **kwargs) -> None:
        super().start(request_id, *args, **kwargs)
        self.started.append(request_id)


@contextlib.contextmanager
def scheduling(loaded: LoadedModel, **settings) -> Iterator[tuple[RecordingEngine, Scheduler]]:
    settings = tiny_settings(**settings)
    engine = tiny_engine(loaded, settings, RecordingEngine)
    scheduler = Scheduler(engine, max_queue=settings.max_queue,
                          max_prefill_tokens=settings.max_prefill_tokens)
    scheduler.start()
    try:
        yield engine, scheduler
    finally:
        engine.gate.set()
        scheduler.stop()


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.002)


async def tokens_of(stream: RequestStream) -> list[int]:
    """All of a request's tokens; checks that only its last Emitted has a finish_reason."""
    items: list[Emitted] = [item async for item in stream]
    assert [item.finish_reason for item in items[:-1]] == [None] * (len(items) - 1)
    assert items[-1].finish_reason is not None
    return [token for item in items for token in item.token_ids]


async def settled(engine: RecordingEngine, scheduler: Scheduler) -> None:
    """Every slot back, nothing running or waiting, invariants intact."""
    await until(lambda: scheduler.running == 0 and engine.free_slots == engine.num_slots)
    assert scheduler.waiting == 0 and scheduler.broken is None


async def hold_one_slot(engine: RecordingEngine, scheduler: Scheduler) -> RequestStream:
    """A request that holds a slot while the scheduler thread waits at the engine's closed gate."""
    engine.gate.clear()
    stream = scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=3))
    await until(lambda: scheduler.running == 1)
    return stream


def test_requests_complete_in_order_with_the_tokens_each_gets_alone(loaded: LoadedModel) -> None:
    prompts = PROMPTS[:4]
    params = [SamplingParams(max_new_tokens=2 + i, ignore_eos=True) for i in range(len(prompts))]
    reference = tiny_engine(loaded, tiny_settings())
    alone = [reference.generate([prompt], p)[0] for prompt, p in zip(prompts, params, strict=True)]

    async def scenario(engine: RecordingEngine, scheduler: Scheduler) -> None:
        streams = [scheduler.submit(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        finished = []

        async def read(i: int) -> list[int]:
            tokens = await tokens_of(streams[i])
            finished.append(i)
            return tokens

        assert await asyncio.gather(*map(read, range(len(streams)))) == alone
        # 4 requests on 2 slots, admitted first come first served; request i runs 2 + i tokens
        assert finished == list(range(len(streams)))
        await settled(engine, scheduler)
        assert engine.started == [s.request_id for s in streams]

    with scheduling(loaded, max_batch_size=2) as (engine, scheduler):
        asyncio.run(scenario(engine, scheduler))


def test_a_full_queue_refuses_the_next_request(loaded: LoadedModel) -> None:
    async def scenario(engine: RecordingEngine, scheduler: Scheduler) -> None:
        first = await hold_one_slot(engine, scheduler)
        queued = [scheduler.submit(prompt, SamplingParams(max_new_tokens=2)) for prompt in PROMPTS[1:3]]
        with pytest.raises(QueueFull):
            scheduler.submit(PROMPTS[3], SamplingParams(max_new_tokens=2))
        assert scheduler.waiting == 2
        engine.gate.set()
        assert [len(await tokens_of(s)) for s in (first, *queued)] == [3, 2, 2]
        await settled(engine, scheduler)

    with scheduling(loaded, max_batch_size=1, max_queue=2) as (engine, scheduler):
        asyncio.run(scenario(engine, scheduler))


def test_a_cancelled_waiting_request_never_takes_a_slot(loaded: LoadedModel) -> None:
    async def scenario(engine: RecordingEngine, scheduler: Scheduler) -> None:
        first = await hold_one_slot(engine, scheduler)
        gone = scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=2))
        gone.cancel()
        engine.gate.set()
        assert len(await tokens_of(first)) == 3
        assert [item async for item in gone] == []
        later = scheduler.submit(PROMPTS[2], SamplingParams(max_new_tokens=2))
        assert len(await tokens_of(later)) == 2
        await settled(engine, scheduler)
        assert engine.started == [first.request_id, later.request_id]

    with scheduling(loaded, max_batch_size=1) as (engine, scheduler):
        asyncio.run(scenario(engine, scheduler))


def test_a_deadline_expires_a_queued_request(loaded: LoadedModel) -> None:
    async def scenario(engine: RecordingEngine, scheduler: Scheduler) -> None:
        first = await hold_one_slot(engine, scheduler)
        late = scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=2), timeout=0.05)
        await asyncio.sleep(0.1)  # past its deadline while the slot is held
        engine.gate.set()
        with pytest.raises(RequestFailed, match="in the queue") as failure:
            await tokens_of(late)
        assert failure.value.error_type == "timeout"
        assert len(await tokens_of(first)) == 3
        await settled(engine, scheduler)
        assert engine.started == [first.request_id]

    with scheduling(loaded, max_batch_size=1) as (engine, scheduler):
        asyncio.run(scenario(engine, scheduler))


def test_a_slot_taken_behind_the_schedulers_back_breaks_it(loaded: LoadedModel) -> None:
    async def scenario(engine: RecordingEngine, scheduler: Scheduler) -> None:
        engine.start("leaked", [1, 2, 3], SamplingParams(max_new_tokens=4))  # while the scheduler sleeps
        queued = scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=2), timeout=0.2)  # wakes it
        await until(lambda: scheduler.broken is not None)
        assert "invariant broken" in scheduler.broken and "leaked" in scheduler.broken
        assert not scheduler.healthy
        with pytest.raises(SchedulerUnavailable, match="invariant"):
            scheduler.submit(PROMPTS[1], SamplingParams(max_new_tokens=2))
        # no slot for it: the thread sleeps until its deadline, then fails it
        with pytest.raises(RequestFailed, match="in the queue"):
            await tokens_of(queued)
        assert engine.started == ["leaked"]

    with scheduling(loaded, max_batch_size=1) as (engine, scheduler):
        asyncio.run(scenario(engine, scheduler))


def new_scheduler(engine: Engine) -> Scheduler:
    settings = tiny_settings()
    return Scheduler(engine, max_queue=settings.max_queue, max_prefill_tokens=settings.max_prefill_tokens)


def test_the_scheduler_is_unhealthy_and_refuses_requests_until_its_thread_warmed_the_engine_up(
        loaded: LoadedModel) -> None:
    engine = tiny_engine(loaded, tiny_settings(), WarmingEngine)
    scheduler = new_scheduler(engine)
    starting = threading.Thread(target=scheduler.start)  # start() returns once warm-up is done
    starting.start()
    try:
        assert engine.warming.wait(10)
        assert "warming up" in scheduler.unhealthy and not scheduler.healthy
        with pytest.raises(SchedulerUnavailable, match="warming up"):
            asyncio.run(submit_now(scheduler))
        assert starting.is_alive()
    finally:
        engine.gate.set()
        starting.join(10)
    try:
        assert scheduler.healthy and scheduler.unhealthy is None
        assert engine.warmed_in == ["medusa-scheduler"]  # the thread that will replay its graphs
    finally:
        scheduler.stop()


async def submit_now(scheduler: Scheduler) -> RequestStream:
    return scheduler.submit(PROMPTS[0], SamplingParams(max_new_tokens=2))


def test_a_failed_warm_up_fails_start(loaded: LoadedModel) -> None:
    engine = tiny_engine(loaded, tiny_settings(), WarmingEngine)
    engine.warm_up_error = RuntimeError("injected warm-up failure")
    scheduler = new_scheduler(engine)
    with pytest.raises(SchedulerUnavailable, match="injected warm-up failure"):
        scheduler.start()
    assert "injected warm-up failure" in scheduler.unhealthy


class SecondGpuEngine(Engine):
    """The tiny CPU engine claiming to live on cuda:1: what the scheduler reads to pick the GPU."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.device = torch.device("cuda", 1)


@pytest.mark.parametrize("engine_class, expected", [
    (Engine, []),  # the CPU: CUDA untouched
    (SecondGpuEngine, [(torch.device("cuda", 1), "medusa-scheduler")]),
], ids=["cpu", "cuda:1"])
def test_the_scheduler_thread_makes_the_engines_gpu_its_current_device(
        loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, engine_class: type[Engine], expected: list
) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda device: calls.append((device, threading.current_thread().name)))
    scheduler = new_scheduler(tiny_engine(loaded, tiny_settings(), engine_class))
    scheduler.start()
    scheduler.stop()
    assert calls == expected
