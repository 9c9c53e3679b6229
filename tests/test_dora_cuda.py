"""The DoRA ops on CUDA (csrc/cuda/dora_cuda.cpp over csrc/host/dora_impl.h) against the float64
reference with the tolerance rule; skipped without a GPU or without the compiled CUDA kernels.
Run by benchmarks/gpu_check.sh (cuda_tests)."""

from __future__ import annotations

import pytest
import torch
from test_dora_ops import _cancelling, _case, _norm64, _rule, peft_dora

import lora_ext

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or not torch._C._dispatch_has_kernel_for_dispatch_key("lora_ext::dora_linear", "CUDA")
    or "CUDA" in lora_ext.ops.fallback_dispatch_keys("dora_linear"),
    reason="needs a GPU and the compiled CUDA DoRA kernels",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_forward_and_grads_rule(dtype, p):
    x, w, a, b, mag, bb = (t.cuda() for t in _case((2 * 37, 129, 300, 5), dtype))
    s = 0.8
    seed = None
    torch.manual_seed(123)
    if p:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cuda")  # what the wrapper draws
    keep = lora_ext.dropout_mask(seed, x.shape[0], x.shape[1], p).cpu() if p else None
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    torch.manual_seed(123)
    out = lora_ext.dora_linear(*leaves[:5], s, bias=leaves[5], dropout_p=p)
    d = [t.detach().cpu().double().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    ref = peft_dora(*d[:5], s, d[5], keep=keep, p=p)
    t_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    plain = peft_dora(*t_leaves[:5], s, t_leaves[5], keep=None if keep is None else keep.cuda(), p=p)
    _rule("forward", out.cpu(), ref, plain.cpu(), dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out.backward(g.cuda())
    ref.backward(g.double())
    plain.backward(g.cuda())
    for name, ours, r64, pt in zip(["x", "weight", "lora_A", "lora_B", "magnitude", "bias"], leaves, d, t_leaves):
        _rule(f"grad {name}", ours.grad.cpu(), r64.grad, pt.grad.cpu(), dtype)


def test_cuda_norm_and_cancellation():
    w, a, b, s = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _cancelling(torch.float32))
    ref = _norm64(w.cpu(), a.cpu(), b.cpu(), s)
    out = lora_ext.dora_weight_norm(w, a, b, s)
    _rule("norm", out.cpu(), ref, torch.linalg.norm(w + s * (b @ a), dim=1).cpu(), torch.float32)


def test_cuda_empty_batch():
    x, w, a, b, mag, bb = (t.cuda() for t in _case((0, 16, 8, 2), torch.float32))
    leaves = [t.requires_grad_(True) for t in (x, w, a, b, mag, bb)]
    y = lora_ext.dora_linear(*leaves[:5], 1.0, bias=leaves[5], dropout_p=0.2)
    assert y.shape == (0, 8)
    y.sum().backward()
    for t in leaves[1:]:
        assert t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0
