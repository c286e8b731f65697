"""Our CPU product kernel (`runtime/rows_product.cpp`) against its reference, `F.linear` in float64;
a row gets the same bits alone or among others; `Linear` uses it for products of as many rows as
the load measured it at most 10% slower on, while serving, and never for training; a compiled graph
calls it as it is. The layer's small steps (`runtime/layer_ops.cpp`) against their PyTorch lines."""

import logging
import time

import pytest
import torch
import torch.nn.functional as F
import transformers

from runtime import cpu_kernels
from runtime.cpu_kernels import block_weight, rows_product
from runtime.llama import (
    NEVER,
    OWN_MEASURED_ROWS,
    Linear,
    RMSNorm,
    apply_rope,
    measure_own_kernel_rows,
    pack_linears,
)
from tests.conftest import TINY, ours_from_hf, tiny_hf_model

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the output's scale


def padded_with_nan(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[rows, cols] random, contiguous, followed in memory by 9 rows of NaN: a kernel that reads past
    its last row (the blocks of 8 rows, the tails) returns NaN."""
    buf = torch.full((rows + 9, cols), float("nan"), dtype=dtype)
    buf[:rows] = torch.randn(rows, cols, generator=gen).to(dtype)
    return buf[:rows]


def blocked(weight: torch.Tensor) -> torch.Tensor:
    """`block_weight(weight)`, followed in memory by NaN as `padded_with_nan` makes it."""
    out = padded_with_nan(*weight.shape, weight.dtype, torch.Generator())
    return out.copy_(block_weight(weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows, out_features, in_features, bias", [
    (1, 64, 64, False),  # whole blocks of 16 rows
    (1, 45, 77, True),  # rows after the last block (45 = 2 x 16 + 13), an odd K (a bf16 pair's tail)
    (5, 130, 576, True),
    (12, 7, 1536, False),  # fewer rows than a block
    (11, 24, 100, True),  # 11 rows of x against a block at once
    (17, 80, 31, True),  # 16 rows of x at once, then 1; an odd K
    (37, 100, 576, True),  # AMX: panels of 4 blocks and of 2, three tiles of rows, 4 rows after the blocks
    (3, 9, 5, True),  # shorter than one vector
    (0, 8, 16, False),
    (0, 40, 16, True),  # no rows against whole blocks (a one-token prompt's logprobs)
    (4, 40, 0, True),  # a sum of nothing: the bias
])
def test_rows_product_equals_linear_in_float64(dtype, rows, out_features, in_features, bias):
    assert cpu_kernels.built()  # a C++ compiler is there: torch.compile's CPU kernels need one too
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = padded_with_nan(rows, in_features, dtype, gen)
    weight = padded_with_nan(out_features, in_features, dtype, gen)
    b = padded_with_nan(1, out_features, dtype, gen)[0] if bias else None
    got = rows_product(x, blocked(weight), b)
    assert got.shape == (rows, out_features) and got.dtype == dtype
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    scale = in_features ** 0.5  # the outputs' standard deviation
    torch.testing.assert_close(got.double(), expected, atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])
    if rows and out_features >= 16 and in_features >= 16:  # the kernel reads its own order, not W's
        misread = rows_product(x, weight, b).double()
        assert not torch.allclose(misread, expected, atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_row_gets_the_same_bits_alone_or_among_others(dtype):
    """One sum per output in a fixed order, whatever the rows and the threads' split: what lets a
    token decoded alone match the same token verified among a tree's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 576, generator=gen).to(dtype)  # [B, T, K]: leading dims kept; 24 rows: tiles of
    weight = block_weight(torch.randn(1000, 576, generator=gen).to(dtype))  # 12 (6 without AVX-512; 16
    together = rows_product(x, weight, None)  # [3, 8, 1000]                 and 8 padded with AMX)
    assert together.shape == (3, 8, 1000)
    for i in range(3):
        for j in range(8):
            assert torch.equal(rows_product(x[i, j:j + 1], weight, None), together[i, j:j + 1])


def test_bad_operands_raise_clear_errors():
    weight = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="features"):
        rows_product(torch.randn(1, 15), weight, None)
    with pytest.raises(RuntimeError, match="dtype"):
        rows_product(torch.randn(1, 16, dtype=torch.bfloat16), weight, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        rows_product(torch.randn(1, 16), torch.randn(16, 8).t(), None)
    with pytest.raises(RuntimeError, match="bias"):
        rows_product(torch.randn(1, 16), weight, torch.randn(7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        rows_product(torch.randn(1, 16, dtype=torch.float16), weight.half(), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        block_weight(weight.half())


def test_linear_serves_one_row_through_it_and_trains_without_it():
    torch.manual_seed(0)
    linear = Linear(64, 40)
    x1, x3 = torch.randn(1, 1, 64), torch.randn(1, 3, 64)
    linear.pack()
    with torch.no_grad():
        assert torch.equal(linear(x1), rows_product(x1, block_weight(linear.weight), linear.bias))
        assert not torch.equal(linear(x3), rows_product(x3, linear.own_weight, linear.bias))  # oneDNN or MKL
    linear.unpack()
    assert linear.own_weight is None
    y = linear(x1)
    y.sum().backward()  # autograd: `rows_product` has no derivative, so training must not reach it
    assert linear.weight.grad is not None


def test_the_load_gives_it_the_sizes_it_is_measured_faster_on(monkeypatch):
    model = ours_from_hf(tiny_hf_model("llama"))
    pack_linears(model, from_rows=1000)  # products of a few rows: ours or MKL (`F.linear`)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    measured = measure_own_kernel_rows(model)
    assert measured in (0, *OWN_MEASURED_ROWS)
    assert {m.own_kernel_rows for m in linears} == {measured}

    # Made slow by fixed waits, the tiny model's products time as the waits say: ours faster up to
    # 4 rows, then slower than the libraries.
    ours, mkl = cpu_kernels.rows_product, F.linear

    def ours_slower_from_5_rows(x, weight, bias):
        time.sleep(0.003 if x.numel() > 4 * x.shape[-1] else 0)
        return ours(x, weight, bias)

    def slow_mkl(x, weight, bias=None):
        time.sleep(0.001)
        return mkl(x, weight, bias)

    monkeypatch.setattr(cpu_kernels, "rows_product", ours_slower_from_5_rows)
    monkeypatch.setattr(F, "linear", slow_mkl)
    pack_linears(model, from_rows=1000)  # our copies again, where the first measurement dropped them
    assert measure_own_kernel_rows(model) == 4
    assert {m.own_kernel_rows for m in linears} == {4}
    with torch.no_grad():
        x4, x5 = torch.randn(4, 64), torch.randn(5, 64)
        assert torch.equal(model.lm_head(x4), ours(x4, model.lm_head.own_weight, None))
        assert not torch.equal(model.lm_head(x5), ours(x5, model.lm_head.own_weight, None))

    # as slow as the libraries, within the timing's noise (waits long against it): every size, for rows
    # that keep their bits
    monkeypatch.setattr(cpu_kernels, "rows_product", lambda x, w, b: time.sleep(0.004) or ours(x, w, b))
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: time.sleep(0.004) or mkl(x, w, b))
    assert measure_own_kernel_rows(model) == OWN_MEASURED_ROWS[-1]
    monkeypatch.setattr(F, "linear", slow_mkl)
    monkeypatch.setattr(cpu_kernels, "rows_product", lambda x, w, b: time.sleep(0.003) or ours(x, w, b))
    assert measure_own_kernel_rows(model) == 0  # slower even on one row: never used
    assert {m.own_weight for m in linears} == {None}  # nor its copy kept
    monkeypatch.setattr(cpu_kernels, "built", lambda: False)
    pack_linears(model, from_rows=1000)
    assert measure_own_kernel_rows(model) == 0  # not built: not measured


@pytest.mark.skipif(not cpu_kernels.built(), reason="no C++ compiler to build our CPU kernels")
def test_where_the_libraries_emulate_bf16_ours_takes_every_size_it_keeps_up_at(monkeypatch):
    """bf16 without a oneDNN copy (a CPU without AVX-512): ours past the sizes timed, a prefill too,
    once it kept up at all of them; not where it fell behind, nor in float32 or beside oneDNN."""
    mkl = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: time.sleep(0.002) or mkl(x, w, b))  # slow libraries

    def measured(dtype, packable: bool) -> int:
        model = ours_from_hf(tiny_hf_model("llama")).to(dtype)
        monkeypatch.setattr(Linear, "packable", property(lambda self: packable))
        pack_linears(model, from_rows=NEVER)  # products through ours or MKL
        return measure_own_kernel_rows(model)

    assert measured(torch.bfloat16, packable=False) == NEVER
    assert measured(torch.bfloat16, packable=True) == OWN_MEASURED_ROWS[-1]
    assert measured(torch.float32, packable=False) == OWN_MEASURED_ROWS[-1]
    ours = cpu_kernels.rows_product
    def ours_behind_from_5_rows(x, w, b):  # then it keeps the sizes it kept up at
        return time.sleep(0.006 if x.numel() > 4 * x.shape[-1] else 0) or ours(x, w, b)

    monkeypatch.setattr(cpu_kernels, "rows_product", ours_behind_from_5_rows)
    assert measured(torch.bfloat16, packable=False) == 4


def test_a_compiled_graph_calls_it_as_it_is():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    linear = Linear(64, 96)
    linear.pack()
    compiled = torch.compile(lambda x: linear(F.silu(x)), dynamic=False)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        out, code = run_and_get_code(compiled, x)
        assert torch.equal(out, rows_product(F.silu(x), linear.own_weight, linear.bias))
    assert "medusa.rows_product" in "".join(code)


def test_without_a_compiler_it_warns_and_is_not_used(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def fail(*args, **kwargs):
        raise RuntimeError("Error building extension: c++ not found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    with caplog.at_level(logging.WARNING, logger="runtime.cpu_kernels"):
        assert cpu_kernels.built.__wrapped__() is False
    assert "c++ not found" in caplog.text
    monkeypatch.setattr(cpu_kernels, "built", lambda: False)
    linear = Linear(64, 40)
    linear.pack()
    x = torch.randn(1, 64)
    assert linear.own_kernel_rows == 0
    with torch.no_grad():
        torch.testing.assert_close(linear(x), F.linear(x, linear.weight, linear.bias))  # oneDNN or MKL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_layer_steps_equal_their_pytorch_lines_and_keep_a_rows_bits(dtype):
    """`rms_norm`, `rope`, `silu_mul` (layer_ops.cpp) against the lines of `runtime.llama` they stand
    for, within a rounding of the dtype; each row the same alone or among others."""
    assert cpu_kernels.built()
    gen = torch.Generator().manual_seed(7)
    tol = {"atol": TOLERANCE[dtype], "rtol": TOLERANCE[dtype]}
    norm = RMSNorm(77, 1e-5)  # 77: whole vectors and a tail
    with torch.no_grad():
        norm.weight.copy_(torch.randn(77, generator=gen))
    norm = norm.to(dtype)
    x = (3 * torch.randn(2, 5, 77, generator=gen)).to(dtype)
    # [B, T, heads, D]: rotate the first 5 (D 64 in whole vectors; the tiny models have D 16, one by one)
    qkv = torch.randn(2, 5, 7, 64, generator=gen).to(dtype)
    cos, sin = (torch.randn(2, 5, 1, 64, generator=gen).to(dtype) for _ in range(2))
    gate_up = (4 * torch.randn(2, 5, 2 * 40, generator=gen)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    # (ours, reference), each over tokens [t0, t1)
    steps = [(lambda t0, t1: norm(x[:, t0:t1], ours=True), lambda t0, t1: norm(x[:, t0:t1])),
             (lambda t0, t1: cpu_kernels.rope(*(a[:, t0:t1].contiguous() for a in (qkv, cos, sin)), 5),
              lambda t0, t1: apply_rope(qkv[:, t0:t1, :5], cos[:, t0:t1], sin[:, t0:t1])),
             (lambda t0, t1: cpu_kernels.silu_mul(gate_up[:, t0:t1]),
              lambda t0, t1: F.silu(gate[:, t0:t1]) * up[:, t0:t1])]
    with torch.no_grad():
        for ours, reference in steps:
            got = ours(0, 5)
            assert got.dtype == dtype
            torch.testing.assert_close(got, reference(0, 5), **tol)
            for t in range(5):
                assert torch.equal(ours(t, t + 1), got[:, t:t + 1])
    assert not torch.equal(cpu_kernels.silu_mul(gate_up), (gate * up))  # negative control: silu is applied


def test_argmax_and_logsumexp_are_pytorchs_and_never_pick_nan():
    """Each row's argmax, the first of equal maxima wherever they lie (one vector lane, two lanes, the
    tail past the last whole vector), and the logsumexp of the rows a path names; NaN counts as -inf."""
    assert cpu_kernels.built()
    inf, nan = float("inf"), float("nan")
    x = 4 * torch.randn(3, 6, 1007, generator=torch.Generator().manual_seed(0))  # 1007 = 62 * 16 + 15
    for row, (a, b) in enumerate([(16, 32), (33, 17), (995, 1000), (3, 1003), (500, 10)]):
        x[0, row, [a, b]] = 50.0
    x[1, 0] = -inf  # nothing finite: index 0, logsumexp -inf
    x[1, 1] = nan
    x[1, 2, ::2] = nan  # NaN is never the argmax nor in the sum
    x[1, 3, 7] = inf
    best = cpu_kernels.argmax_rows(x)
    clean = x.nan_to_num(nan=-inf, posinf=inf, neginf=-inf)
    assert torch.equal(best, clean.argmax(-1))
    assert best[0, :5].tolist() == [16, 17, 995, 3, 10]
    assert not torch.equal(best, x.argmax(-1))  # negative control: PyTorch's argmax picks a NaN
    path = torch.tensor([[0, 4, 5, 0], [0, 1, 2, 3], [5, 0, 5, 2]])  # a path repeats its root past its end
    lse = cpu_kernels.logsumexp_at(x, path)
    torch.testing.assert_close(lse, clean.logsumexp(-1).gather(1, path), rtol=1e-6, atol=1e-5)
    assert lse[1].tolist()[:2] == [-inf, -inf] and lse[1, 3] == inf
    assert not torch.equal(lse[2], clean.logsumexp(-1)[2, :4])  # negative control: the rows named
    with pytest.raises(RuntimeError, match="outside the rows"):
        cpu_kernels.logsumexp_at(x, torch.tensor([[6]] * 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_serving_on_the_cpu_a_chain_verified_together_gets_the_bits_of_its_tokens_one_by_one(dtype):
    """What makes greedy speculation token-exact in either dtype: with our kernels for the products
    (as far as they take the tree's rows), the attention and the steps between, no operation's rows
    depend on how many rows its call had (`benchmarks.divergence`, which runs the layers step by step:
    the same kernels, the same bits as one call)."""
    from benchmarks import divergence

    model = ours_from_hf(tiny_hf_model("smollm")).to(dtype).prepare_for_serving(1, 16)
    tokens = torch.arange(3, 23)[None]  # [1, 20]
    exact = divergence.compare(model, tokens, k=8)
    assert exact["sources"] == {} and exact["final_equal"]
    # negative control: a norm whose rows shift with the number of rows in its call is caught
    norm = model.layers[0].attn_norm
    hook = norm.register_forward_hook(lambda module, args, out: out + 1e-2 * out.shape[1])
    try:
        assert not divergence.compare(model, tokens, k=8)["final_equal"]
    finally:
        hook.remove()


def tiny_with_mlp(family: str):
    """A tiny model of `family`; "mlp120": SmolLM's shape with an MLP 120 wide, not whole blocks of 16
    (the SwiGLU product then multiplies, then takes each row's SwiGLU)."""
    if family != "mlp120":
        return tiny_hf_model(family)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY | {"intermediate_size": 120}, tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["smollm", "qwen2", "mlp120"])  # qwen2: a QKV bias
def test_a_layer_in_one_call_gives_the_bits_of_its_steps_one_by_one(family, dtype):
    """Every layer in one call to our kernels (`decoder_layers`) against the same kernels step by step
    (`Block.forward`): equal hidden states and caches, for one token, for trees of two scattered
    sequences, and for a prompt's chunk of 24 tokens (AMX: more than a tile of rows)."""
    assert cpu_kernels.built()
    model = ours_from_hf(tiny_with_mlp(family)).to(dtype).prepare_for_serving(1, 32)
    assert model.layer_kernels is not None and model.layer_kernels[1] == 32  # else one call never runs
    gen = torch.Generator().manual_seed(1)
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]])  # two trees of 4 nodes: [B, T]
    masks = torch.eye(4, dtype=torch.bool).repeat(2, 1, 1)  # [B, T, T] ancestor masks
    for node in range(1, 4):
        masks[torch.arange(2), node] |= masks[torch.arange(2), parents[:, node]]
    results = []
    for one_call in (True, False):
        cache = model.new_cache(4, 40)
        slots = torch.tensor([3, 1])
        with torch.inference_mode():
            for slot, n in zip(slots.tolist(), (9, 14), strict=True):  # prompts, through PyTorch (SDPA)
                one = torch.tensor([slot])
                model(torch.randint(0, 90, (1, n), generator=gen), torch.arange(n)[None], cache, one)
                cache.advance(one, n)
            one = slots[:1]
            token = model(torch.tensor([[5]]), torch.tensor([[9]]), cache, one, one_call_layers=one_call)
            depths = (masks.sum(-1) - 1) + cache.lens[slots][:, None]  # [B, T]
            trees = model(torch.randint(0, 90, (2, 4), generator=gen), depths, cache, slots, masks,
                          one_call_layers=one_call)
            two = slots[1:]
            positions = cache.lens[two][:, None] + torch.arange(24)  # [1, 24]
            chunk = model(torch.randint(0, 90, (1, 24), generator=gen), positions, cache, two,
                          one_call_layers=one_call)
        results.append([token, trees, chunk, *cache.k, *cache.v])
        gen.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_the_layers_in_one_call_refuse_operand_lists_of_unequal_lengths():
    """`decoder_layers` loops over its lists together: one that is a layer short is a clear error, not
    a read past its end."""
    assert cpu_kernels.built()
    model = ours_from_hf(tiny_hf_model("smollm")).prepare_for_serving(1, 16)
    lists, _ = model.layer_kernels
    cache = model.new_cache(2, 16)
    C, D = model.config.hidden_size, model.config.head_dim
    cos, sin = torch.ones(1, 1, 1, D), torch.zeros(1, 1, 1, D)
    short = [list(o) for o in lists]
    short[3] = short[3][:-1]  # the o projections: one fewer than the layers
    slots = lens = torch.tensor([0])
    with pytest.raises(RuntimeError, match="one of each operand a layer"):
        cpu_kernels.decoder_layers(torch.randn(1, 1, C), *short, model.config.rms_norm_eps, cos, sin, cache.k,
                                   cache.v, slots, lens, None, model.config.num_heads)


@pytest.mark.parametrize("flags, products", [("fpu avx512f avx512_bf16 amx_bf16 amx_tile", "amx"),
                                             ("fpu avx512f avx512_bf16 avx512_vnni", "avx512"),
                                             ("fpu avx2 fma f16c", "emulated")])
def test_how_the_cpu_multiplies_bf16_comes_from_its_flags(monkeypatch, flags, products):
    monkeypatch.setattr(cpu_kernels, "cpuinfo", lambda: f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_kernels.cpu_bf16_products() == products
    assert cpu_kernels.cpu_has_bf16_products() == (products != "emulated")
