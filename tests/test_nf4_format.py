"""NF4 storage: quantize_nf4 / dequantize_nf4 bit-exact with bitsandbytes on CPU.

Every case compares bytes (packed codes, absmax, nested absmax, offset, code
tables) and dequantized values with ``torch.equal``: no tolerance anywhere.
Dequantized values are compared with the math (``code[q] * absmax``) and with
bitsandbytes' default backend, not with its native CPU kernel, which is wrong
on AVX-512 machines for rows that are not a multiple of the blocksize (see
tests/bnb_oracle.py and test_bitsandbytes_native_dequantize_discrepancy).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from bnb_oracle import default_dequantize_4bit, nf4_math_dequantize

import lora_ext
from lora_ext.ops import reference
from lora_ext.quant import nf4

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
SHAPES = [(1, 1), (1, 3), (3, 5), (7, 33), (64, 64), (5, 97), (33, 129), (130, 257), (1, 4097)]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes wraps its default dequantize in torch.compile (a recompile per
    # shape); the eager function computes the same values and keeps the suite fast.
    with torch._dynamo.config.patch(disable=True), default_dequantize_4bit():
        yield


def bnb_quantize(w, blocksize, double_quant):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_dequantize(packed, qs, dtype):
    qs.dtype = dtype
    return F.dequantize_4bit(packed, qs, quant_type="nf4")


def assert_same_as_bnb(w, blocksize, double_quant, out_dtypes=DTYPES):
    packed, qs = bnb_quantize(w, blocksize, double_quant)
    q = lora_ext.quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    tag = f"shape={list(w.shape)} dtype={w.dtype} blocksize={blocksize} double_quant={double_quant}"
    assert q.packed.shape == packed.shape and torch.equal(q.packed, packed), f"packed differs: {tag}"
    assert q.absmax.dtype == qs.absmax.dtype, tag
    assert torch.equal(q.absmax.view(torch.uint8) if q.absmax.dtype == torch.uint8 else q.absmax.view(torch.int32),
                       qs.absmax.view(torch.uint8) if qs.absmax.dtype == torch.uint8 else qs.absmax.view(torch.int32)), (
        f"absmax differs: {tag}"
    )  # fmt: skip
    assert q.shape == w.shape and q.dtype == w.dtype and q.blocksize == blocksize
    if double_quant:
        assert torch.equal(q.nested_absmax.view(torch.int32), qs.state2.absmax.view(torch.int32)), tag
        assert torch.equal(q.offset.view(torch.int32), qs.offset.view(torch.int32)), tag
        assert torch.equal(q.nested_code, qs.state2.code), tag
        assert q.nested_blocksize == qs.state2.blocksize
    else:
        assert q.nested_absmax is None and q.offset is None
    for dtype in out_dtypes:
        ref = bnb_dequantize(packed, qs, dtype)
        out = lora_ext.dequantize_nf4(q, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        for oracle, what in (
            (ref, "bitsandbytes' default backend"),
            (nf4_math_dequantize(packed, qs, dtype), "the math"),
        ):
            assert torch.equal(out, oracle) or (
                torch.isnan(out).any() and torch.equal(out.nan_to_num(), oracle.nan_to_num())
            ), f"dequantize differs from {what}: {tag} out dtype {dtype}"
    return q


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4.nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_random_odd_shapes(shape, dtype, double_quant):
    g = torch.Generator().manual_seed(math.prod(shape))
    w = torch.randn(shape, generator=g).to(dtype)
    assert_same_as_bnb(w, 64, double_quant)


@pytest.mark.parametrize("blocksize", nf4.SUPPORTED_BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_every_blocksize(blocksize, double_quant):
    g = torch.Generator().manual_seed(blocksize)
    w = torch.randn(37, 301, generator=g) * 0.02  # 11137 elements: a short tail for every blocksize
    assert_same_as_bnb(w, blocksize, double_quant)


def test_large_weight_double_quant():
    # > 256 blocks, so the double quantization has several nested blocks and a tail.
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(700, 513, generator=g) * torch.rand(700, 1, generator=g) * 0.1).to(torch.bfloat16)
    assert_same_as_bnb(w, 64, True, out_dtypes=[torch.bfloat16])


def _midpoint_values() -> torch.Tensor:
    code = nf4.nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    below = torch.nextafter(mids, torch.full_like(mids, -2.0))
    above = torch.nextafter(mids, torch.full_like(mids, 2.0))
    return torch.cat([mids, below, above, code])  # 61 values in [-1, 1]


@pytest.mark.parametrize("absmax", [1.0, 0.5, 3.0, 0.0123, 1e30], ids=["1", "0.5", "3", "0.0123", "1e30"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_exact_code_midpoints(absmax, blocksize):
    """Values on, just below and just above each midpoint: ties take the lower code, like bitsandbytes."""
    vals = _midpoint_values() * absmax
    block = torch.zeros(blocksize)
    block[0] = absmax  # sets the block's absmax exactly
    block[1 : 1 + vals.numel()] = vals
    # two full blocks (multiply-by-reciprocal path) and a 63-element tail (division path)
    w = torch.cat([block, block.flip(0), block[:63]]).view(1, -1)
    q = assert_same_as_bnb(w, blocksize, False, out_dtypes=[torch.float32])
    if absmax == 1.0:
        codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(-1)
        mids_at = codes[1:16].long()
        assert torch.equal(mids_at, torch.arange(15)), "a value exactly on a midpoint must take the lower code"


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_huge_and_tiny_magnitudes(double_quant):
    fmax = torch.finfo(torch.float32).max
    rows = [
        torch.full((64,), fmax) * torch.linspace(-1, 1, 64),  # largest finite values
        torch.linspace(-1, 1, 64) * 1e-40,  # subnormal absmax (clamped to 1e-38 in the scale)
        torch.linspace(-1, 1, 64) * 1e-45,  # smallest subnormals
        torch.linspace(-1, 1, 64) * 1e-37,
        torch.linspace(-1, 1, 64) * 3e38,
    ]
    w = torch.stack(rows)
    if double_quant:
        w = w[1:4]  # the mean of fp32-max scales overflows in bitsandbytes too; keep the scales finite
    assert_same_as_bnb(w, 64, double_quant, out_dtypes=[torch.float32])
    assert_same_as_bnb(w[:, :-3], 64, double_quant, out_dtypes=[torch.float32])  # tail blocks


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_all_zero_blocks(double_quant):
    """Documented: absmax 0 and code 7 (0.0) everywhere; a zero tail stores absmax 1e-38 (bitsandbytes' CPU path)."""
    w = torch.zeros(3, 100)
    w[1, 10] = 0.5
    q = assert_same_as_bnb(w, 64, double_quant)
    if not double_quant:
        assert q.absmax[0].item() == 0.0
        assert (q.packed.view(-1)[:32] == 0x77).all()
        assert q.absmax[-1].item() == pytest.approx(1e-38, rel=1e-4)  # 300 = 4*64 + 44: the tail is zero
    assert torch.equal(lora_ext.dequantize_nf4(q, torch.float32)[0], torch.zeros(100))
    assert_same_as_bnb(torch.zeros(4, 64), 64, double_quant)


def test_nan_inf_policy_plain():
    """Without double quantization NaN/Inf give bitsandbytes' bytes exactly."""
    w = torch.randn(4, 64)
    w[0, 3] = float("nan")
    w[1, 5] = float("inf")
    w[2, 7] = float("-inf")
    q = assert_same_as_bnb(w, 64, False, out_dtypes=[torch.float32])
    assert torch.isnan(q.absmax[0]) and torch.isinf(q.absmax[1])
    codes = torch.stack([q.packed.view(-1) >> 4, q.packed.view(-1) & 15], 1).view(4, 64)
    assert (codes[0] == 15).all()
    assert codes[1, 5] == 15 and (codes[1, :5] == 7).all()
    assert torch.equal(codes[3], bnb_codes(w[3:]))


def bnb_codes(w):
    p, _ = bnb_quantize(w, 64, False)
    return torch.stack([p.view(-1) >> 4, p.view(-1) & 15], 1).view(-1)


def test_nan_inf_policy_double_quant_refused():
    w = torch.randn(4, 64)
    w[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lora_ext.quantize_nf4(w, 64, double_quant=True)
    w[2, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        lora_ext.quantize_nf4(w, 64, double_quant=True)


def test_8bit_lut_boundaries():
    """Double quantization's 8-bit step at the edges of bitsandbytes' 65536-entry lookup table."""
    g = torch.Generator().manual_seed(3)
    k = torch.randint(0, 65536, (4096,), generator=g).double()
    edges = (k + 0.5) / 65535 * 2 - 1
    vals = torch.cat([edges.float(), torch.nextafter(edges.float(), torch.tensor(2.0)), torch.randn(1000, generator=g)])
    vals[::256] = 1.0
    code = nf4.dynamic_map()
    q, absmax = torch.ops.lora_ext.blockwise_quantize_8bit(vals, code, 256)
    ref_q, ref_state = F.quantize_blockwise(vals, blocksize=256)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(q, ref_q)


def test_quantize_is_pure():
    w = torch.randn(9, 70, dtype=torch.bfloat16)
    w0 = w.clone()
    lora_ext.quantize_nf4(w, 64, True)
    assert torch.equal(w, w0)


def test_non_contiguous_weight():
    w = torch.randn(96, 40).t()  # [40, 96] with strides (1, 40)
    assert_same_as_bnb(w.contiguous(), 64, True)
    q1 = lora_ext.quantize_nf4(w, 64, True)
    q2 = lora_ext.quantize_nf4(w.contiguous(), 64, True)
    assert torch.equal(q1.packed, q2.packed) and torch.equal(q1.absmax, q2.absmax)


def test_bits_per_param():
    q = lora_ext.quantize_nf4(torch.randn(1024, 1024), 64, True)
    # 4 bits + 8/64 (absmax codes) + 32/(64*256) (nested scales) + the offset
    assert q.bits_per_param() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    q = lora_ext.quantize_nf4(torch.randn(1024, 1024), 64, False)
    assert q.bits_per_param() == pytest.approx(4.5)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_opcheck_quant_ops(double_quant):
    w = torch.randn(5, 97)
    torch.library.opcheck(torch.ops.lora_ext.nf4_quantize.default, (w, 64))
    q = lora_ext.quantize_nf4(w, 64, double_quant)
    torch.library.opcheck(torch.ops.lora_ext.nf4_dequantize.default, (*q.op_args(), [5, 97], torch.bfloat16))
    torch.library.opcheck(
        torch.ops.lora_ext.blockwise_quantize_8bit.default, (torch.randn(300), nf4.dynamic_map(), 256)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dispatched_kernels_equal_pure_pytorch_reference(dtype):
    """Whatever serves CPU (the compiled kernel when loaded) gives the reference's bytes and values."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(37, 301, generator=g) * 0.05).to(dtype)
    for bs in (32, 64, 4096):
        p, am = torch.ops.lora_ext.nf4_quantize(w, bs)
        p_ref, am_ref = reference.nf4_quantize(w, bs)
        assert torch.equal(p, p_ref) and torch.equal(am, am_ref)
    x = torch.randn(5000, generator=g)
    q8, a8 = torch.ops.lora_ext.blockwise_quantize_8bit(x, nf4.dynamic_map(), 256)
    q8_ref, a8_ref = reference.blockwise_quantize_8bit(x, nf4.dynamic_map(), 256)
    assert torch.equal(q8, q8_ref) and torch.equal(a8, a8_ref)
    q = lora_ext.quantize_nf4(w, 64, True)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        args = (*q.op_args(), list(q.shape), out_dtype)
        assert torch.equal(torch.ops.lora_ext.nf4_dequantize(*args), reference.nf4_dequantize(*args))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_bitsandbytes_native_dequantize_discrepancy(double_quant):
    """Documents bitsandbytes 0.50's native AVX-512 CPU dequantize: wrong when blocks straddle rows.

    lora_ext equals the math and bitsandbytes' default backend bit for bit; the
    native kernel (used where torch reports AVX512) is off by up to ~0.04 on a
    [64, 96] weight with blocksize 64. Skipped where that kernel is not used.
    """
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("bitsandbytes' native AVX-512 dequantize is not used on this CPU")
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        pytest.skip("bitsandbytes' native library is not loaded")
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
    packed, qs = bnb_quantize(w, 64, double_quant)
    math = nf4_math_dequantize(packed, qs, torch.float32)
    ours = lora_ext.dequantize_nf4(lora_ext.quantize_nf4(w, 64, double_quant), torch.float32)
    assert torch.equal(ours, math)
    import ctypes

    absmax = (F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset) if double_quant else qs.absmax
    absmax = absmax.float().contiguous()
    codes = packed.view(torch.uint8).reshape(64, 48).contiguous()
    native = torch.empty(64, 96)
    lib.cdequantize_blockwise_cpu_nf4_fp32(  # the kernel bitsandbytes' CPU backend calls (the fixture bypasses it)
        F.get_ptr(codes),
        F.get_ptr(absmax),
        F.get_ptr(native),
        ctypes.c_longlong(64),
        ctypes.c_longlong(64),
        ctypes.c_longlong(96),
    )
    err = (native - math).abs().max().item()
    if err > 0:
        warnings.warn(
            f"bitsandbytes' native CPU dequantize_4bit differs from the math by {err:.3g} (known bug)", stacklevel=1
        )
