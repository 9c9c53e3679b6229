"""LoRA over an NF4 base (lora_linear_nf4): outputs and gradients against the
float64 reference on the dequantized weight (docs/design.md §4 rule), dispatcher
registration, and the no-persistent-weight contract."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, DTYPE_IDS, DTYPES, assert_rule, torch_lora

import lora_ext

SHAPES = [  # (M, K, N, r, blocksize)
    (37, 129, 67, 5, 64),
    (8, 64, 32, 1, 32),
    (1, 33, 7, 3, 64),
    (64, 256, 96, 16, 128),
    (5, 97, 1025, 4, 64),
]


def make(m, k, n, r, blocksize, dtype, bias=True, seed=0, double_quant=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g) / k**0.5
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5
    bb = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    qw = lora_ext.quantize_nf4(w.to(dtype if dtype != torch.float64 else torch.float32), blocksize, double_quant)
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_()  # noqa: E731
    return cast(x), qw, cast(a), cast(b), cast(bb)


def grads(y, inputs, g):
    ins = [t for t in inputs if t is not None]
    out = torch.autograd.grad(y, ins, g)
    it = iter(out)
    return [None if t is None else next(it) for t in inputs]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_rule(shape, dtype, bias):
    m, k, n, r, bs = shape
    x, qw, a, b, bb = make(m, k, n, r, bs, dtype, bias)
    scale = 0.75
    w = lora_ext.dequantize_nf4(qw, dtype)  # the weight the op computes with
    y = lora_ext.lora_linear_nf4(x, qw, a, b, scale, bb)
    g = torch.randn_like(y)
    got = grads(y, [x, a, b, bb], g)

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    bb64 = None if bb is None else bb.detach().double().requires_grad_()
    y64 = torch_lora(x64, w.double(), a64, b64, scale, bb64)
    ref = grads(y64, [x64, a64, b64, bb64], g.double())

    xt, at, bt = (t.detach().requires_grad_() for t in (x, a, b))
    bbt = None if bb is None else bb.detach().requires_grad_()
    yt = torch_lora(xt, w, at, bt, scale, bbt)
    plain = grads(yt, [xt, at, bt, bbt], g)

    assert_rule("y", y, y64, yt, dtype)
    for name, o, r_, p in zip(("grad_x", "grad_A", "grad_B", "grad_bias"), got, ref, plain):
        if r_ is not None:
            assert_rule(name, o, r_, p, dtype)


def test_equals_lora_linear_on_dequantized_weight():
    """Same function as lora_ext.lora_linear over the dequantized weight, dropout mask included."""
    x, qw, a, b, bb = make(23, 130, 40, 4, 64, torch.float32)
    w = lora_ext.dequantize_nf4(qw, torch.float32)
    for p in (0.0, 0.3):
        torch.manual_seed(5)
        y = lora_ext.lora_linear_nf4(x, qw, a, b, 0.5, bb, p)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, a, b, bb], gy)
        torch.manual_seed(5)
        y2 = lora_ext.lora_linear(x, w, a, b, 0.5, bb, p)
        ref = torch.autograd.grad(y2, [x, a, b, bb], gy)
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
        for o, r_ in zip(got, ref):
            torch.testing.assert_close(o, r_, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    x, qw, a, b, bb = make(6, 70, 9, 3, 32, torch.float64)

    def f(x, a, b, bb):
        return lora_ext.lora_linear_nf4(x, qw, a, b, 0.7, bb)

    assert torch.autograd.gradcheck(f, (x, a, b, bb), eps=1e-6, atol=1e-6)


def test_leading_dims_noncontiguous_and_empty():
    x, qw, a, b, bb = make(12, 64, 20, 2, 64, torch.float32)
    w = lora_ext.dequantize_nf4(qw, torch.float32)
    x3 = x.detach().view(3, 4, 64).transpose(0, 1)  # non-contiguous [4, 3, 64]
    y = lora_ext.lora_linear_nf4(x3, qw, a, b, 2.0, bb)
    assert y.shape == (4, 3, 20)
    torch.testing.assert_close(y, torch_lora(x3, w, a, b, 2.0, bb), atol=1e-5, rtol=1e-5)
    x0 = torch.empty(0, 64, requires_grad=True)
    y0 = lora_ext.lora_linear_nf4(x0, qw, a, b, 2.0, bb)
    assert y0.shape == (0, 20)
    ga, gb = torch.autograd.grad(y0.sum(), [a, b])
    assert (ga == 0).all() and (gb == 0).all()


def test_frozen_base_gets_no_weight_state_and_no_full_weight_is_saved():
    """Autograd saves x, the quantized tensors and the adapter; nothing of shape [N, K] in float."""
    x, qw, a, b, bb = make(16, 256, 128, 4, 64, torch.bfloat16)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_ext.lora_linear_nf4(x, qw, a, b, 1.0, bb)
    assert all(not (shape == (128, 256) and dt.is_floating_point) for shape, dt in saved), saved
    assert ((16, 256), torch.bfloat16) in saved  # x
    y.sum().backward()


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_opcheck(double_quant):
    x, qw, a, b, bb = make(9, 96, 17, 3, 64, torch.float32, double_quant=double_quant)
    args = (x, *qw.op_args(), 17, bb, a, b, 0.5, 0.0, None)
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_nf4.default, args)
    seed = torch.tensor(11, dtype=torch.int64)
    args_p = (x, *qw.op_args(), 17, bb, a, b, 0.5, 0.25, seed)
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_nf4.default, args_p)
    g = torch.randn(9, 17)
    bargs = (g, x.detach(), *qw.op_args(), 17, a.detach(), b.detach(), 0.5, 0.0, None, [True, True, True, True])
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_nf4_backward.default, bargs)


def test_torch_compile_fullgraph():
    x, qw, a, b, bb = make(8, 64, 16, 2, 64, torch.float32)

    def f(x, a, b, bb):
        return lora_ext.lora_linear_nf4(x, qw, a, b, 0.5, bb)

    y_ref = f(x, a, b, bb)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, a, b, bb)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert a.grad is not None and b.grad is not None


def test_bad_adapter_shapes_raise_named_errors():
    x, qw, a, b, bb = make(4, 64, 16, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="lora_A"):
        lora_ext.lora_linear_nf4(x, qw, a[:, :10], b, 1.0)
    with pytest.raises(ValueError, match="lora_B"):
        lora_ext.lora_linear_nf4(x, qw, a, b[:3], 1.0)
    with pytest.raises(ValueError, match="x has K"):
        lora_ext.lora_linear_nf4(x[:, :10], qw, a, b, 1.0)
    with pytest.raises(TypeError, match="NF4Weight"):
        lora_ext.lora_linear_nf4(x, torch.randn(16, 64), a, b, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        lora_ext.lora_linear_nf4(x, qw, a.double(), b, 1.0)
    with pytest.raises(ValueError, match="scale"):
        lora_ext.lora_linear_nf4(x, qw, a, b, float("nan"))


def test_fallback_registered_only_where_no_compiled_kernel():
    from lora_ext.ops import _library

    for name in _library.OPS:
        keys = _library.fallback_dispatch_keys(name)
        compiled_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{name}", "CPU")
        assert compiled_cpu, name  # something serves CPU
        if not lora_ext.extension_loaded():
            assert "CPU" in keys


_ = ATOL


def test_linear_nf4_training_saves_no_full_weight():
    """A LinearNF4 without adapter inside a trained model: grad to x flows, W is not kept for backward."""
    layer = lora_ext.LinearNF4.from_linear(torch.nn.Linear(256, 128))
    x = torch.randn(8, 256, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert all(not (shape == (128, 256) and dt.is_floating_point) for shape, dt in saved), saved
    (gx,) = torch.autograd.grad(y.sum(), [x])
    w = layer.dequantize(torch.float32)
    torch.testing.assert_close(gx, torch.ones(8, 128) @ w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)


def test_lora_linear_accepts_nf4_weight():
    """lora_ext.lora_linear(x, NF4Weight, ...) is lora_linear_nf4, gradients included."""
    g = torch.Generator().manual_seed(7)
    qw = lora_ext.quantize_nf4(torch.randn(24, 40, generator=g), blocksize=64)
    x = torch.randn(5, 40, generator=g, requires_grad=True)
    a = torch.randn(3, 40, generator=g, requires_grad=True)
    b = torch.randn(24, 3, generator=g, requires_grad=True)
    y = lora_ext.lora_linear(x, qw, a, b, 0.5)
    y_ref = lora_ext.lora_linear(x, lora_ext.dequantize_nf4(qw, torch.float32), a, b, 0.5)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    for got, want in zip(torch.autograd.grad(y, (x, a, b), gy), torch.autograd.grad(y_ref, (x, a, b), gy)):
        torch.testing.assert_close(got, want)
