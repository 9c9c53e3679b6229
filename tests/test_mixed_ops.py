"""lora_ext.lora_linear_mixed: one adapter (or none) per row, against an independent float64 oracle
(one dense LoRA formula per adapter, rows selected afterwards) with the tolerance rule, plus
gradcheck, opcheck, the error contract, and the same file in fallback mode."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, DTYPE_IDS, DTYPES, IN_FALLBACK_MODE, SEED, assert_rule, run_in_fallback_mode, torch_lora

import lora_ext


def _case(m, k, n_out, r, n_ad, dtype, index=None, batch=None, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed + SEED)
    lead = (*batch, m) if batch else (m,)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, k, generator=g, dtype=torch.float64) / k**0.5
    a = torch.randn(n_ad, r, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n_ad, n_out, r, generator=g, dtype=torch.float64) / r**0.5
    bb = torch.randn(n_out, generator=g, dtype=torch.float64) if bias else None
    if index is None:
        index = torch.randint(-1, n_ad, lead, generator=g)
    scales = [0.5 + 0.75 * i for i in range(n_ad)]
    return [t.to(dtype) if t is not None else None for t in (x, w, a, b, bb)], index, scales


def _oracle(x, w, a, b, bb, scales, index, keeps=None, ps=None):
    """Rows of adapter i from the dense formula with adapter i (torch_lora), base rows from F.linear."""
    k = x.shape[-1]
    x2, idx = x.reshape(-1, k), index.reshape(-1)
    y = torch.nn.functional.linear(x2, w, bb)
    for i in range(a.shape[0]):
        keep = None if keeps is None else keeps[i]
        yi = torch_lora(x2, w, a[i], b[i], scales[i], bias=bb, keep=keep, p=0.0 if ps is None else ps[i])
        y = torch.where((idx == i).unsqueeze(1), yi, y)
    return y.view(*x.shape[:-1], w.shape[0])


def _grads(fn, leaves, g):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in leaves]
    out = fn(*leaves)
    out.backward(g.to(out.dtype))
    return out.detach(), [t.grad for t in leaves if t is not None]


SHAPES = [
    dict(m=37, k=129, n_out=67, r=5, n_ad=3),  # misses every tile
    dict(m=1, k=1, n_out=1, r=1, n_ad=1),
    dict(m=19, k=33, n_out=17, r=3, n_ad=4, batch=(2,)),  # leading dims
]


@pytest.mark.parametrize("shape", SHAPES, ids=["odd", "one", "batched"])
@pytest.mark.parametrize("dtype", [torch.float64, *DTYPES], ids=["fp64", *DTYPE_IDS])
def test_forward_and_gradients_follow_the_rule(shape, dtype):
    (x, w, a, b, bb), index, scales = _case(**shape, dtype=dtype)
    lead = x.shape[:-1]
    g = torch.randn(*lead, w.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def fused(x, a, b, bb):
        return lora_ext.lora_linear_mixed(x, w, a, b, scales, index, bias=bb)

    def plain(x, a, b, bb, w=w):
        return _oracle(x, w, a, b, bb, scales, index)

    out, grads = _grads(fused, [x, a, b, bb], g)
    ref, ref_grads = _grads(lambda *t: plain(*t, w=w.double()), [t.double() for t in (x, a, b, bb)], g)
    tout, tgrads = _grads(plain, [x, a, b, bb], g)
    assert_rule("y", out, ref, tout, dtype if dtype != torch.float64 else torch.float64)
    for name, got, want, base in zip(("x", "A", "B", "bias"), grads, ref_grads, tgrads):
        assert_rule(f"grad_{name}", got, want, base, dtype)


@pytest.mark.parametrize(
    "index_kind", ["all_base", "all_adapters", "empty_segments", "one_adapter_everywhere"], ids=lambda s: s
)
def test_index_patterns(index_kind):
    m, n_ad = 23, 4
    index = {
        "all_base": torch.full((m,), -1),
        "all_adapters": torch.arange(m) % n_ad,
        "empty_segments": torch.tensor([0, 2] * 11 + [-1]),  # adapters 1 and 3 own no row
        "one_adapter_everywhere": torch.full((m,), 2),
    }[index_kind]
    (x, w, a, b, bb), _, scales = _case(m, 29, 13, 3, n_ad, torch.float32, index=index)
    g = torch.randn(m, 13)
    out, (gx, ga, gb, gbias) = _grads(lambda x, a, b, bb: lora_ext.lora_linear_mixed(x, w, a, b, scales, index, bb),
                                      [x, a, b, bb], g)  # fmt: skip
    ref, (rx, ra, rb, rbias) = _grads(lambda *t: _oracle(*t[:1], w.double(), *t[1:], scales, index),
                                      [t.double() for t in (x, a, b, bb)], g)  # fmt: skip
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, ra.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, rb.float(), rtol=1e-5, atol=1e-5)
    for i in range(n_ad):  # an adapter without rows gets exactly zero gradients
        if not bool((index == i).any()):
            assert torch.count_nonzero(ga[i]) == 0 and torch.count_nonzero(gb[i]) == 0
    if index_kind == "all_base":
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, bb), rtol=1e-6, atol=1e-6)


def test_strided_inputs_and_expanded_grad():
    """An offset, non-contiguous x view and a stride-0 grad_out give the contiguous results."""
    (x, w, a, b, bb), index, scales = _case(21, 17, 9, 3, 3, torch.float32)
    big = torch.randn(21, 40)
    xv = big[:, 5 : 5 + 17]
    xv.copy_(x)
    assert not xv.is_contiguous() and xv.storage_offset() == 5
    g = torch.randn(1, 9).expand(21, 9)
    out_v, grads_v = _grads(lambda x, a, b: lora_ext.lora_linear_mixed(x, w, a, b, scales, index, bb), [xv, a, b], g)
    out_c, grads_c = _grads(
        lambda x, a, b: lora_ext.lora_linear_mixed(x, w, a, b, scales, index, bb), [x, a, b], g.contiguous()
    )
    torch.testing.assert_close(out_v, out_c, rtol=1e-6, atol=1e-6)
    for gv, gc in zip(grads_v, grads_c):
        torch.testing.assert_close(gv, gc, rtol=1e-6, atol=1e-6)
    gt = torch.randn(21, 9)
    x_t = x.t().contiguous().t()  # column-major x
    got = torch.ops.lora_ext.lora_linear_mixed_backward(gt, x_t, w, a, b, scales, index, [0.0] * 3, None, [True] * 4)
    want = torch.ops.lora_ext.lora_linear_mixed_backward(gt, x, w, a, b, scales, index, [0.0] * 3, None, [True] * 4)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


def test_autocast_runs_in_the_autocast_dtype():
    (x, w, a, b, bb), index, scales = _case(8, 16, 8, 2, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_ext.lora_linear_mixed(x, w, a, b, scales, index, bb)
    assert y.dtype == torch.bfloat16
    ref = lora_ext.lora_linear_mixed(*(t.bfloat16() for t in (x, w, a, b)), scales, index, bb.bfloat16())
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_empty_batch():
    (x, w, a, b, bb), index, scales = _case(0, 16, 8, 2, 3, torch.float32)
    leaves = [t.requires_grad_(True) for t in (x, a, b, bb)]
    y = lora_ext.lora_linear_mixed(leaves[0], w, leaves[1], leaves[2], scales, index, leaves[3], dropout_p=0.3)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 16)
    for t in leaves[1:]:
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


def test_dropout_mask_per_row_adapter():
    """Row i of adapter a uses the dense op's mask at rate p[a]: the oracle builds it from lora_ext.dropout_mask."""
    m, k, n_ad = 31, 40, 3
    ps = [0.0, 0.3, 0.7]
    (x, w, a, b, bb), index, scales = _case(m, k, 11, 4, n_ad, torch.float64)
    seed = torch.tensor(987654321, dtype=torch.int64)
    keeps = [lora_ext.dropout_mask(seed, m, k, p) for p in ps]
    y = torch.ops.lora_ext.lora_linear_mixed(x, w, bb, a, b, scales, index, ps, seed)
    ref = _oracle(x, w, a, b, bb, scales, index, keeps=keeps, ps=ps)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # with every row on one adapter, the public op equals lora_linear under the same RNG state
    (x, w, a, b, bb), _, _ = _case(m, k, 11, 4, 1, torch.float32)
    torch.manual_seed(5)
    y1 = lora_ext.lora_linear_mixed(x, w, a, b, 0.8, torch.zeros(m, dtype=torch.int64), bb, dropout_p=0.4)
    torch.manual_seed(5)
    y2 = lora_ext.lora_linear(x, w, a[0], b[0], 0.8, bias=bb, dropout_p=0.4)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=ATOL[torch.float32] * 10)


@pytest.mark.parametrize("ps", [[0.0, 0.0], [0.25, 0.6]], ids=["no_dropout", "dropout"])
def test_gradcheck_float64(ps):
    (x, w, a, b, bb), _, scales = _case(7, 5, 4, 2, 2, torch.float64)
    index = torch.tensor([1, -1, 0, 1, 1, -1, 0])
    seed = torch.tensor(42, dtype=torch.int64) if max(ps) > 0 else None
    leaves = [t.requires_grad_(True) for t in (x, bb, a, b)]

    def fn(x, bb, a, b):
        return torch.ops.lora_ext.lora_linear_mixed(x, w, bb, a, b, scales, index, ps, seed)

    assert torch.autograd.gradcheck(fn, leaves)


def _samples(requires_grad):
    for dtype in (torch.float32, torch.float64):
        for bias in (True, False):
            for ps in ([0.0, 0.0, 0.0], [0.2, 0.0, 0.5]):
                (x, w, a, b, bb), index, scales = _case(13, 10, 7, 3, 3, dtype, bias=bias)
                args = [x, w, bb, a, b]
                if requires_grad:
                    args = [t.requires_grad_(i != 1) if t is not None else None for i, t in enumerate(args)]
                seed = torch.tensor(1234567, dtype=torch.int64) if max(ps) else None
                yield (*args, scales, index, ps, seed)


@pytest.mark.parametrize("sample", list(range(8)))
def test_opcheck(sample):
    args = list(_samples(requires_grad=sample % 2 == 0))[sample]
    torch.library.opcheck(torch.ops.lora_ext.lora_linear_mixed.default, args)


@pytest.mark.parametrize("mask", [[True] * 4, [True, False, True, False], [False, True, False, True]])
def test_opcheck_backward(mask):
    (x, w, a, b, _), index, scales = _case(11, 9, 6, 2, 3, torch.float32)
    g = torch.randn(11, 6)
    seed = torch.tensor(99, dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.lora_ext.lora_linear_mixed_backward.default,
        (g, x, w, a, b, scales, index, [0.1, 0.0, 0.3], seed, mask),
    )


def _bad_calls():
    (x, w, a, b, bb), index, scales = _case(5, 6, 4, 2, 2, torch.float32)
    op = torch.ops.lora_ext.lora_linear_mixed
    good = dict(x=x, weight=w, bias=bb, lora_A=a, lora_B=b, scale=scales, adapter_index=index, dropout_p=[0.0, 0.0],
                dropout_seed=None)  # fmt: skip

    def call(**kw):
        return lambda: op(**{**good, **kw})

    return [
        ("index_dtype", call(adapter_index=index.int()), TypeError, "adapter_index must be int64"),
        ("index_range", call(adapter_index=torch.tensor([0, 1, 2, -1, 0])), ValueError, r"in \[-1, 2\)"),
        ("index_below", call(adapter_index=torch.tensor([0, -2, 1, -1, 0])), ValueError, "got -2"),
        ("index_length", call(adapter_index=index[:4]), ValueError, r"adapter_index must be \[M\] = \[5\]"),
        ("scale_length", call(scale=[1.0]), ValueError, "scale must hold one value per adapter"),
        ("scale_finite", call(scale=[1.0, float("inf")]), ValueError, "scale must be finite"),
        ("p_range", call(dropout_p=[0.0, 1.5]), ValueError, r"dropout_p must be in \[0, 1\]"),
        ("p_seed", call(dropout_p=[0.0, 0.5]), ValueError, "needs a dropout_seed"),
        ("A_dims", call(lora_A=a[0]), ValueError, "lora_A must be 3-D"),
        ("B_shape", call(lora_B=b[:, :3]), ValueError, r"lora_B must be \[n_adapters, N, r\]"),
        ("A_K", call(lora_A=a[:, :, :5]), ValueError, "lora_A must be"),
        ("dtype", call(lora_A=a.double()), TypeError, "lora_A has dtype torch.float64"),
        ("bias", call(bias=bb[:3]), ValueError, r"bias must be \[N\]"),
        (
            "public_weight_grad",
            lambda: lora_ext.lora_linear_mixed(x, w.clone().requires_grad_(True), a, b, scales, index),
            ValueError,
            "frozen",
        ),  # fmt: skip
        (
            "public_index_shape",
            lambda: lora_ext.lora_linear_mixed(x, w, a, b, scales, index[:3]),
            ValueError,
            "adapter_index must have shape",
        ),  # fmt: skip
        ("public_scale_type", lambda: lora_ext.lora_linear_mixed(x, w, a, b, "x", index), TypeError, "scale must"),
        (
            "public_scale_tensor_int",
            lambda: lora_ext.lora_linear_mixed(x, w, a, b, torch.ones(2, dtype=torch.int64), index),
            TypeError,
            "floating",
        ),  # fmt: skip
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_raises_the_contract_error(case):
    _, fn, error, match = case
    with pytest.raises(error, match=match):
        fn()


def test_scale_as_tensor_equals_list():
    (x, w, a, b, bb), index, scales = _case(9, 8, 5, 2, 3, torch.float32)
    y1 = lora_ext.lora_linear_mixed(x, w, a, b, scales, index, bb)
    y2 = lora_ext.lora_linear_mixed(x, w, a, b, torch.tensor(scales, dtype=torch.float64), index, bb)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_compiled_kernel_serves_cpu_when_loaded():
    keys = lora_ext.ops.fallback_dispatch_keys("lora_linear_mixed")
    if lora_ext.extension_loaded():
        assert "CPU" not in keys
    else:
        assert "CPU" in keys


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
def test_this_file_passes_on_the_fallback():
    tail = run_in_fallback_mode(["tests/test_mixed_ops.py"], timeout=900)
    assert " passed" in tail
