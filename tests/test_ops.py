"""Numerics of lora_linear: forward and every gradient against float64, odd shapes, dropout, layouts."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_rule, check_empty_batch, dropout_case, make_inputs, torch_lora

import lora_ext

# (M, K, N, r): shapes that miss every tile, r = 1, a decode-sized M, a larger square one.
SHAPES = [(37, 129, 67, 5), (1, 8, 3, 1), (64, 64, 64, 16), (300, 96, 40, 8)]
STRATEGIES = ["auto", "shrink_expand", "merge"]
SCALE = 1.75


def _run(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    x, w, a, b, bias = leaves
    y = fn(x, w, a, b, bias)
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wrt, grad)
    return y.detach(), grads


def _check_all(dtype, inputs, fn, keep=None, p=0.0, grad_seed=1):
    g64 = torch.randn(
        *inputs[0].shape[:-1],
        inputs[1].shape[0],
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(grad_seed),
    )
    ours = _run(fn, inputs, g64.to(dtype))
    ref = _run(
        lambda x, w, a, b, bias: torch_lora(x, w, a, b, SCALE, bias, keep=keep, p=p),
        [t.double() if t is not None else None for t in inputs],
        g64,
    )
    plain = _run(lambda x, w, a, b, bias: torch_lora(x, w, a, b, SCALE, bias, keep=keep, p=p), inputs, g64.to(dtype))
    assert_rule("y", ours[0], ref[0], plain[0], dtype)
    names = ["grad_x", "grad_weight", "grad_A", "grad_B", "grad_bias"]
    for name, o, r, t in zip(names, ours[1], ref[1], plain[1]):
        assert_rule(name, o, r, t, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_and_all_grads_match_float64(dtype, shape, strategy, bias):
    m, k, n, r = shape
    inputs = make_inputs(m, k, n, r, dtype, bias=bias)
    _check_all(
        dtype,
        inputs,
        lambda x, w, a, b, bb: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=strategy),
    )


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout_matches_explicit_mask(dtype, p):
    inputs, keep, fused = dropout_case(45, 70, 33, 4, dtype, p, SCALE)
    _check_all(dtype, inputs, fused, keep=keep, p=p)


def test_dropout_mask_statistics():
    p = 0.3
    keep = lora_ext.dropout_mask(torch.tensor(987654321987, dtype=torch.int64), 1000, 1000, p).double()
    assert abs(keep.mean().item() - (1 - p)) < 0.003
    # rows and columns independent: their means spread like binomial(1000, 0.7)/1000
    sd = (p * (1 - p) / 1000) ** 0.5
    assert keep.mean(0).std().item() < 1.5 * sd
    assert keep.mean(1).std().item() < 1.5 * sd
    other = lora_ext.dropout_mask(torch.tensor(987654321988, dtype=torch.int64), 1000, 1000, p)
    assert (other.double() != keep).double().mean().item() > 0.35  # nearby seeds decorrelated


def test_dropout_mask_compiled_equals_reference():
    from lora_ext.ops import reference as _reference

    for seed in [0, 1, -1, 2**40 + 7, -(2**62)]:
        s = torch.tensor(seed, dtype=torch.int64)
        for p in [0.0, 0.05, 0.5, 0.999, 1.0]:
            assert torch.equal(lora_ext.dropout_mask(s, 13, 77, p), _reference.dropout_mask(s, 13, 77, p))


def test_dropout_reproducible_with_manual_seed_and_varies_otherwise():
    x, w, a, b, _ = make_inputs(16, 32, 24, 4, torch.float32)
    torch.manual_seed(5)
    y1 = lora_ext.lora_linear(x, w, a, b, 2.0, dropout_p=0.4)
    torch.manual_seed(5)
    y2 = lora_ext.lora_linear(x, w, a, b, 2.0, dropout_p=0.4)
    y3 = lora_ext.lora_linear(x, w, a, b, 2.0, dropout_p=0.4)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_dropout_only_touches_the_lora_branch():
    x, w, a, b, bias = make_inputs(16, 32, 24, 4, torch.float32)
    base = torch.nn.functional.linear(x, w, bias)
    y = lora_ext.lora_linear(x, w, a, torch.zeros_like(b), 2.0, bias=bias, dropout_p=0.9)
    torch.testing.assert_close(y, base, rtol=1e-6, atol=1e-6)


def test_dropout_p_one_drops_the_whole_branch():
    inputs = make_inputs(9, 12, 7, 3, torch.float32)
    x, w, a, b, bias = (t.requires_grad_(True) for t in inputs)
    y = lora_ext.lora_linear(x, w, a, b, 2.0, bias=bias, dropout_p=1.0)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias))
    y.sum().backward()
    assert torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0
    torch.testing.assert_close(x.grad, w.sum(0).expand_as(x))


def test_leading_batch_dims_and_1d_input():
    x, w, a, b, bias = make_inputs(5, 16, 12, 2, torch.float32, batch=(2, 3))
    y = lora_ext.lora_linear(x, w, a, b, 0.5, bias=bias)
    assert y.shape == (2, 3, 5, 12)
    flat = lora_ext.lora_linear(x.reshape(-1, 16), w, a, b, 0.5, bias=bias)
    torch.testing.assert_close(y.reshape(-1, 12), flat, rtol=0, atol=0)
    y1 = lora_ext.lora_linear(x[0, 0, 0], w, a, b, 0.5, bias=bias)
    assert y1.shape == (12,)
    torch.testing.assert_close(y1, flat[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous_and_offset_inputs(dtype):
    x, w, a, b, bias = make_inputs(40, 24, 18, 3, dtype)
    expected = lora_ext.lora_linear(x, w, a, b, 1.5, bias=bias)
    x_t = x.t().contiguous().t()  # column-major
    x_off = torch.cat([torch.zeros(3, 24, dtype=dtype), x])[3:]  # storage offset
    x_strided = torch.stack([x, x], dim=-1)[..., 0]  # inner stride 2
    w_t = w.t().contiguous().t()
    for xx in (x_t, x_off, x_strided):  # BLAS may sum in another order for another layout: last-bit slack
        torch.testing.assert_close(lora_ext.lora_linear(xx, w, a, b, 1.5, bias=bias), expected)
    torch.testing.assert_close(lora_ext.lora_linear(x, w_t, a.t().contiguous().t(), b, 1.5, bias=bias), expected)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_expanded_grad_output(strategy):
    inputs = make_inputs(21, 19, 11, 3, torch.float32)
    leaves = [t.requires_grad_(True) for t in inputs]
    y = lora_ext.lora_linear(*leaves[:4], 0.8, bias=leaves[4], strategy=strategy)
    g_expanded = torch.randn(1, 11).expand(21, 11)  # stride-0 rows
    got = torch.autograd.grad(y, leaves, g_expanded)
    y = lora_ext.lora_linear(*leaves[:4], 0.8, bias=leaves[4], strategy=strategy)
    want = torch.autograd.grad(y, leaves, g_expanded.contiguous())
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch(dtype):
    check_empty_batch(dtype)


def test_frozen_base_only_adapter_grads():
    x, w, a, b, bias = make_inputs(10, 12, 6, 2, torch.float32)
    a.requires_grad_(True)
    b.requires_grad_(True)
    y = lora_ext.lora_linear(x, w, a, b, 1.0, bias=bias)
    y.square().sum().backward()
    assert x.grad is None and w.grad is None and bias.grad is None
    assert a.grad is not None and b.grad is not None


def test_strategy_plan_follows_cost_model():
    if not lora_ext.extension_loaded():
        assert lora_ext.strategy_plan(8192, 1024, 1024, torch.float32)["forward"] == "reference"
        return
    big = lora_ext.strategy_plan(8192, 1024, 1024, torch.float32)
    small = lora_ext.strategy_plan(16, 1024, 1024, torch.float32)
    assert big == {"forward": "merge", "backward": "merge"}
    assert small == {"forward": "shrink_expand", "backward": "shrink_expand"}
    assert lora_ext.strategy_plan(8192, 1024, 1024, torch.float32, dropout_p=0.1)["forward"] == "shrink_expand"
    assert lora_ext.strategy_plan(16, 1024, 1024, torch.float32, strategy="merge")["forward"] == "merge"
    # CUDA keeps W_eff in bf16, so at the GPU goal shape merging costs half of the extra passes
    assert lora_ext.strategy_plan(8192, 4096, 4096, torch.bfloat16, device="cuda")["forward"] == "merge"
    assert lora_ext.strategy_plan(8192, 4096, 4096, torch.bfloat16, device="cpu")["forward"] == "shrink_expand"


def test_cpu_strategy_thresholds_are_the_measured_ones():
    """The CPU crossovers of csrc/host/strategy.h (set from benchmarks.bench_cpu_kernels --strategy):
    forward merges from M > K (K = N), the backward from M > 2.25 N; CUDA's backward keeps M > 1.5 N."""
    if not lora_ext.extension_loaded():
        pytest.skip("compiled library not loaded")

    def plan(m, device="cpu"):
        return lora_ext.strategy_plan(m, 1024, 1024, torch.float32, device=device)

    assert plan(1024)["forward"] == "shrink_expand" and plan(1025)["forward"] == "merge"
    assert plan(2304)["backward"] == "shrink_expand" and plan(2305)["backward"] == "merge"
    assert plan(1536, "cuda")["backward"] == "shrink_expand" and plan(1537, "cuda")["backward"] == "merge"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_runs_in_the_autocast_dtype(dtype):
    inputs = make_inputs(17, 24, 12, 3, torch.float32)
    x, w, a, b, bias = (t.requires_grad_(True) for t in inputs)
    with torch.autocast("cpu", dtype=dtype):
        y = lora_ext.lora_linear(x, w, a, b, 0.5, bias=bias)
    assert y.dtype == dtype
    want = lora_ext.lora_linear(*(t.detach().to(dtype) for t in (x, w, a, b)), 0.5, bias=bias.detach().to(dtype))
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0
