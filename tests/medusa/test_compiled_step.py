"""The step's device work compiles as ONE graph (`torch.compile(fullgraph=True)` raises on any graph
break, and every host synchronisation is one), and the compiled step gives what the eager one gives:
the plain tree and the shipped tree (drafted by heads, or by the draft layer), greedy, sampled,
typical and penalised rows in one batch, padded to a batch bucket as a compiled step is."""

from __future__ import annotations

import pytest
import torch

from medusa.engine import Engine
from medusa.tree import get_tree
from runtime.config import SamplingParams
from tests.conftest import GraphRecorder, Vocab, ours_from_hf, tiny_hf_model
from tests.medusa.test_engine_speculative import eagle_for, heads_for

PROMPTS = [[5, 6, 7], [11, 3, 9, 2, 40, 41, 42, 1, 17], [60], [8, 8, 8, 8, 8, 1], [9, 9]]
PARAMS = [SamplingParams(max_new_tokens=12),
          SamplingParams(max_new_tokens=12, temperature=0.8, seed=5, top_n=3, presence_penalty=-0.5),
          SamplingParams(max_new_tokens=12, temperature=1.2, top_k=20, top_p=0.9, seed=6,
                         acceptance="typical", logit_bias=((5, 1.0), (8, -2.0))),
          SamplingParams(max_new_tokens=12, repetition_penalty=1.3, frequency_penalty=0.4,
                         presence_penalty=0.3),
          SamplingParams(max_new_tokens=12, temperature=0.7, typical_p=0.8, repetition_penalty=0.8, seed=7,
                         speculate=False)]


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(tiny_hf_model("llama"))


def run(engine: Engine) -> dict[int, list[tuple[list[int], list[float]]]]:
    """Each request's (tokens, logprobs) per call, all requests in one batch; the most likely tokens'
    logprobs follow a token's where its request asks for them (top_n)."""
    out: dict[int, list[tuple[list[int], list[float]]]] = {i: [] for i in range(len(PROMPTS))}
    for e in engine.run(zip(range(len(PROMPTS)), PROMPTS, PARAMS, strict=True)):
        assert e.error is None, e.error
        assert (e.top_tokens is not None) == (PARAMS[e.request_id].top_n > 0)
        tops = [(t, lp) for top in e.top_tokens or [] for t, lp in top]
        out[e.request_id].append((e.token_ids + [t for t, _ in tops], e.logprobs + [lp for _, lp in tops]))
    return out


@pytest.mark.parametrize("tree, drafter", [(None, None), ("cpu", heads_for), ("cpu", eagle_for),
                                          ("dynamic:12,topk=3,lookup=2", eagle_for)],
                         ids=["plain", "shipped-cpu-tree", "draft-layer", "dynamic-tree"])
def test_the_step_compiles_as_one_graph_with_the_eager_outputs(model, tree, drafter):
    def engine(compile: bool) -> Engine:
        heads = None if tree is None else drafter(model)
        return Engine(model, Vocab(), (), max_batch_size=6, max_total_tokens=64, heads=heads,
                      tree=None if tree is None else get_tree(tree), compile=compile)

    eager = run(engine(False))
    compiled_engine = engine(True)  # padding to a batch bucket, attention length rounded up
    step = compiled_engine.device_step
    recorder = GraphRecorder()  # a graph break would make a second graph, or raise

    torch._dynamo.reset()
    step._fn = torch.compile(step._step, fullgraph=True, backend=recorder)
    compiled = run(compiled_engine)
    assert recorder.graphs, "the step did not go through torch.compile"
    assert compiled.keys() == eager.keys()
    for i in eager:
        assert [t for t, _ in compiled[i]] == [t for t, _ in eager[i]], PARAMS[i]
        for (_, a), (_, b) in zip(compiled[i], eager[i], strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), equal_nan=True)


def test_warming_up_the_prefill_kernels_leaves_every_sequence_as_it_was(model):
    engine = Engine(model, Vocab(), (), max_batch_size=2, max_total_tokens=256)
    tokens = engine.add("a", PROMPTS[1], PARAMS[0]).token_ids
    step = engine.device_step
    state = (*step.cache.k, *step.cache.v, step.cache.lens, step.features, step.window_tokens, step.in_prompt,
             step.counts)
    before = [t.clone() for t in state]
    with torch.inference_mode():
        step.warm_up_prefill()
    after = (*step.cache.k, *step.cache.v, step.cache.lens, step.features, step.window_tokens, step.in_prompt,
             step.counts)
    pad = step.pad_slot
    assert all(torch.equal(a[:pad], b[:pad]) for a, b in zip(after, before, strict=True))
    assert step.cache.lens[pad] == 0
    while engine.running:
        tokens += engine.step()[0].token_ids
    assert tokens == Engine(model, Vocab(), (), max_total_tokens=64).generate([PROMPTS[1]], PARAMS[0])[0]


def test_batches_past_the_largest_bucket_run_unpadded():
    from medusa.step import BATCH_BUCKETS, _batch_bucket

    assert [_batch_bucket(n) for n in (1, 3, 8, 9)] == [1, 4, 8, 16]
    assert _batch_bucket(BATCH_BUCKETS[-1] + 1) == BATCH_BUCKETS[-1] + 1


@pytest.mark.parametrize("tree", [None, "cpu"], ids=["plain", "shipped-cpu-tree"])
def test_inductor_compiles_the_served_step_and_gives_the_eager_tokens(tree):
    """Built by inductor as served on a CPU: one-row products (plain decoding of one sequence, the
    heads) through our kernel, called from a C++ wrapper in a plain step and from Python's in a
    drafting one (`DeviceStep`: the C++ wrapper of its bigger graph takes minutes to build); the heads'
    through the int8 one where they round their weights to int8."""
    from torch._inductor.utils import run_and_get_code

    served = ours_from_hf(tiny_hf_model("llama")).prepare_for_serving(packed_from_rows=2)
    heads = None if tree is None else heads_for(served)

    def engine(compile: bool) -> Engine:
        return Engine(served, Vocab(), (), max_batch_size=1, max_total_tokens=64, heads=heads,
                      tree=None if tree is None else get_tree(tree), compile=compile)

    params = SamplingParams(max_new_tokens=10)
    eager = engine(False).generate([PROMPTS[1]], params)
    torch._dynamo.reset()
    compiled, code = run_and_get_code(lambda: engine(True).generate([PROMPTS[1]], params))
    assert compiled == eager
    code = "".join(code)
    from_cpp = 'aoti_torch_call_dispatcher("medusa::rows_product"' in code
    int8 = heads is not None and heads.blocks[0][0].linear.int8_weight is not None
    from_python = f"medusa.{'int8' if int8 else 'rows'}_product.default(" in code
    assert (from_cpp, from_python) == ((True, False) if tree is None else (False, True))


@pytest.mark.parametrize("attention_length", ["cpu", "gpu"])
@pytest.mark.parametrize("tree", [None, "cpu"], ids=["plain", "shipped-cpu-tree"])
def test_warm_up_builds_every_graph_that_serving_runs(model, monkeypatch, tree, attention_length):
    """No graph is built while a request waits: after `warm_up`, a mixed load (greedy, sampled,
    penalised and non-speculating rows; batches of 1 to 5, padded to their buckets; prompts of
    several lengths) runs on the graphs it built. "gpu": the attention length a GPU compiles with
    (the whole cache), simulated here; "cpu": the length itself, symbolic after the second."""
    from medusa.step import DeviceStep

    if attention_length == "gpu":
        monkeypatch.setattr(DeviceStep, "_len_bucket", lambda self, max_len: self.cache.max_len)
    heads = None if tree is None else heads_for(model)
    engine = Engine(model, Vocab(), (), max_batch_size=5, max_total_tokens=64, heads=heads,
                    tree=None if tree is None else get_tree(tree), compile=True)
    recorder = GraphRecorder()
    torch._dynamo.reset()
    step = engine.device_step
    step._fn = torch.compile(step._step, fullgraph=True, backend=recorder)
    engine.warm_up()
    built = len(recorder.graphs)
    assert built >= 2  # greedy and the rest
    for batch in (1, 3, 5, 2):
        list(engine.run(zip(range(batch), PROMPTS[:batch], PARAMS[:batch], strict=True)))
    assert len(recorder.graphs) == built
