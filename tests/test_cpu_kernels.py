"""The fused CPU kernel variants (csrc/cpu/kernels): every variant this CPU runs, forced
through lora_ext._C.set_cpu_kernel, against float64 with the tolerance rule of conftest.py.

Covers lora_linear forward and every gradient (autograd and the raw ops), merge_/unmerge_/
merged_weight, fp32/bf16/fp16, odd shapes, r = 1 ... 128 and r = 129 (the ATen fallback),
M = 1 and M = 0, dropout, non-contiguous x, an expanded grad and partial output masks.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPE_IDS,
    DTYPES,
    assert_rule,
    check_empty_batch,
    dropout_case,
    make_inputs,
    requires_extension,
    torch_lora,
)
from torch.utils._python_dispatch import TorchDispatchMode

import lora_ext

pytestmark = requires_extension

VARIANTS = ["default", "avx2", "avx512"]
SCALE = 1.75
# (M, K, N, r): odd sizes that miss every vector and tile, r = 1, 16, 128, the fallback 129, M = 1
# (520, 129, 67, 16): three row steps of the fused kernels, split over the threads (partial sums reduced)
# (45, 521, 67, 16), (33, 1031, 61, 8): shrink_t's k chunks (256 at r = 16, and 512 at r = 8 in the AVX-512
# pair form), the last one odd
SHAPES = [
    (37, 129, 67, 5),
    (37, 129, 67, 1),
    (70, 96, 80, 16),
    (23, 136, 72, 128),
    (19, 40, 30, 129),
    (1, 129, 67, 5),
    (520, 129, 67, 16),
    (45, 521, 67, 16),
    (33, 1031, 61, 8),
]
STRATEGY_CODES = {"auto": 0, "shrink_expand": 1, "merge": 2}


def _C():
    from lora_ext.ops import _loader

    return _loader._C


@pytest.fixture(params=VARIANTS)
def variant(request):
    name = request.param
    C = _C()
    if not C.cpu_kernel_variants()[name]:
        needs = "AVX-512 F/BW/VL/DQ" if name == "avx512" else "AVX2/FMA/F16C"
        pytest.skip(f"this CPU cannot run the '{name}' kernels (needs {needs})")
    before = C.cpu_kernel()
    assert C.set_cpu_kernel(name) == name
    assert C.cpu_kernel() == name
    yield name
    C.set_cpu_kernel(before)


def _run(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], grad)
    return y.detach(), grads


def _check_all(dtype, inputs, fn, keep=None, p=0.0, grad=None):
    x, w = inputs[0], inputs[1]
    if grad is None:
        grad = torch.randn(*x.shape[:-1], w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref_fn = lambda x, w, a, b, bias: torch_lora(x, w, a, b, SCALE, bias, keep=keep, p=p)  # noqa: E731
    ours = _run(fn, inputs, grad.to(dtype))
    ref = _run(ref_fn, [t.double() if t is not None else None for t in inputs], grad.double())
    plain = _run(ref_fn, inputs, grad.to(dtype))
    assert_rule("y", ours[0], ref[0], plain[0], dtype)
    for name, o, r, t in zip(["grad_x", "grad_weight", "grad_A", "grad_B", "grad_bias"], ours[1], ref[1], plain[1]):
        assert_rule(name, o, r, t, dtype)


def test_cpu_kernels_run_on_torchs_threads():
    """The library is compiled with OpenMP: its at::parallel_for loops use torch's threads (without
    -fopenmp ATen's parallel_for is a serial loop, and every fused kernel ran on one core)."""
    C = _C()
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert C.parallel_threads_used() == n
    finally:
        torch.set_num_threads(before)


def test_variant_switch_reports_and_refuses():
    C = _C()
    variants = C.cpu_kernel_variants()
    assert variants["default"] and variants["aten"]
    before = C.cpu_kernel()
    try:
        assert C.set_cpu_kernel("aten") == "aten"
        auto = C.set_cpu_kernel("auto")
        cap = torch.backends.cpu.get_cpu_capability()
        if cap == "AVX512" and variants["avx512"]:
            assert auto == "avx512"  # the widest variant ATen's capability allows
        elif cap in ("AVX2", "AVX512") and variants["avx2"]:
            assert auto == "avx2"
        with pytest.raises(ValueError, match="unknown CPU kernel variant"):
            C.set_cpu_kernel("sse9")
        for name in ("avx2", "avx512"):
            if not variants[name]:
                with pytest.raises(ValueError, match="needs instructions this CPU lacks"):
                    C.set_cpu_kernel(name)
    finally:
        C.set_cpu_kernel(before)


@pytest.mark.parametrize("strategy", ["shrink_expand", "merge"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_and_grads(variant, dtype, shape, strategy):
    m, k, n, r = shape
    inputs = make_inputs(m, k, n, r, dtype, bias=True)
    _check_all(
        dtype, inputs, lambda x, w, a, b, bb: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=strategy)
    )


@pytest.mark.parametrize(
    "shape", [(45, 70, 33, 4), (40, 129, 67, 16), (9, 136, 40, 128)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dropout(variant, dtype, shape):
    p = 0.3
    inputs, keep, fused = dropout_case(*shape, dtype, p, SCALE)
    _check_all(dtype, inputs, fused, keep=keep, p=p)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_raw_ops_partial_masks_and_dropout(variant, dtype):
    m, k, n, r = 29, 77, 45, 6
    p = 0.25
    x, w, a, b, _ = make_inputs(m, k, n, r, dtype, bias=False)
    seed = torch.tensor(2**40 + 12345, dtype=torch.int64)
    keep = lora_ext.dropout_mask(seed, m, k, p)
    g64 = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ops = torch.ops.lora_ext
    for strategy in (1, 2):
        y = ops.lora_linear(x, w, None, a, b, SCALE, p, seed, strategy)
        ref = torch_lora(x.double(), w.double(), a.double(), b.double(), SCALE, keep=keep, p=p)
        assert_rule("y", y, ref, torch_lora(x, w, a, b, SCALE, keep=keep, p=p), dtype)
        leaves64 = [t.double().requires_grad_(True) for t in (x, w, a, b)]
        want64 = torch.autograd.grad(torch_lora(*leaves64, SCALE, keep=keep, p=p), leaves64, g64)
        leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b)]
        want = torch.autograd.grad(torch_lora(*leaves, SCALE, keep=keep, p=p), leaves, g64.to(dtype))
        for mask in ([True] * 5, [False, False, False, True, True], [True, False, False, False, False]):
            got = ops.lora_linear_backward(g64.to(dtype), x, w, a, b, SCALE, p, seed, strategy, mask)
            for slot, idx in ((0, 0), (1, 1), (3, 2), (4, 3)):
                if mask[slot]:
                    assert_rule(f"grad {slot} mask {mask}", got[slot], want64[idx], want[idx], dtype)
                else:
                    assert got[slot].numel() == 0


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "lora_ext" in str(func):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    "shape",
    # (520, 2048, 64, 16): 256-row chunks of the widened bf16/fp16 and the ATen (fp64) loops, xa offset per chunk
    [(37, 129, 67, 5), (70, 96, 80, 16), (520, 129, 67, 16), (520, 2048, 64, 16), (33, 1031, 50, 8), (45, 521, 67, 16)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=[*DTYPE_IDS, "fp64"])
def test_saved_xa_pair(variant, dtype, shape, p):
    """lora_linear_xa gives lora_linear's y (same bits) and xa = drop(x) A^T (float64 rule);
    lora_linear_backward_xa gives lora_linear_backward's gradients (same bits) and its grad_B
    comes from the xa it is given."""
    m, k, n, r = shape
    x, w, a, b, bias = make_inputs(m, k, n, r, dtype)
    seed = torch.tensor(2**41 + 7, dtype=torch.int64) if p else None
    keep = lora_ext.dropout_mask(seed, m, k, p) if p else torch.ones(m, k, dtype=torch.bool)
    g = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ops = torch.ops.lora_ext
    for strategy in (1, 2):
        y, xa = ops.lora_linear_xa(x, w, bias, a, b, SCALE, p, seed, strategy)
        assert torch.equal(y, ops.lora_linear(x, w, bias, a, b, SCALE, p, seed, strategy))
        assert xa.shape == (m, r) and xa.dtype == acc
        ref = (x.double() * keep) @ a.double().t()
        assert_rule("xa", xa, ref, (x.to(acc) * keep) @ a.to(acc).t(), acc)
        for mask in ([True] * 5, [False, False, False, False, True], [True, False, True, True, False]):
            want = ops.lora_linear_backward(g, x, w, a, b, SCALE, p, seed, strategy, mask)
            got = ops.lora_linear_backward_xa(g, x, xa, w, a, b, SCALE, p, seed, strategy, mask)
            for slot, (gg, ww) in enumerate(zip(got, want)):
                assert torch.equal(gg, ww), (strategy, mask, slot)
        # grad_B is g^T xa: twice xa (exact) gives exactly twice grad_B, the rest unchanged
        got = ops.lora_linear_backward_xa(g, x, 2 * xa, w, a, b, SCALE, p, seed, strategy, [True] * 5)
        want = ops.lora_linear_backward_xa(g, x, xa, w, a, b, SCALE, p, seed, strategy, [True] * 5)
        assert torch.equal(got[4], 2 * want[4]) and all(torch.equal(u, v) for u, v in zip(got[:4], want[:4]))
        if p < 1.0:
            assert torch.count_nonzero(want[4]) > 0


@pytest.mark.parametrize("shape", [(13, 129, 8), (13, 1031, 8), (13, 521, 16), (13, 40, 16)], ids=str)
def test_xa_keeps_inf_and_nan(variant, shape):
    """xa = x A^T with +-inf in x's last column (the padded end of an odd k chunk) and a NaN inside:
    the rows hold +-inf and NaN exactly as float64 does, the other rows follow the rule."""
    m, k, r = shape
    x, w, a, b, bias = make_inputs(m, k, 24, r, torch.float32)
    a = a.abs() + 0.01  # every product of a row of x with A has one sign
    x[0, -1], x[1, -1], x[2, k // 2] = float("inf"), -float("inf"), float("nan")
    for strategy in (1, 2):
        _, xa = torch.ops.lora_ext.lora_linear_xa(x, w, bias, a, b, SCALE, 0.0, None, strategy)
        ref = x.double() @ a.double().t()
        assert torch.equal(xa[0], torch.full((r,), float("inf"))) and torch.equal(xa[1], -xa[0]), strategy
        assert xa[2].isnan().all() and torch.isfinite(xa[3:]).all(), strategy
        assert_rule("xa", xa[3:], ref[3:], x[3:] @ a.t(), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_autograd_keeps_xa_when_the_forward_computes_it(variant, dtype):
    """The CPU autograd runs the xa pair exactly when the forward computes x A^T anyway (shrink/expand,
    or dropout) and lora_B is trainable; its gradients are the plain pair's bits."""
    m, k, n, r = 24, 96, 80, 16  # auto: shrink/expand forward (M < K = N)
    x, w, a, b, bias = make_inputs(m, k, n, r, dtype)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    seed = torch.tensor(99, dtype=torch.int64)
    cases = [  # (strategy, p, lora_B trainable, xa pair expected)
        (0, 0.0, True, True),
        (1, 0.0, True, True),
        (2, 0.0, True, False),  # the merged forward computes no xa
        (0, 0.2, True, True),
        (0, 1.0, True, False),  # the branch is zero
        (1, 0.0, False, False),  # nothing needs xa
    ]
    for strategy, p, train_b, expect in cases:
        leaves = [x.clone().requires_grad_(True), a.clone().requires_grad_(True), b.clone().requires_grad_(train_b)]
        with _OpLog() as log:
            y = torch.ops.lora_ext.lora_linear(
                leaves[0], w, bias, leaves[1], leaves[2], SCALE, p, seed if p else None, strategy
            )
            y.backward(g)
        pair = ["lora_linear_xa", "lora_linear_backward_xa"] if expect else ["lora_linear", "lora_linear_backward"]
        assert log.ops == pair, (strategy, p, train_b, log.ops)
        mask = [True, False, False, True, train_b]
        want = torch.ops.lora_ext.lora_linear_backward(g, x, w, a, b, SCALE, p, seed if p else None, strategy, mask)
        assert torch.equal(y.detach(), torch.ops.lora_ext.lora_linear(x, w, bias, a, b, SCALE, p, seed, strategy))
        assert torch.equal(leaves[0].grad, want[0]) and torch.equal(leaves[1].grad, want[3])
        assert (leaves[2].grad is None) if not train_b else torch.equal(leaves[2].grad, want[4])
    # no graph (torch.no_grad) keeps nothing: the plain forward, though lora_B is trainable
    b_leaf = b.clone().requires_grad_(True)
    with torch.no_grad(), _OpLog() as log:
        y = torch.ops.lora_ext.lora_linear(x, w, bias, a, b_leaf, SCALE, 0.0, None, 1)
    assert log.ops == ["lora_linear"] and torch.equal(
        y, torch.ops.lora_ext.lora_linear(x, w, bias, a, b, SCALE, 0.0, None, 1)
    )
    # the ATen path (here: the "aten" variant) would pay an extra product for xa: the plain pair
    _C().set_cpu_kernel("aten")
    leaves = [x.clone().requires_grad_(True), a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    with _OpLog() as log:
        torch.ops.lora_ext.lora_linear(leaves[0], w, bias, leaves[1], leaves[2], SCALE, 0.0, None, 1).backward(g)
    assert log.ops == ["lora_linear", "lora_linear_backward"], log.ops


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous_x_and_expanded_grad(variant, dtype):
    m, k, n, r = 40, 52, 36, 7
    x, w, a, b, bias = make_inputs(m, k, n, r, dtype)
    fn = lambda x, w, a, b, bb: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy="shrink_expand")  # noqa: E731
    g = torch.randn(1, n, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).expand(m, n)
    for xx in (x.t().contiguous().t(), torch.stack([x, x], dim=-1)[..., 0]):
        _check_all(dtype, [xx, w, a, b, bias], fn, grad=g)
    # stride-0 rows in grad_out give exactly what the materialised grad gives
    leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b, bias)]
    y = lora_ext.lora_linear(*leaves[:4], SCALE, bias=leaves[4])
    got = torch.autograd.grad(y, leaves, g.to(dtype))
    y = lora_ext.lora_linear(*leaves[:4], SCALE, bias=leaves[4])
    want = torch.autograd.grad(y, leaves, g.to(dtype).contiguous())
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch(variant, dtype):
    check_empty_batch(dtype)


def _ulp(t: torch.Tensor) -> torch.Tensor:
    f = t.abs().double().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(f))) * torch.finfo(t.dtype).eps


@pytest.mark.parametrize("sign", [1, -1], ids=["merge", "unmerge"])
@pytest.mark.parametrize(
    # K = 64 and 80: a row's last column block is exactly one whole vector or two (AVX-512: 64 -> one,
    # 80 -> two; AVX2: 64 -> two, 80 -> one)
    "shape",
    [(67, 129, 5), (3, 8, 1), (48, 300, 16), (33, 47, 128), (40, 50, 129), (20, 64, 16), (13, 80, 7)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge(variant, dtype, shape, sign):
    n, k, r = shape
    _, w, a, b, _ = make_inputs(1, k, n, r, dtype, bias=False)
    s = 0.75
    ref = w.double() + sign * s * (b.double() @ a.double())
    out = w.clone()
    (lora_ext.merge_ if sign > 0 else lora_ext.unmerge_)(out, a, b, s)
    assert_rule("merged W", out, ref, w + sign * s * (b @ a), dtype)
    if dtype != torch.float32:  # fp32 accumulation, one rounding
        slack = 2.0**-20 * (w.double().abs() + s * (b.double().abs() @ a.double().abs()))
        assert ((out.double() - ref).abs() <= _ulp(ref.to(dtype)) + slack).all()
    torch.testing.assert_close(lora_ext.merged_weight(w, a, b, sign * s), out, rtol=0, atol=0)
    # a column-major W (transposed tiles) and an offset view give the same bits (the fused kernels
    # sum over the rank in one order for every layout; BLAS, behind r = 129 in fp32, may not)
    exact = {"rtol": 0, "atol": 0} if (r <= 128 or dtype != torch.float32) else {}
    w_t = w.t().contiguous().t()
    lora_ext.merge_(w_t, a, b, sign * s)
    torch.testing.assert_close(w_t, out, **exact)
    storage = torch.zeros(3 + n * k, dtype=dtype)
    w_off = storage[3:].view(n, k)
    w_off.copy_(w)
    lora_ext.merge_(w_off, a, b, sign * s)
    torch.testing.assert_close(w_off, out, rtol=0, atol=0)
    assert torch.count_nonzero(storage[:3]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_keeps_nan_and_inf(variant, dtype):
    _, w, a, b, _ = make_inputs(1, 40, 20, 4, dtype, bias=False)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), -float("inf")
    out = lora_ext.merged_weight(w, a, b, 0.5)
    assert out[0, 0].isnan() and out[1, 1] == float("inf") and out[2, 2] == -float("inf")
    assert torch.isfinite(out[3:]).all()


@pytest.mark.parametrize(
    "shape", [(67, 129, 5), (130, 97, 16), (9, 50, 1), (20, 48, 128)], ids=lambda s: "x".join(map(str, s))
)
def test_bf16_merge_same_bits_on_every_variant(shape):
    """The bf16 merge of the avx512 variant (AVX512-BF16 dot products where the CPU has them, a single
    vcvtneps2bf16 per vector of normal numbers) gives the bits of the portable fp32-FMA loops: the same
    sums in the same order, rounded once. W holds zeros, subnormals, +-inf and NaN (the slow store)."""
    C = _C()
    n, k, r = shape
    _, w, a, b, _ = make_inputs(1, k, n, r, torch.bfloat16, bias=False)
    w[0, :7] = torch.tensor([0.0, -0.0, 1e-39, -3e-40, float("inf"), -float("inf"), float("nan")])
    w[1, :] = 0.0
    b[2, :] = 0.0  # a row of W left unchanged by the delta
    if r >= 4:  # W[3, 0] = s * fl(((1 + 0) + 1.5 2^-24) - 1): another order of the ranks gives other bits
        w[3, 0] = 0.0
        a[:, 0] = 1.0
        b[3, :] = 0.0
        b[3, :4] = torch.tensor([1.0, 0.0, 1.5 * 2.0**-24, -1.0])
    before, amx = C.cpu_kernel(), C.cpu_amx()["enabled"]
    outs = {}
    try:
        C.set_cpu_amx(False)  # AMX sums otherwise (test_bf16_merge_on_amx_rounds_once)
        for name in VARIANTS:
            if C.cpu_kernel_variants()[name]:
                C.set_cpu_kernel(name)
                outs[name] = lora_ext.merged_weight(w, a, b, 0.625).view(torch.int16)
    finally:
        C.set_cpu_kernel(before)
        C.set_cpu_amx(amx)
    assert len(outs) >= 1
    for name, out in outs.items():
        assert torch.equal(out, outs["default"]), name
    if r >= 4:
        assert outs["default"][3, 0].item() == torch.tensor(0.625 * 2.0**-23).bfloat16().view(torch.int16).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_variant_agrees_with_aten_path(variant, dtype):
    C = _C()
    m, k, n, r = 50, 100, 60, 8
    inputs = make_inputs(m, k, n, r, dtype)
    fn = lambda x, w, a, b, bb: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy="shrink_expand")  # noqa: E731
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(dtype)
    ours = _run(fn, inputs, g)
    C.set_cpu_kernel("aten")
    try:
        theirs = _run(fn, inputs, g)
    finally:
        C.set_cpu_kernel(variant)
    # Both are fp32-accumulating kernels in other summation orders: the fused variant must be as close to
    # the float64 result as the ATen path is (the tolerance rule with the ATen path as the yardstick).
    ref_fn = lambda x, w, a, b, bb: torch_lora(x, w, a, b, SCALE, bb)  # noqa: E731
    ref = _run(ref_fn, [t.double() for t in inputs], g.double())
    names = ["y", "grad_x", "grad_w", "grad_a", "grad_b", "grad_bias"]
    for name, o, t, r in zip(names, [ours[0], *ours[1]], [theirs[0], *theirs[1]], [ref[0], *ref[1]]):
        assert_rule(name, o, r, t, dtype)


def _bf16_ulps(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 steps between finite bf16 tensors of one sign pattern (int16 bit patterns)."""
    return (x.view(torch.int16).to(torch.int32) - y.view(torch.int16).to(torch.int32)).abs()


@pytest.mark.parametrize(
    "shape",
    [(67, 129, 5), (130, 97, 16), (9, 50, 1), (33, 100, 40), (20, 48, 128), (512, 1024, 16)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_bf16_merge_on_amx_rounds_once(shape):
    """The AMX bf16 merge (tdpbf16ps tiles; shapes that miss the 16 x 16 tiles, r past one 32-rank
    tile, r = 1 and 128): W + fl(s * sum) rounded once like the other kernels, where AMX's sum carries
    more than fp32 precision: every element within one bf16 step of the FMA kernels' result and of the
    float64 merge rounded to bf16, the specials of W (zeros, subnormals, +-inf, NaN) kept exactly,
    and W + s * 0 rows unchanged."""
    C = _C()
    if not C.cpu_amx()["available"]:
        with pytest.raises(ValueError, match="AMX"):
            C.set_cpu_amx(True)
        pytest.skip("no AMX on this CPU / OS")
    n, k, r = shape
    _, w, a, b, _ = make_inputs(1, k, n, r, torch.bfloat16, bias=False)
    w[0, :7] = torch.tensor([0.0, -0.0, 1e-39, -3e-40, float("inf"), -float("inf"), float("nan")])
    b[2, :] = 0.0
    before, amx = C.cpu_kernel(), C.cpu_amx()["enabled"]
    try:
        C.set_cpu_kernel("avx2")
        C.set_cpu_amx(True)
        assert C.cpu_amx()["in_use"] is False  # the avx2 table has no AMX kernel
        C.set_cpu_kernel("avx512")
        assert C.cpu_amx()["in_use"] is True
        w_amx = w.clone()
        lora_ext.merge_(w_amx, a, b, 0.625)
        C.set_cpu_amx(False)
        w_fma = w.clone()
        lora_ext.merge_(w_fma, a, b, 0.625)
    finally:
        C.set_cpu_kernel(before)
        C.set_cpu_amx(amx)
    ref = (w.double() + 0.625 * b.double() @ a.double()).to(torch.bfloat16)
    special = ~torch.isfinite(w) | (w == 0) | (w.abs() < 1.2e-38)
    assert torch.equal(
        w_amx[0, :7].view(torch.int16)[~torch.isnan(w[0, :7])], w_fma[0, :7].view(torch.int16)[~torch.isnan(w[0, :7])]
    )
    assert w_amx[0, 6].isnan()
    assert torch.equal(w_amx[2], w[2])
    fin = (
        ~special
        & torch.isfinite(w_amx)
        & (torch.sign(w_amx) == torch.sign(w_fma))
        & (torch.sign(w_amx) == torch.sign(ref))
    )
    assert fin.float().mean() > 0.95
    assert _bf16_ulps(w_amx[fin], w_fma[fin]).max() <= 1
    assert _bf16_ulps(w_amx[fin], ref[fin]).max() <= 1
    assert (w_amx != w).sum() > 0.5 * w.numel()  # the delta was applied, not skipped


def test_amx_merge_interleaved_with_torch_bf16_matmuls():
    """Our AMX calls configure the tiles and release them; torch's own bf16 GEMMs (oneDNN, AMX on
    such CPUs) run on the same threads before and after and still give their results."""
    C = _C()
    if not C.cpu_amx()["available"]:
        pytest.skip("no AMX on this CPU / OS")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g).bfloat16()
    w = torch.randn(512, 256, generator=g).bfloat16()
    a = torch.randn(16, 256, generator=g).bfloat16() / 16
    b = torch.randn(512, 16, generator=g).bfloat16() / 16
    amx = C.cpu_amx()["enabled"]
    try:
        C.set_cpu_amx(True)
        y0 = x @ w.t()
        for _ in range(20):
            lora_ext.merge_(w, a, b, 0.5)
            y = x @ w.t()
            lora_ext.unmerge_(w, a, b, 0.5)
            assert torch.isfinite(y).all()
        assert torch.allclose(x @ w.t(), y0, rtol=0.05, atol=0.5)
    finally:
        C.set_cpu_amx(amx)


# --- where the bf16 base GEMMs run (lora_ext._C.set_cpu_bf16_gemm) ---------------------------------
BF16 = torch.bfloat16


@pytest.fixture(params=["fp32", "native"])
def bf16_gemm(request):
    """Both ways of the bf16 base GEMMs forced, on every machine: 'native' is torch's bf16 GEMM (fast
    with AMX, slow but exact to its contract elsewhere), 'fp32' the widened chunks."""
    C = _C()
    before = C.cpu_bf16_gemm()["mode"]
    assert C.set_cpu_bf16_gemm(request.param)["mode"] == request.param
    yield request.param
    C.set_cpu_bf16_gemm(before)


def _onednn_allows_amx() -> bool:
    """Whether a oneDNN ISA cap in the environment (benchmarks' --cpu-isa avx2 sets one) leaves AMX."""
    import os

    caps = [os.environ.get(v, "").upper() for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")]
    return all(not c or c == "ALL" or "AMX" in c for c in caps)


def test_bf16_gemm_switch_reports_and_refuses():
    C = _C()
    before = C.cpu_bf16_gemm()["mode"]
    kernel, amx = C.cpu_kernel(), C.cpu_amx()["enabled"]
    try:
        C.set_cpu_kernel("default")  # any fused variant (the run may have started on "aten")
        assert C.set_cpu_bf16_gemm("native") == {"mode": "native", "native": True}
        assert C.set_cpu_bf16_gemm("fp32") == {"mode": "fp32", "native": False}
        with pytest.raises(ValueError, match="'auto', 'native' or 'fp32', not 'amx'"):
            C.set_cpu_bf16_gemm("amx")
        assert C.cpu_bf16_gemm()["mode"] == "fp32"  # a refused name changes nothing
        C.set_cpu_bf16_gemm("auto")
        # auto: native exactly where AMX is enabled and the avx512 variant is active (oneDNN on)
        for name in ("default", "avx2", "avx512", "aten"):
            if not C.cpu_kernel_variants()[name]:
                continue
            C.set_cpu_kernel(name)
            want = (
                name == "avx512" and C.cpu_amx()["enabled"] and torch.backends.mkldnn.enabled and _onednn_allows_amx()
            )
            assert C.cpu_bf16_gemm() == {"mode": "auto", "native": want}, name
            if name == "aten":  # the ATen path never runs the fused kernels' native way
                assert C.set_cpu_bf16_gemm("native")["native"] is False
                C.set_cpu_bf16_gemm("auto")
        if C.cpu_amx()["enabled"] and C.cpu_kernel_variants()["avx512"] and _onednn_allows_amx():
            C.set_cpu_kernel("avx512")
            C.set_cpu_amx(False)
            assert C.cpu_bf16_gemm()["native"] is False
            C.set_cpu_amx(True)
            assert C.cpu_bf16_gemm()["native"] is True
    finally:
        C.set_cpu_amx(amx)
        C.set_cpu_kernel(kernel)
        C.set_cpu_bf16_gemm(before)


def test_bf16_native_strategy_never_merges(bf16_gemm):
    """With the native bf16 GEMM the auto strategy keeps shrink/expand (a merged W_eff would take the
    fp32 GEMM); fp32 mode and fp16 keep the byte model; a forced merge still merges."""
    big = dict(m=8192, n=1024, k=1024)
    native = _C().cpu_bf16_gemm()["native"]
    merged = {"forward": "merge", "backward": "merge"}
    shrink = {"forward": "shrink_expand", "backward": "shrink_expand"}
    assert lora_ext.strategy_plan(**big, dtype=BF16) == (shrink if native else merged)
    assert lora_ext.strategy_plan(**big, dtype=torch.float16) == merged
    assert lora_ext.strategy_plan(**big, dtype=BF16, strategy="merge") == merged


@pytest.mark.parametrize("strategy", ["auto", "shrink_expand", "merge"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bf16_gemm_forward_and_grads(variant, bf16_gemm, shape, strategy):
    """bf16 forward and every gradient against float64 with the tolerance rule, both GEMM ways (native:
    y and grad_x rounded twice, within the rule) on odd shapes, r = 1 ... 128 and the ATen r = 129."""
    m, k, n, r = shape
    inputs = make_inputs(m, k, n, r, BF16, bias=True)
    _check_all(BF16, inputs, lambda x, w, a, b, bb: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=strategy))


@pytest.mark.parametrize(
    "shape", [(45, 70, 33, 4), (40, 129, 67, 16), (9, 136, 40, 128)], ids=lambda s: "x".join(map(str, s))
)
def test_bf16_gemm_dropout_partial_masks_and_saved_xa(variant, bf16_gemm, shape):
    m, k, n, r = shape
    p = 0.3
    inputs, keep, fused = dropout_case(m, k, n, r, BF16, p, SCALE)
    _check_all(BF16, inputs, fused, keep=keep, p=p)
    x, w, a, b, bias = make_inputs(m, k, n, r, BF16)
    seed = torch.tensor(2**33 + 5, dtype=torch.int64)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(8)).to(BF16)
    g_exp = torch.randn(1, n, generator=torch.Generator().manual_seed(9)).to(BF16).expand(m, n)  # stride 0
    ops = torch.ops.lora_ext
    for pp, sd in ((0.0, None), (p, seed)):
        y, xa = ops.lora_linear_xa(x, w, bias, a, b, SCALE, pp, sd, 0)
        assert torch.equal(y, ops.lora_linear(x, w, bias, a, b, SCALE, pp, sd, 0))
        for gg in (g, g_exp):
            for mask in ([True] * 5, [False, True, False, True, True], [True, False, True, False, False]):
                want = ops.lora_linear_backward(gg, x, w, a, b, SCALE, pp, sd, 0, mask)
                got = ops.lora_linear_backward_xa(gg, x, xa, w, a, b, SCALE, pp, sd, 0, mask)
                assert all(torch.equal(u, v) for u, v in zip(got, want)), mask
                keep = lora_ext.dropout_mask(sd, m, k, pp) if pp else None
                leaves64 = [t.double().requires_grad_(True) for t in (x, w, a, b)]
                y64 = torch_lora(*leaves64, SCALE, bias.double(), keep=keep, p=pp)
                want64 = torch.autograd.grad(y64, leaves64, gg.double())
                leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b)]
                plain = torch.autograd.grad(torch_lora(*leaves, SCALE, bias, keep=keep, p=pp), leaves, gg)
                for slot, idx in ((0, 0), (1, 1), (3, 2), (4, 3)):
                    if mask[slot]:
                        assert_rule(f"grad {slot} mask {mask}", got[slot], want64[idx], plain[idx], BF16)


@pytest.mark.parametrize("shape", [(37, 129, 67, 5), (300, 64, 48, 16)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_native_gemm_is_torchs(variant, shape):
    """In native mode the base GEMMs are torch's bf16 ones: with lora_B = 0 (the branch adds exactly 0)
    y, grad_x and grad_W carry the bits of torch.addmm / torch.mm in bf16."""
    C = _C()
    before = C.cpu_bf16_gemm()["mode"]
    m, k, n, r = shape
    x, w, a, b, bias = make_inputs(m, k, n, r, BF16)
    b = torch.zeros_like(b)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(BF16)
    try:
        C.set_cpu_bf16_gemm("native")
        if C.cpu_kernel() == "aten":
            pytest.skip("the ATen path has no native way")
        ops = torch.ops.lora_ext
        for strategy in (0, 1):
            y = ops.lora_linear(x, w, bias, a, b, SCALE, 0.0, None, strategy)
            assert torch.equal(y, torch.addmm(bias, x, w.t()))
            gx, gw, _, _, _ = ops.lora_linear_backward(g, x, w, a, b, SCALE, 0.0, None, strategy, [True] * 5)
            assert torch.equal(gx, torch.mm(g, w)) and torch.equal(gw, torch.mm(g.t(), x))
    finally:
        C.set_cpu_bf16_gemm(before)
