"""One request's parameters or failure never costs another request its output or the engine a slot.

A property test drives the speculative engine the way the scheduler does (start, chunked prefill,
steps, cancellations) with random mixes of ordinary requests, requests with extreme sampling
parameters, cancellations and injected faults, and checks the invariants after every call: every
slot free or held by exactly one live request; each ordinary request's tokens equal what it gives
alone; extreme parameters give tokens, not errors; a fault fails only the requests it hit.
"""

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medusa.engine import Engine
from medusa.tree import get_tree
from runtime.config import SamplingParams
from tests.conftest import Vocab, ours_from_hf, tiny_hf_model
from tests.medusa.test_engine_speculative import heads_for

PROMPTS = [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17], [60], [8, 8, 8, 8, 8, 1]]
ORDINARY = [SamplingParams(max_new_tokens=10),
            SamplingParams(max_new_tokens=7, temperature=0.8, seed=5),
            SamplingParams(max_new_tokens=9, temperature=1.2, top_k=20, seed=6, acceptance="typical"),
            SamplingParams(max_new_tokens=8, repetition_penalty=1.3)]
EXTREME = [SamplingParams(max_new_tokens=6, temperature=t, top_p=p, typical_p=tp, top_k=k,
                          repetition_penalty=r, seed=1, acceptance=a)
           for t, p, tp, k, r, a in [(1.0, 1e-300, 1.0, 0, 1.0, "lossless"),
                                     (1e-300, 1.0, 1.0, 0, 1.0, "lossless"),
                                     (1e300, 1.0, 1.0, 0, 1.0, "typical"),
                                     (1.0, 1.0, 1e-300, 0, 1.0, "lossless"),
                                     (0.5, 1e-300, 1e-300, 1, 1e-300, "lossless"),
                                     (2.0, 1.0, 1.0, 10**9, 1e300, "typical")]]
EXTREME.append(SamplingParams(max_new_tokens=6, repetition_penalty=1e-300))  # greedy


class FaultyEngine(Engine):
    """Raises where a model or sampling error would: in a chosen request's prefill, in its first
    token's sampling after the prompt is in the cache, in its row's part of a step (the host work
    that prepares it), or in a whole step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_prefill: set = set()
        self.fail_first_token: set = set()
        self.fail_sampling: set = set()
        self.fail_next_step = False

    def _prefill(self, pre, max_tokens):
        if pre.request_id in self.fail_prefill:
            raise RuntimeError("injected prefill fault")
        return super()._prefill(pre, max_tokens)

    def _emit(self, seq, tokens, logprobs, **kwargs):
        if seq.request_id in self.fail_first_token and not seq.generated:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return super()._emit(seq, tokens, logprobs, **kwargs)

    def _row(self, seq, speculate):
        if seq.request_id in self.fail_sampling:
            raise RuntimeError("injected sampling fault")
        return super()._row(seq, speculate)

    def _step(self, seqs):
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected step fault")
        return super()._step(seqs)


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


def new_engine(model, engine_class=Engine):
    return engine_class(model, Vocab(), (), max_batch_size=3, max_total_tokens=64, heads=heads_for(model),
                        tree=get_tree("cpu"))


@functools.cache
def alone(model, prompt: tuple[int, ...], params: SamplingParams) -> list[int]:
    return new_engine(model).generate([list(prompt)], params)[0]


REQUEST = st.tuples(
    st.sampled_from(["ordinary", "ordinary", "extreme", "cancel", "prefill fault", "sampling fault"]),
    st.integers(0, len(PROMPTS) - 1), st.integers(0, 100))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(REQUEST, min_size=1, max_size=7), chunk=st.integers(1, 5),
       step_fault_at=st.one_of(st.none(), st.integers(0, 8)))
def test_no_request_costs_another_its_output_or_a_slot(model, requests, chunk, step_fault_at):
    engine = new_engine(model, FaultyEngine)
    plan = {}
    for i, (kind, p, r) in enumerate(requests):
        sampling_only = kind == "sampling fault"  # a fault in a sampling row: give it sampled params
        params = (EXTREME[r % len(EXTREME)] if kind == "extreme"
                  else ORDINARY[1 + r % 3] if sampling_only else ORDINARY[r % len(ORDINARY)])
        plan[i] = (kind, PROMPTS[p], params, r % 4)  # cancel after this many steps
        if kind == "prefill fault":
            engine.fail_prefill.add(i)
        if sampling_only:
            engine.fail_sampling.add(i)

    tokens = {i: [] for i in plan}
    ended: dict[int, str] = {}  # id -> finish reason, 'error' or 'cancelled'
    in_failed_step: set[int] = set()
    steps_run = {i: 0 for i in plan}
    waiting = list(plan)

    def take(e):
        if e.error is not None:
            ended[e.request_id] = "error"
            return
        assert len(e.token_ids) >= 1 and 0 <= e.accepted <= len(e.token_ids)
        tokens[e.request_id] += e.token_ids
        if e.finish_reason:
            ended[e.request_id] = e.finish_reason

    step = 0
    while waiting or engine.request_ids:
        while waiting and engine.free_slots:
            i = waiting.pop(0)
            engine.start(i, plan[i][1], plan[i][2])
        for i in list(engine.prefilling):
            try:
                e = engine.prefill(i, chunk)
            except RuntimeError:
                ended[i] = "error"
                continue
            if e is not None:
                take(e)
            engine.check()
        for i in list(engine.request_ids):
            if plan[i][0] == "cancel" and steps_run[i] >= plan[i][3]:
                engine.cancel(i)
                ended[i] = "cancelled"
        running = {i for i in engine.request_ids if i not in engine.prefilling}
        engine.fail_next_step = step == step_fault_at
        try:
            for e in engine.step():
                take(e)
        except RuntimeError:
            in_failed_step |= running
            ended.update({i: "error" for i in running})
        for i in running:
            steps_run[i] += 1
        step += 1
        assert step < 100, "no progress: a request holds its slot forever"
        engine.check()
        assert engine.free_slots + len(engine.request_ids) == 3

    assert engine.free_slots == 3 and not engine.request_ids
    for i, (kind, prompt, params, _) in plan.items():
        if i in in_failed_step:
            assert ended[i] == "error"
        elif kind in ("prefill fault", "sampling fault"):
            assert ended[i] == "error", kind
        elif kind == "cancel" and ended.get(i) == "cancelled":
            assert tokens[i] == alone(model, tuple(prompt), params)[:len(tokens[i])]
        elif kind == "extreme":
            assert ended[i] in ("length", "eos_token") and len(tokens[i]) == params.max_new_tokens
        else:
            assert tokens[i] == alone(model, tuple(prompt), params), (kind, params)


def test_a_failing_prefill_sample_frees_the_slot(model):
    """Issue 12's leak: the request left the prefilling set before its first token was sampled, so a
    sampling error there freed nothing and every later request waited forever."""
    engine = new_engine(model, FaultyEngine)
    engine.fail_first_token.add("bad")
    for _ in range(8):
        engine.start("bad", PROMPTS[0], SamplingParams(max_new_tokens=8, temperature=1.0, seed=0))
        with pytest.raises(RuntimeError):
            engine.prefill("bad", 100)
        engine.check()
    assert engine.free_slots == 3
    assert engine.generate([PROMPTS[1]], ORDINARY[0]) == [alone(model, tuple(PROMPTS[1]), ORDINARY[0])]


@pytest.mark.parametrize("params", EXTREME, ids=range(len(EXTREME)))
def test_extreme_parameters_sample_without_raising(model, params):
    (out,) = new_engine(model).generate([PROMPTS[1]], params)
    assert len(out) == params.max_new_tokens


def test_a_vanishing_top_p_samples_the_argmax(model):
    """top_p = 1e-300 is 0 in float32: the nucleus must still hold the most likely token."""
    sampled = new_engine(model).generate([PROMPTS[1]], SamplingParams(max_new_tokens=10, temperature=1.0,
                                                                        top_p=1e-300, seed=3))[0]
    assert sampled == alone(model, tuple(PROMPTS[1]), SamplingParams(max_new_tokens=10))
