"""merge_ / unmerge_ / merged_weight: W ± s·B A accumulated in fp32 and rounded once."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_rule, make_inputs

import lora_ext

SHAPES = [(67, 129, 5), (3, 8, 1), (128, 64, 16)]  # (N, K, r)


def _adapter(n, k, r, dtype):
    _, w, a, b, _ = make_inputs(1, k, n, r, dtype, bias=False)
    return w, a, b


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype at each element's magnitude."""
    f = t.abs().double().clamp_min(torch.finfo(t.dtype).tiny)
    return torch.pow(2.0, torch.floor(torch.log2(f))) * torch.finfo(t.dtype).eps


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sign", [1, -1], ids=["merge", "unmerge"])
def test_merge_rounds_once(dtype, shape, sign):
    w, a, b = _adapter(*shape, dtype)
    s = 0.75
    ref = w.double() + sign * s * (b.double() @ a.double())
    plain = w + sign * s * (b @ a)
    out = w.clone()
    (lora_ext.merge_ if sign > 0 else lora_ext.unmerge_)(out, a, b, s)
    assert_rule("merged W", out, ref, plain, dtype)
    if dtype != torch.float32:
        # fp32 accumulation, one rounding into bf16/fp16: within one unit in the last place of
        # the exact value (plus fp32-level slack for cancellation); a bf16 B @ A would miss this
        slack = 2.0**-20 * (w.double().abs() + s * (b.double().abs() @ a.double().abs()))
        assert ((out.double() - ref).abs() <= _ulp(ref.to(dtype)) + slack).all()
    torch.testing.assert_close(lora_ext.merged_weight(w, a, b, sign * s), out, rtol=0, atol=0)


def test_merged_weight_leaves_input_untouched():
    w, a, b = _adapter(20, 30, 4, torch.float32)
    before = w.clone()
    lora_ext.merged_weight(w, a, b, 2.0)
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_noncontiguous_and_offset_weight(dtype):
    w, a, b = _adapter(33, 47, 3, dtype)
    want = lora_ext.merged_weight(w, a, b, 1.25)
    # another layout may let BLAS sum the rank-r product in another order: last-bit slack only
    exact = {"rtol": 0, "atol": 0} if dtype != torch.float32 else {}
    w_t = w.t().contiguous().t()  # column-major view
    lora_ext.merge_(w_t, a, b, 1.25)
    torch.testing.assert_close(w_t, want, **exact)
    storage = torch.zeros(5 + 33 * 47, dtype=dtype)
    w_off = storage[5:].view(33, 47)
    w_off.copy_(w)
    lora_ext.merge_(w_off, a, b, 1.25)
    torch.testing.assert_close(w_off, want, **exact)
    assert torch.count_nonzero(storage[:5]) == 0  # nothing outside the view written


def test_merge_on_parameter_that_requires_grad():
    w, a, b = _adapter(8, 8, 2, torch.float32)
    p = torch.nn.Parameter(w.clone())
    lora_ext.merge_(p, a, b, 1.0)
    torch.testing.assert_close(p.detach(), lora_ext.merged_weight(w, a, b, 1.0))
    assert p.requires_grad


def test_fp32_merge_unmerge_cycles_do_not_drift():
    w, a, b = _adapter(64, 96, 8, torch.float32)
    cur = w.clone()
    for _ in range(200):
        lora_ext.merge_(cur, a, b, 2.0)
        lora_ext.unmerge_(cur, a, b, 2.0)
    drift = (cur - w).abs().max().item()
    assert drift <= 200 * 2 * torch.finfo(torch.float32).eps * w.abs().max().item()


def test_merge_then_forward_equals_fused_forward():
    x, w, a, b, bias = make_inputs(25, 40, 30, 4, torch.float32)
    fused = lora_ext.lora_linear(x, w, a, b, 0.5, bias=bias)
    merged = torch.nn.functional.linear(x, lora_ext.merge_(w.clone(), a, b, 0.5), bias)
    torch.testing.assert_close(merged, fused, rtol=1e-5, atol=1e-5)
