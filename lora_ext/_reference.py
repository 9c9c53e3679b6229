"""Pure-PyTorch implementation of every op: the fallback kernel for devices and
builds without compiled code.

It follows the numerics contract of DESIGN.md §1 at the same rounding points
as the compiled kernels: inputs are widened to the accumulation dtype (fp32,
or fp64 for float64 inputs), the low-rank intermediates stay there, and each
output is rounded to its dtype once. The dropout mask is the counter-based
hash of ``csrc/dropout_hash.h``, so the fallback, the CPU and the CUDA paths
drop exactly the same elements for the same seed.

All functions work on the op-level shapes: x [M, K], weight [N, K],
lora_A [r, K], lora_B [N, r], bias [N], grad_out [M, N].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adapter, check_grad_out, check_op_level, check_scale

_MASK32 = 0xFFFFFFFF


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mul32(v: Tensor, c: int) -> Tensor:
    # (v * c) mod 2**32 for 0 <= v < 2**32 in int64 without overflow: split c in 16-bit halves.
    lo, hi = c & 0xFFFF, c >> 16
    return (v * lo + (((v * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(v: Tensor) -> Tensor:
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def dropout_threshold(p: float) -> int:
    """keep = hash >= threshold; same truncation as the C++ ``dropout_threshold``."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return 1 << 32
    return int(p * 4294967296.0)


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """Keep-mask (bool [rows, cols], True = kept) of the LoRA-branch dropout."""
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(
            f"lora_ext: seed must be a one-element int64 tensor, got shape {list(seed.shape)} and dtype {seed.dtype}"
        )
    if rows < 0 or cols < 0:
        raise ValueError(f"lora_ext: dropout_mask rows and cols must be >= 0, got {rows} x {cols}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"lora_ext: dropout p must be in [0, 1], got {p}")
    device = seed.device
    if rows * cols == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    s = seed.reshape(()).to(torch.int64)
    s_lo = s & _MASK32
    s_hi = (s >> 32) & _MASK32
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    i_lo = idx & _MASK32
    i_hi = idx >> 32
    h = _hash32(i_lo ^ _hash32(s_lo ^ _hash32(i_hi ^ s_hi)))
    return (h >= dropout_threshold(p)).view(rows, cols)


def _dropped_input(x_acc: Tensor, dropout_p: float, dropout_seed: Tensor | None) -> tuple[Tensor, Tensor | None, float]:
    """(drop(x) without the 1/(1-p) factor, keep mask or None, the 1/(1-p) factor)."""
    if dropout_p <= 0.0:
        return x_acc, None, 1.0
    assert dropout_seed is not None
    keep = dropout_mask(dropout_seed, x_acc.shape[0], x_acc.shape[1], dropout_p)
    factor = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
    return x_acc * keep, keep, factor


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    dropout_seed: Tensor | None,
    strategy: int,
) -> Tensor:
    """y [M, N] = x W^T + bias + scale * (drop(x) A^T) B^T, rounded once."""
    check_op_level(x, weight, lora_A, lora_B, scale, bias, dropout_p, dropout_seed, strategy)
    del strategy  # one formula; the strategies only differ in the compiled kernels' memory traffic
    acc = acc_dtype(x.dtype)
    x_acc = x.to(acc)
    xd, _, factor = _dropped_input(x_acc, dropout_p, dropout_seed)
    xa = (xd @ lora_A.to(acc).t()) * factor  # [M, r], stays in acc dtype
    y = x_acc @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    y = y + scale * (xa @ lora_B.to(acc).t())
    return y.to(x.dtype)


def lora_linear_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    dropout_p: float,
    dropout_seed: Tensor | None,
    strategy: int,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias, lora_A, lora_B); unrequested ones are empty [0] tensors."""
    check_op_level(x, weight, lora_A, lora_B, scale, None, dropout_p, dropout_seed, strategy)
    check_grad_out(grad_out, x, weight)
    del strategy
    acc = acc_dtype(x.dtype)
    g = grad_out.to(acc)
    x_acc = x.to(acc)
    a_acc, b_acc = lora_A.to(acc), lora_B.to(acc)
    xd, keep, factor = _dropped_input(x_acc, dropout_p, dropout_seed)
    gb = g @ b_acc  # [M, r]
    # outputs that were not asked for: distinct empty tensors (outputs must not alias)
    grad_x, grad_w, grad_bias, grad_a, grad_b = (x.new_empty(0) for _ in range(5))
    if output_mask[0]:
        lora_part = gb @ a_acc
        if keep is not None:
            lora_part = lora_part * keep
        grad_x = (g @ weight.to(acc) + (scale * factor) * lora_part).to(x.dtype)
    if output_mask[1]:
        grad_w = (g.t() @ x_acc).to(weight.dtype)
    if output_mask[2]:
        grad_bias = g.sum(0).to(x.dtype)
    if output_mask[3]:
        grad_a = ((scale * factor) * (gb.t() @ xd)).to(lora_A.dtype)
    if output_mask[4]:
        xa = (xd @ a_acc.t()) * factor
        grad_b = (scale * (g.t() @ xa)).to(lora_B.dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """W + scale * B A, accumulated in fp32 and rounded once."""
    check_adapter(weight, lora_A, lora_B)
    check_scale(scale)
    acc = acc_dtype(weight.dtype)
    return torch.addmm(weight.to(acc), lora_B.to(acc), lora_A.to(acc), alpha=scale).to(weight.dtype)


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> None:
    """In place W += scale * B A (fp32 accumulation, rounded once)."""
    check_adapter(weight, lora_A, lora_B)
    check_scale(scale)
    weight.copy_(merged_weight(weight, lora_A, lora_B, scale))
