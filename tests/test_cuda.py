"""CUDA kernels: every op, dtype and odd shape against a float64 reference (docs/design.md §4),
against the CPU path, and under the dispatcher tools (opcheck, gradcheck, torch.compile).

Skipped as a whole without a GPU or without compiled CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, assert_rule, make_inputs, max_err, torch_lora

import lora_ext
from lora_ext.ops import reference as _reference

_INFO = lora_ext.build_info()
_SKIP_REASON = (
    "no CUDA device"
    if not torch.cuda.is_available()
    else "lora_ext was built without CUDA kernels"
    if not _INFO.get("cuda")
    else ""
)

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON or "n/a")]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]
# (M, K, N, r): tile-missing sizes, r = 1, decode-sized M, M = 0, vector-aligned sizes.
SHAPES = [(37, 129, 67, 5), (1, 8, 3, 1), (0, 129, 67, 5), (64, 64, 64, 16), (300, 96, 40, 8), (5, 256, 512, 1)]
STRATEGIES = ["shrink_expand", "merge", "auto"]
SCALE = 1.75
OPS = torch.ops.lora_ext


def _ids(shape):
    return "x".join(map(str, shape))


def _cuda(ts):
    return [t.to(DEV) if t is not None else None for t in ts]


_SMALL_BLOCK = 1 << 20  # the caching allocator serves requests up to 1 MiB from its small pool


def _poison_cache():
    """Leave NaN in the caching allocator's free blocks so an output element the
    kernels forget to write shows up as NaN (docs/design.md §4: every element written).

    Both pools: a 256 MiB NaN tensor leaves a poisoned block in the large pool
    (requests > 1 MiB), but the small outputs of most tests come from the small
    pool (2 MiB segments cut into blocks <= 1 MiB), which no large allocation
    touches. So every free block, read from the allocator's snapshot, is taken
    with a request of exactly its size (best fit hands back that very block),
    filled with 0xFF bytes (NaN in fp32, fp16, bf16 and fp64 alike) and released."""
    junk = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=DEV)
    del junk
    device, stream = torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream
    held = []
    for _ in range(4):  # a request can split a larger free block or open a new segment: take what is left too
        sizes = []
        for seg in torch.cuda.memory_snapshot():
            # only blocks this stream's allocations can get (not another stream's, nor a CUDA graph's pool)
            if (seg.get("device", device), seg.get("stream", 0)) != (device, stream):
                continue
            if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
                continue
            small = seg.get("segment_type") == "small"
            for block in seg["blocks"]:
                size = block["size"] if block["state"] == "inactive" else 0
                if small:  # a wholly free 2 MiB segment is taken as two 1 MiB blocks
                    sizes += [min(_SMALL_BLOCK, size - at) for at in range(0, size, _SMALL_BLOCK)]
                elif size > _SMALL_BLOCK:  # large-pool remainders <= 1 MiB never serve a large request
                    sizes.append(size)
        if not sizes:
            break
        held += [torch.empty(n, dtype=torch.uint8, device=DEV).fill_(0xFF) for n in sorted(sizes, reverse=True)]
    del held


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y = fn(*leaves)
    wrt = [t for t in leaves if t is not None]
    return y.detach(), torch.autograd.grad(y, wrt, grad, allow_unused=False)


def torch_merged_lora(x, weight, lora_A, lora_B, scale, bias=None):
    """Plain PyTorch for the merge strategy: merge in the dtype, then F.linear (a merged PEFT layer)."""
    return torch.nn.functional.linear(x, weight + (lora_B @ lora_A) * scale, bias)


def assert_rule_any(name, out, ref64, plains, dtype):
    """docs/design.md §4 with the yardstick the larger error of the given plain-PyTorch computations."""
    if out.numel() == 0:  # M = 0 and friends: nothing to measure, only the metadata
        assert out.shape == ref64.shape and out.dtype == plains[0].dtype, name
        return
    worst = max(plains, key=lambda t: max_err(t, ref64))
    assert_rule(name, out, ref64, worst, dtype)


def _check_against_float64(dtype, inputs, fn, keep=None, p=0.0, merged=False):
    """Forward and every gradient of `fn` (on CUDA) against the float64 formula, with plain
    PyTorch in `dtype` on the same device as the error yardstick. merged=True (the merge
    strategy, which rounds W + s B A to the dtype before one GEMM) also admits the error
    of PyTorch's own merged layer as yardstick."""
    x = inputs[0]
    g64 = torch.randn(x.shape[0], inputs[1].shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    g = g64.to(dtype=dtype, device=DEV)
    ours = _grads(fn, inputs, g)
    ref_keep = keep.to(DEV) if keep is not None else None

    def unfused(x, w, a, b, bb):
        return torch_lora(x, w, a, b, SCALE, bb, keep=ref_keep, p=p)

    ref = _grads(unfused, [t.double() if t is not None else None for t in inputs], g64.to(DEV))
    plains = [_grads(unfused, inputs, g)]
    if merged:
        plains.append(_grads(lambda x, w, a, b, bb: torch_merged_lora(x, w, a, b, SCALE, bb), inputs, g))
    assert_rule_any("y", ours[0], ref[0], [pl[0] for pl in plains], dtype)
    names = ["grad_x", "grad_weight", "grad_A", "grad_B", "grad_bias"]
    for i, (name, o, r) in enumerate(zip(names, ours[1], ref[1])):
        assert o.is_cuda
        assert_rule_any(name, o, r, [pl[1][i] for pl in plains], dtype)
    return ours


# --------------------------------------------------------------------- lora_linear


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_forward_and_grads_match_float64(dtype, shape, strategy, bias):
    m, k, n, r = shape
    inputs = _cuda(make_inputs(m, k, n, r, dtype, bias=bias))
    _poison_cache()
    _check_against_float64(
        dtype,
        inputs,
        lambda x, w, a, b, bb: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=strategy),
        merged=strategy != "shrink_expand",
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_cuda_agrees_with_cpu_path(dtype, strategy):
    m, k, n, r = 37, 129, 67, 5
    cpu = make_inputs(m, k, n, r, dtype)
    x, w, a, b, bb = cpu
    y_cpu = lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=strategy)
    y_gpu = lora_ext.lora_linear(*_cuda([x, w, a, b]), SCALE, bias=bb.to(DEV), strategy=strategy)
    ref = torch_lora(*[t.double() for t in (x, w, a, b)], SCALE, bb.double())
    plain = max(max_err(torch_lora(x, w, a, b, SCALE, bb), ref), max_err(torch_merged_lora(x, w, a, b, SCALE, bb), ref))
    # Both paths meet the rule, so they differ by at most the sum of their errors.
    bound = 4 * plain + 2 * ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert max_err(y_gpu, y_cpu) <= bound


def test_multi_chunk_shapes():
    """Large enough that the backward (and the dropout forward) run several row chunks."""
    m, k, n, r = 6000, 2048, 2048, 16
    dtype = torch.bfloat16
    inputs = _cuda(make_inputs(m, k, n, r, dtype))
    for strategy in ("shrink_expand", "merge"):
        _check_against_float64(
            dtype,
            inputs,
            lambda x, w, a, b, bb, s=strategy: lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=s),
            merged=strategy == "merge",
        )


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_many_small_row_chunks(dtype, p, monkeypatch):
    """The row-chunked passes (dropout masking, xa/gb, grad_A/grad_B accumulation) with
    43 chunks and a remainder, against the float64 formula with the CPU mask."""
    monkeypatch.setenv("LORA_EXT_CUDA_CHUNK_ROWS", "7")
    m, k, n, r = 300, 96, 40, 8
    inputs = _cuda(make_inputs(m, k, n, r, dtype))
    keep = None
    if p > 0:
        torch.manual_seed(5)
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=DEV)
        keep = OPS.dropout_mask(seed.cpu(), m, k, p)

    def fused(x, w, a, b, bb):
        torch.manual_seed(5)
        return lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, dropout_p=p, strategy="shrink_expand")

    _check_against_float64(dtype, inputs, fused, keep=keep, p=p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_non_contiguous_offset_transposed(dtype):
    m, k, n, r = 37, 129, 67, 5
    x, w, a, b, bb = _cuda(make_inputs(m, k, n, r, dtype))
    layouts = {
        "offset": lambda t: _embed(t, offset=(3, 5)),
        "strided": lambda t: _strided(t),
        "transposed": lambda t: t.t().contiguous().t(),
    }
    y_ref = torch_lora(*[t.double() for t in (x, w, a, b)], SCALE, bb.double())
    plains = {
        "shrink_expand": [torch_lora(x, w, a, b, SCALE, bb)],
        "merge": [torch_lora(x, w, a, b, SCALE, bb), torch_merged_lora(x, w, a, b, SCALE, bb)],
    }
    for name, f in layouts.items():
        for which in range(4):
            args = [x, w, a, b]
            args[which] = f(args[which])
            assert torch.equal(args[which], [x, w, a, b][which])
            for strategy in ("shrink_expand", "merge"):
                y = lora_ext.lora_linear(*args, SCALE, bias=bb, strategy=strategy)
                assert_rule_any(f"y[{name} arg{which} {strategy}]", y, y_ref, plains[strategy], dtype)
                g = torch.randn_like(y)
                o = OPS.lora_linear_backward(
                    g,
                    args[0],
                    args[1],
                    args[2],
                    args[3],
                    SCALE,
                    0.0,
                    None,
                    lora_ext.STRATEGIES[strategy],
                    [True, True, True, True, True],
                )
                c = OPS.lora_linear_backward(
                    g, x, w, a, b, SCALE, 0.0, None, lora_ext.STRATEGIES[strategy], [True, True, True, True, True]
                )
                for go, gc in zip(o, c):
                    # Same math on differently laid-out operands: cuBLAS may pick another
                    # kernel, so compare to the rounding of the dtype rather than bitwise.
                    tol = 16 * torch.finfo(dtype).eps * max(1.0, gc.abs().max().item())
                    assert (go - gc).abs().max().item() <= tol, name


def _embed(t, offset):
    base = torch.zeros(t.shape[0] + offset[0] + 2, t.shape[1] + offset[1] + 3, dtype=t.dtype, device=t.device)
    view = base[offset[0] : offset[0] + t.shape[0], offset[1] : offset[1] + t.shape[1]]
    view.copy_(t)
    assert view.storage_offset() > 0 and not view.is_contiguous()
    return view


def _strided(t):
    base = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
    view = base[:, ::2]
    view.copy_(t)
    return view


def test_leading_batch_dims():
    x, w, a, b, bb = _cuda(make_inputs(9, 40, 24, 4, torch.float32, batch=(2, 3)))
    y = lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb)
    assert y.shape == (2, 3, 9, 24)
    ref = torch_lora(*[t.double() for t in (x, w, a, b)], SCALE, bb.double())
    assert_rule("y", y, ref, torch_lora(x, w, a, b, SCALE, bb), torch.float32)


@pytest.mark.parametrize("strategy", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_expanded_grad_out(dtype, strategy):
    m, k, n, r = 37, 129, 67, 5
    x, w, a, b, _ = _cuda(make_inputs(m, k, n, r, dtype))
    g_row = torch.randn(1, n, dtype=dtype, device=DEV)
    expanded = g_row.expand(m, n)
    assert expanded.stride(0) == 0
    mask = [True, True, True, True, True]
    got = OPS.lora_linear_backward(expanded, x, w, a, b, SCALE, 0.0, None, strategy, mask)
    want = OPS.lora_linear_backward(expanded.contiguous(), x, w, a, b, SCALE, 0.0, None, strategy, mask)
    for name, g1, g2 in zip(["x", "w", "bias", "A", "B"], got, want):
        assert torch.equal(g1, g2), name
    # and through autograd with a scalar loss (whose grad is an expanded 1.0)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b)]
    lora_ext.lora_linear(*leaves, SCALE, strategy=["auto", "shrink_expand", "merge"][strategy]).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_shapes(dtype):
    for m, k, n, r in [(0, 16, 8, 2), (5, 0, 8, 2), (5, 16, 0, 2), (0, 0, 0, 1)]:
        x, w, a, b, bb = _cuda(make_inputs(m, k, n, r, dtype))
        for strategy in (1, 2):
            y = OPS.lora_linear(x, w, bb, a, b, SCALE, 0.0, None, strategy)
            assert y.shape == (m, n) and y.device.type == "cuda"
            ref = torch_lora(*[t.double() for t in (x, w, a, b)], SCALE, bb.double())
            assert torch.allclose(y.double(), ref, atol=1e-2)
            g = torch.randn(m, n, dtype=dtype, device=DEV)
            gx, gw, gbias, ga, gb = OPS.lora_linear_backward(g, x, w, a, b, SCALE, 0.0, None, strategy, [True] * 5)
            assert gx.shape == (m, k) and gw.shape == (n, k) and gbias.shape == (n,)
            assert ga.shape == (r, k) and gb.shape == (n, r)
            if m == 0:
                for t in (gw, gbias, ga, gb):
                    assert torch.count_nonzero(t) == 0


def test_output_mask_unrequested_are_empty():
    x, w, a, b, _ = _cuda(make_inputs(37, 129, 67, 5, torch.bfloat16))
    g = torch.randn(37, 67, dtype=torch.bfloat16, device=DEV)
    full = OPS.lora_linear_backward(g, x, w, a, b, SCALE, 0.0, None, 1, [True] * 5)
    for i in range(5):
        mask = [j == i for j in range(5)]
        out = OPS.lora_linear_backward(g, x, w, a, b, SCALE, 0.0, None, 1, mask)
        for j, t in enumerate(out):
            if j == i:
                assert torch.equal(t, full[j])
            else:
                assert t.shape == (0,) and t.dtype == x.dtype


def test_no_nan_in_outputs_with_poisoned_allocator():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w, a, b, bb = _cuda(make_inputs(37, 129, 67, 5, dtype))
        g = torch.randn(37, 67, dtype=dtype, device=DEV)
        for strategy in (1, 2):
            for p, seed in ((0.0, None), (0.3, torch.tensor(5, device=DEV))):
                _poison_cache()
                y = OPS.lora_linear(x, w, bb, a, b, SCALE, p, seed, strategy)
                _poison_cache()
                grads = OPS.lora_linear_backward(g, x, w, a, b, SCALE, p, seed, strategy, [True] * 5)
                assert torch.isfinite(y).all()
                assert all(torch.isfinite(t).all() for t in grads)
        _poison_cache()
        assert torch.isfinite(OPS.merged_weight(w, a, b, SCALE)).all()


def test_nan_propagates_like_pytorch():
    x, w, a, b, bb = _cuda(make_inputs(8, 16, 12, 2, torch.float32))
    x[3, 4] = float("nan")
    for strategy in ("shrink_expand", "merge"):
        y = lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, strategy=strategy)
        ref = torch_lora(x, w, a, b, SCALE, bb)
        assert torch.equal(torch.isnan(y), torch.isnan(ref))


def test_other_stream_and_device_guard():
    x, w, a, b, bb = _cuda(make_inputs(300, 96, 40, 8, torch.bfloat16))
    want = lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb)
        merged = lora_ext.merged_weight(w, a, b, SCALE)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got, want)
    assert torch.equal(merged, lora_ext.merged_weight(w, a, b, SCALE))
    if torch.cuda.device_count() > 1:
        on1 = [t.to("cuda:1") for t in (x, w, a, b, bb)]
        with torch.cuda.device(0):
            y1 = lora_ext.lora_linear(*on1[:4], SCALE, bias=on1[4])
        assert y1.device == torch.device("cuda:1")
        torch.testing.assert_close(y1.cpu(), want.cpu())


# ------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999, 1.0])
def test_dropout_mask_bit_identical_to_cpu(p):
    for seed_value in (0, 1, 123456789, 2**62 - 1, -5, 2**40 + 17):
        seed = torch.tensor(seed_value, dtype=torch.int64)
        for rows, cols in ((37, 129), (1, 1), (0, 5), (513, 1000)):
            cpu = OPS.dropout_mask(seed, rows, cols, p)
            gpu = OPS.dropout_mask(seed.to(DEV), rows, cols, p)
            assert gpu.device.type == "cuda" and gpu.dtype == torch.bool and gpu.shape == (rows, cols)
            assert torch.equal(gpu.cpu(), cpu), (seed_value, rows, cols, p)
            assert torch.equal(gpu.cpu(), _reference.dropout_mask(seed, rows, cols, p))


@pytest.mark.slow
def test_dropout_mask_indices_beyond_2_pow_32():
    """The high half of the 64-bit element index enters the hash."""
    seed = torch.tensor(987654321, dtype=torch.int64)
    rows, cols, p = 65537, 65536, 0.5  # 2**32 + 65536 elements (4.3 GB of bool)
    mask = OPS.dropout_mask(seed.to(DEV), rows, cols, p)
    tail = mask[-1].cpu()  # indices 2**32 .. 2**32 + 65535
    idx = torch.arange(2**32, 2**32 + cols, dtype=torch.int64)
    mask32 = 0xFFFFFFFF
    s = seed.reshape(())
    h = _reference._hash32(
        (idx & mask32) ^ _reference._hash32((s & mask32) ^ _reference._hash32((idx >> 32) ^ ((s >> 32) & mask32)))
    )
    assert torch.equal(tail, h >= _reference.dropout_threshold(p))
    del mask


@pytest.mark.parametrize("shape", [(37, 129, 67, 5), (6000, 2048, 1024, 16)], ids=_ids)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dropout_forward_backward_match_explicit_mask(dtype, p, shape):
    m, k, n, r = shape
    inputs = _cuda(make_inputs(m, k, n, r, dtype))
    torch.manual_seed(321)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=DEV)  # exactly what the wrapper draws
    keep = OPS.dropout_mask(seed.cpu(), m, k, p)  # the CPU mask: the CUDA kernels must drop the same elements

    def fused(x, w, a, b, bb):
        torch.manual_seed(321)
        return lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, dropout_p=p)

    _check_against_float64(dtype, inputs, fused, keep=keep, p=p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dropout_p_one_drops_the_whole_branch(dtype):
    x, w, a, b, bb = _cuda(make_inputs(37, 129, 67, 5, dtype))
    seed = torch.tensor(8, device=DEV)
    ref = torch.nn.functional.linear(x.double(), w.double(), bb.double())
    plain = torch.nn.functional.linear(x, w, bb)
    y = OPS.lora_linear(x, w, bb, a, b, SCALE, 1.0, seed, 1)
    assert_rule("y(p=1)", y, ref, plain, dtype)
    g = torch.randn(37, 67, dtype=dtype, device=DEV)
    gx, _, _, ga, gb = OPS.lora_linear_backward(g, x, w, a, b, SCALE, 1.0, seed, 1, [True, False, False, True, True])
    assert torch.count_nonzero(ga) == 0 and torch.count_nonzero(gb) == 0
    assert_rule("grad_x(p=1)", gx, g.double() @ w.double(), g @ w, dtype)


def test_dropout_cuda_matches_cpu_op_exactly_in_float64():
    m, k, n, r = 37, 129, 67, 5
    cpu = make_inputs(m, k, n, r, torch.float64)
    seed = torch.tensor(42, dtype=torch.int64)
    x, w, a, b, bb = cpu
    y_cpu = OPS.lora_linear(x, w, bb, a, b, SCALE, 0.3, seed, 1)
    y_gpu = OPS.lora_linear(*_cuda([x, w, bb, a, b]), SCALE, 0.3, seed.to(DEV), 1)
    # float64 accumulation everywhere: any mask difference would be O(1), rounding is O(1e-15)
    assert max_err(y_gpu, y_cpu) < 1e-10


def test_seed_is_read_on_device_without_sync():
    x, w, a, b, bb = _cuda(make_inputs(37, 129, 67, 5, torch.float32))
    seed = torch.tensor(11, device=DEV)
    y1 = OPS.lora_linear(x, w, bb, a, b, SCALE, 0.5, seed, 1)
    seed.fill_(12)  # the kernels read the seed tensor's current value, not a host copy
    y2 = OPS.lora_linear(x, w, bb, a, b, SCALE, 0.5, seed, 1)
    y2_ref = OPS.lora_linear(x, w, bb, a, b, SCALE, 0.5, torch.tensor(12, device=DEV), 1)
    assert not torch.equal(y1, y2)
    assert torch.equal(y2, y2_ref)


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("shape", [(67, 129, 5), (64, 256, 16), (4096, 4096, 16), (3, 8, 1), (300, 520, 40)], ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merge_matches_float64(dtype, shape):
    n, k, r = shape
    _, w, a, b, _ = _cuda(make_inputs(2, k, n, r, dtype, bias=False))
    ref = w.double() + SCALE * (b.double() @ a.double())
    plain = w + SCALE * (b @ a)
    _poison_cache()
    merged = lora_ext.merged_weight(w, a, b, SCALE)
    assert_rule("merged_weight", merged, ref, plain, dtype)
    inplace = w.clone()
    lora_ext.merge_(inplace, a, b, SCALE)
    assert torch.equal(inplace, merged)
    # same function as the CPU kernel, up to fp32 summation order
    cpu = lora_ext.merged_weight(w.cpu(), a.cpu(), b.cpu(), SCALE)
    assert max_err(merged, cpu) <= 2 * max_err(plain, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_merge_unmerge_round_trip(dtype):
    _, w, a, b, _ = _cuda(make_inputs(2, 520, 300, 8, dtype, bias=False))
    w0 = w.clone()
    lora_ext.merge_(w, a, b, SCALE)
    assert not torch.equal(w, w0)
    lora_ext.unmerge_(w, a, b, SCALE)
    # two roundings of |W + s BA|: at most about one ulp of the merged magnitude each
    delta = SCALE * (b.double() @ a.double())
    tol = 2 * torch.finfo(dtype).eps * (w0.double().abs() + delta.abs()).max().item()
    assert (w.double() - w0.double()).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_layouts(dtype):
    n, k, r = 72, 136, 5  # both multiples of 8: the transposed view takes the vector path
    _, w, a, b, _ = _cuda(make_inputs(2, k, n, r, dtype, bias=False))
    want = lora_ext.merged_weight(w, a, b, SCALE)
    views = {
        "transposed": w.t().contiguous().t(),  # stored as W^T: the vector path on the transpose
        "strided": _strided(w),  # no unit stride pair: the scalar path
        "offset": _embed(w, offset=(1, 3)),  # unaligned start: the scalar path
    }
    for name, view in views.items():
        got = lora_ext.merged_weight(view, a.t().contiguous().t(), b, SCALE)
        assert got.shape == w.shape
        assert (got.double() - want.double()).abs().max().item() <= torch.finfo(dtype).eps * want.abs().max().item(), (
            name
        )
        lora_ext.merge_(view, a, b, SCALE)
        assert (view.double() - want.double()).abs().max().item() <= torch.finfo(dtype).eps * want.abs().max().item(), (
            name
        )


def test_merge_rejects_overlapping_weight():
    _, w, a, b, _ = _cuda(make_inputs(2, 16, 1, 2, torch.float32, bias=False))
    expanded = w.expand(8, 16)
    with pytest.raises(RuntimeError, match="overlap"):
        OPS.merge_(expanded, a, b.expand(8, 2), SCALE)


def test_errors_name_tensors_and_devices():
    x, w, a, b, _ = _cuda(make_inputs(4, 16, 8, 2, torch.float32))
    with pytest.raises(TypeError, match="lora_A is on cpu"):  # devices: TypeError, as in lora_ext/ops/checks.py
        OPS.lora_linear(x, w, None, a.cpu(), b, SCALE, 0.0, None, 0)
    with pytest.raises(ValueError, match="dropout_seed"):
        OPS.lora_linear(x, w, None, a, b, SCALE, 0.5, torch.tensor(1), 0)
    with pytest.raises(ValueError, match="lora_B"):
        OPS.merged_weight(w, a, b[:, :1].contiguous(), SCALE)


# ------------------------------------------------------------- dispatcher tooling


def _op_samples():
    x, w, a, b, bb = _cuda(make_inputs(37, 129, 67, 5, torch.float32))
    seed = torch.tensor(3, device=DEV)
    g = torch.randn(37, 67, device=DEV)
    yield OPS.lora_linear.default, (x, w, bb, a, b, SCALE, 0.0, None, 1)
    yield OPS.lora_linear.default, (x, w, None, a, b, SCALE, 0.0, None, 2)
    yield OPS.lora_linear.default, (x, w, bb, a, b, SCALE, 0.25, seed, 0)
    yield OPS.lora_linear_backward.default, (g, x, w, a, b, SCALE, 0.25, seed, 1, [True, False, True, True, True])
    yield OPS.lora_linear_backward.default, (g, x, w, a, b, SCALE, 0.0, None, 2, [True, True, True, True, True])
    yield OPS.merge_.default, (w.clone(), a, b, SCALE)
    yield OPS.merged_weight.default, (w, a, b, SCALE)
    yield OPS.dropout_mask.default, (seed, 7, 9, 0.3)


def test_opcheck_every_op():
    for op, args in _op_samples():
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("strategy", [1, 2])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_gradcheck_float64(strategy, p):
    x, w, a, b, bb = _cuda(make_inputs(6, 9, 7, 3, torch.float64))
    seed = torch.tensor(99, device=DEV) if p > 0 else None

    def f(x, w, a, b, bb):
        return OPS.lora_linear(x, w, bb, a, b, SCALE, p, seed, strategy)

    args = tuple(t.detach().requires_grad_(True) for t in (x, w, a, b, bb))
    assert torch.autograd.gradcheck(f, args)


def test_torch_compile_reduce_overhead_fullgraph():
    """CUDA-graph capture runs on a side stream: a kernel or cuBLAS call on the
    wrong stream, a host sync or a .item() on the seed would fail here."""
    x, w, a, b, bb = _cuda(make_inputs(64, 128, 96, 8, torch.bfloat16))

    def step(x, w, a, b, bb):
        return lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb, dropout_p=0.2)

    def infer(x, w, a, b, bb):
        return lora_ext.lora_linear(x, w, a, b, SCALE, bias=bb)

    compiled_infer = torch.compile(infer, mode="reduce-overhead", fullgraph=True)
    want = infer(x, w, a, b, bb)
    for _ in range(3):
        got = compiled_infer(x, w, a, b, bb)
    assert torch.equal(got, want)

    # fallback_random: the compiled graph draws the dropout seed with the same
    # torch.randint call as eager (inductor's own RNG would draw other numbers),
    # so each replay must match eager under the same torch.manual_seed.
    with torch._inductor.config.patch(fallback_random=True):
        compiled_step = torch.compile(step, mode="reduce-overhead", fullgraph=True)
        outs = []
        for i in range(4):
            torch.manual_seed(i)
            got = compiled_step(x, w, a, b, bb).clone()
            torch.manual_seed(i)
            assert torch.equal(got, step(x, w, a, b, bb)), f"replay {i}: the graph did not use the fresh seed"
            outs.append(got)
        assert not torch.equal(outs[-1], outs[-2])

    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, bb)]
    train = torch.compile(lambda *t: infer(*t).float().square().mean(), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        for t in leaves:
            t.grad = None
        train(*leaves).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
