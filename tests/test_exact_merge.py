"""Exact merge/unmerge: W restored bit for bit after any number of cycles, compact records, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import IN_FALLBACK_MODE, SEED, assert_rule, requires_extension, run_in_fallback_mode

import lora_ext
from lora_ext.ops import exact_merge as em

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def weight_and_adapters(n, k, r, dtype, ratio, count=2, seed=0):
    """W ~ N(0, 0.02) and ``count`` adapters (A, B, s) whose ΔW has ``ratio`` × W's rms."""
    g = torch.Generator().manual_seed(seed + SEED)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    adapters = []
    for _ in range(count):
        a = torch.randn(r, k, generator=g) / k**0.5
        b = torch.randn(n, r, generator=g)
        s = 2.0
        rms = (s * b @ a).pow(2).mean().sqrt().item()
        b = b * (ratio * 0.02 / rms)
        adapters.append((a.to(dtype), b.to(dtype), s))
    return w, adapters


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_1000_cycles_alternating_two_adapters_bit_exact(dtype):
    """|ΔW| ≈ |W|: plain merge/unmerge changes a third of the elements; the exact one none."""
    w0, ((a1, b1, s1), (a2, b2, s2)) = weight_and_adapters(67, 129, 5, dtype, ratio=1.0)
    w = w0.clone()
    plain = w0.clone()
    lora_ext.merge_(plain, a1, b1, s1)
    lora_ext.unmerge_(plain, a1, b1, s1)
    assert (bits(plain) != bits(w0)).float().mean() > 0.1  # the problem this solves
    for cycle in range(1000):
        for a, b, s in ((a1, b1, s1), (a2, b2, s2)):
            rec = lora_ext.MergeRecord()
            lora_ext.merge_(w, a, b, s, record=rec)
            lora_ext.unmerge_(w, a, b, s, record=rec)
            assert not rec.filled and rec.nbytes == 0  # freed on unmerge
        if cycle in (0, 9, 99):
            assert torch.equal(bits(w), bits(w0)), cycle
    assert torch.equal(bits(w), bits(w0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_merges_unmerge_last_first(dtype):
    w0, adapters = weight_and_adapters(37, 70, 3, dtype, ratio=1.0, count=3)
    w = w0.clone()
    for _ in range(20):
        recs = []
        for a, b, s in adapters:
            recs.append(lora_ext.MergeRecord())
            lora_ext.merge_(w, a, b, s, record=recs[-1])
        for (a, b, s), rec in reversed(list(zip(adapters, recs))):
            lora_ext.unmerge_(w, a, b, s, record=rec)
        assert torch.equal(bits(w), bits(w0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(67, 129, 5), (1, 1, 1), (129, 300, 16), (3, 257, 1)])
def test_merged_weight_obeys_the_tolerance_rule(dtype, shape):
    n, k, r = shape
    w0, ((a, b, s),) = weight_and_adapters(n, k, r, dtype, ratio=0.3, count=1)
    w = w0.clone()
    rec = lora_ext.MergeRecord()
    lora_ext.merge_(w, a, b, s, record=rec)
    ref64 = w0.double() + s * (b.double() @ a.double())
    torch_out = (w0.float() + s * (b.float() @ a.float())).to(dtype)
    assert_rule("merge_exact_", w, ref64, torch_out, dtype)
    # the reference function of the kernels, bit for bit
    d = em.delta(a, b, s)
    assert torch.equal(bits(w), bits((w0.float() + d).to(dtype)))
    lora_ext.unmerge_(w, a, b, s, record=rec)
    assert torch.equal(bits(w), bits(w0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_record_is_small_for_realistic_adapters(dtype):
    """Trained-LoRA-like ΔW (1e-3..1e-2 of |W|): record ≤ 15 % of W's bytes; ΔW ≈ |W| stays below 1.2 × W."""
    sizes = {}
    for ratio in (1e-3, 1e-2, 1.0):
        w0, ((a, b, s),) = weight_and_adapters(256, 512, 16, dtype, ratio=ratio, count=1)
        rec = lora_ext.MergeRecord()
        lora_ext.merge_(w0, a, b, s, record=rec)
        sizes[ratio] = rec.nbytes / (w0.numel() * w0.element_size())
    assert sizes[1e-3] < sizes[1e-2] <= 0.15, sizes
    assert sizes[1.0] < 1.2, sizes


def test_non_contiguous_and_empty_weights():
    w0, ((a, b, s),) = weight_and_adapters(40, 24, 4, torch.bfloat16, ratio=1.0, count=1)
    base = w0.t().contiguous()  # [24, 40]: its transpose is a non-contiguous [40, 24] weight
    w = base.t()
    rec = lora_ext.MergeRecord()
    lora_ext.merge_(w, a, b, s, record=rec)
    assert torch.equal(bits(w), bits((w0.float() + em.delta(a, b, s)).to(torch.bfloat16)))
    lora_ext.unmerge_(w, a, b, s, record=rec)
    assert torch.equal(bits(base), bits(w0.t()))
    for n, k in ((0, 8), (8, 0)):
        w = torch.zeros(n, k, dtype=torch.bfloat16)
        rec = lora_ext.MergeRecord()
        lora_ext.merge_(w, torch.ones(2, k, dtype=w.dtype), torch.ones(n, 2, dtype=w.dtype), 1.0, record=rec)
        assert rec.count == 0
        lora_ext.unmerge_(w, torch.ones(2, k, dtype=w.dtype), torch.ones(n, 2, dtype=w.dtype), 1.0, record=rec)


def test_fp32_factors_on_bf16_weight_and_non_finite():
    w0, ((a, b, s),) = weight_and_adapters(33, 65, 4, torch.bfloat16, ratio=1.0, count=1)
    a32, b32 = a.float() * 1.001, b.float()
    w = w0.clone()
    w[3, 5] = float("inf")
    w[4, 6] = float("nan")
    orig = w.clone()
    rec = lora_ext.MergeRecord()
    lora_ext.merge_(w, a32, b32, s, record=rec)
    assert torch.equal(bits(w)[0], bits((orig.float() + em.delta(a32, b32, s)).to(torch.bfloat16))[0])
    lora_ext.unmerge_(w, a32, b32, s, record=rec)
    assert torch.equal(bits(w), bits(orig))


@requires_extension
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_record_equals_the_fallback_record(dtype):
    """The per-element function is the same on every path: a record unmerges on any other path."""
    w0, ((a, b, s),) = weight_and_adapters(67, 300, 7, dtype, ratio=1.0, count=1)
    wc, wr = w0.clone(), w0.clone()
    ic, vc = torch.ops.lora_ext.merge_exact_(wc, a, b, s)
    ir, vr = em.merge_exact_reference(wr, a, b, s)
    assert torch.equal(bits(wc), bits(wr))
    assert torch.equal(ic, ir) and torch.equal(bits(vc), bits(vr)) and ic.dtype == torch.int32
    em.unmerge_exact_reference(wc, a, b, s, ic, vc)  # compiled record, fallback unmerge
    torch.ops.lora_ext.unmerge_exact_(wr, a, b, s, ir, vr)  # fallback record, compiled unmerge
    assert torch.equal(bits(wc), bits(w0)) and torch.equal(bits(wr), bits(w0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ratio", [1e-2, 30.0])  # 30: most elements recorded, past the kernel's first buffer
def test_cuda_record_equals_the_cpu_record(dtype, ratio):
    w0, ((a, b, s),) = weight_and_adapters(512, 384, 16, dtype, ratio=ratio, count=1)
    wc, wg = w0.clone(), w0.cuda()
    rc, rg = lora_ext.MergeRecord(), lora_ext.MergeRecord()
    lora_ext.merge_(wc, a, b, s, record=rc)
    lora_ext.merge_(wg, a.cuda(), b.cuda(), s, record=rg)
    assert torch.equal(bits(wg.cpu()), bits(wc))
    assert torch.equal(rg.index.cpu(), rc.index) and torch.equal(bits(rg.value.cpu()), bits(rc.value))
    lora_ext.unmerge_(wg, a.cuda(), b.cuda(), s, record=rg)
    assert torch.equal(bits(wg.cpu()), bits(w0))


def _opcheck_samples():
    w0, ((a, b, s),) = weight_and_adapters(19, 33, 3, torch.bfloat16, ratio=1.0, count=1)
    return w0, a, b, s


def test_opcheck():
    w0, a, b, s = _opcheck_samples()
    torch.library.opcheck(torch.ops.lora_ext.merge_exact_.default, (w0.clone(), a, b, s))
    w = w0.clone()
    index, value = torch.ops.lora_ext.merge_exact_(w, a, b, s)
    torch.library.opcheck(torch.ops.lora_ext.unmerge_exact_.default, (w.clone(), a, b, s, index, value))


def test_bad_input_is_refused_before_anything_changes():
    w0, a, b, s = _opcheck_samples()
    w = w0.clone()
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        lora_ext.merge_(w.double(), a.double(), b.double(), s, record=lora_ext.MergeRecord())
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.lora_ext.merge_exact_(w.double(), a.double(), b.double(), s)
    with pytest.raises(TypeError, match="MergeRecord"):
        lora_ext.merge_(w, a, b, s, record={})
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_ext.merge_(w, a[:, :5], b, s, record=lora_ext.MergeRecord())
    assert torch.equal(bits(w), bits(w0))
    rec = lora_ext.MergeRecord()
    lora_ext.merge_(w, a, b, s, record=rec)
    merged = w.clone()
    with pytest.raises(ValueError, match="already holds a merge"):
        lora_ext.merge_(w, a, b, s, record=rec)
    with pytest.raises(ValueError, match="scale"):
        lora_ext.unmerge_(w, a, b, s * 2, record=rec)
    with pytest.raises(ValueError, match="differ from the factors"):
        lora_ext.unmerge_(w, a * 2, b, s, record=rec)
    with pytest.raises(ValueError, match="shape"):
        lora_ext.unmerge_(w[:5], a, b[:5], s, record=rec)
    with pytest.raises(TypeError, match="dtype"):
        lora_ext.unmerge_(w.half(), a.half(), b.half(), s, record=rec)
    with pytest.raises(ValueError, match="empty"):
        lora_ext.unmerge_(w, a, b, s, record=lora_ext.MergeRecord())
    # the op itself, any path: index out of range, mismatched lengths, wrong dtypes
    index, value = rec.index, rec.value
    with pytest.raises(ValueError, match="must lie in"):
        torch.ops.lora_ext.unmerge_exact_(w, a, b, s, index + w.numel(), value)
    with pytest.raises(ValueError, match="one length"):
        torch.ops.lora_ext.unmerge_exact_(w, a, b, s, index, value[:-1])
    with pytest.raises(TypeError, match="int32 or int64"):
        torch.ops.lora_ext.unmerge_exact_(w, a, b, s, index.float(), value)
    with pytest.raises(TypeError, match="weight's dtype"):
        torch.ops.lora_ext.unmerge_exact_(w, a, b, s, index, value.float())
    assert torch.equal(bits(w), bits(merged)) and rec.filled
    lora_ext.unmerge_(w, a, b, s, record=rec)
    assert torch.equal(bits(w), bits(w0))


@pytest.mark.skipif(IN_FALLBACK_MODE, reason="already running in fallback mode")
@requires_extension
def test_this_file_passes_on_the_fallback():
    tail = run_in_fallback_mode(["tests/test_exact_merge.py", "tests/test_model_exact_merge.py"], timeout=900)
    assert " passed" in tail
