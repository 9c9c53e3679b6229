"""NF4 on CUDA: the dequantize kernel and the fused QLoRA ops against the CPU
results (bit-exact for dequantization, docs/design.md §4 rule for the LoRA op).
Skipped cleanly without a GPU or without the compiled CUDA kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_rule, torch_lora

import lora_ext

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(not lora_ext.build_info()["cuda"], reason="lora_ext built without CUDA kernels"),
]


def test_cuda_kernels_registered():
    for name in ("nf4_dequantize", "lora_linear_nf4", "lora_linear_nf4_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_ext::{name}", "CUDA"), name


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=DTYPE_IDS + ["fp64"])
@pytest.mark.parametrize("shape,blocksize", [((7, 33), 32), ((130, 257), 64), ((64, 4096), 4096), ((1, 1), 64)])
def test_dequantize_bit_exact_with_cpu(shape, blocksize, dtype, double_quant):
    g = torch.Generator().manual_seed(0)
    q = lora_ext.quantize_nf4(torch.randn(shape, generator=g), blocksize, double_quant)
    ref = lora_ext.dequantize_nf4(q, dtype)
    qc = q.to("cuda")
    torch.cuda.empty_cache()
    torch.full((1 << 20,), float("nan"), device="cuda")  # leave NaN in the allocator's free blocks
    out = lora_ext.dequantize_nf4(qc, dtype)
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m,k,n,r", [(37, 129, 67, 5), (256, 512, 384, 16)])
def test_lora_linear_nf4_rule(m, k, n, r, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    qw = lora_ext.quantize_nf4((torch.randn(n, k, generator=g) / k**0.5), 64, True).to("cuda")
    a = torch.randn(r, k, generator=g, dtype=torch.float64) / k**0.5
    b = torch.randn(n, r, generator=g, dtype=torch.float64) / r**0.5
    bias = torch.randn(n, generator=g, dtype=torch.float64)
    w = lora_ext.dequantize_nf4(qw, dtype)
    xc, ac, bc, biasc = (t.to("cuda", dtype).requires_grad_() for t in (x, a, b, bias))
    y = lora_ext.lora_linear_nf4(xc, qw, ac, bc, 0.5, biasc)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [xc, ac, bc, biasc], gy)
    x64, a64, b64, bias64 = (t.detach().double().requires_grad_() for t in (xc, ac, bc, biasc))
    y64 = torch_lora(x64, w.double(), a64, b64, 0.5, bias64)
    ref = torch.autograd.grad(y64, [x64, a64, b64, bias64], gy.double())
    xt, at, bt, biast = (t.detach().requires_grad_() for t in (xc, ac, bc, biasc))
    yt = torch_lora(xt, w, at, bt, 0.5, biast)
    plain = torch.autograd.grad(yt, [xt, at, bt, biast], gy)
    assert_rule("y", y, y64, yt, dtype)
    for name, o, r_, p in zip(("grad_x", "grad_A", "grad_B", "grad_bias"), got, ref, plain):
        assert_rule(name, o, r_, p, dtype)


def test_opcheck_cuda():
    qw = lora_ext.quantize_nf4(torch.randn(17, 96), 64, True).to("cuda")
    x = torch.randn(9, 96, device="cuda", requires_grad=True)
    a = torch.randn(3, 96, device="cuda", requires_grad=True)
    b = torch.randn(17, 3, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.lora_ext.nf4_dequantize.default, (*qw.op_args(), [17, 96], torch.bfloat16))
    torch.library.opcheck(
        torch.ops.lora_ext.lora_linear_nf4.default, (x, *qw.op_args(), 17, None, a, b, 0.5, 0.0, None)
    )
