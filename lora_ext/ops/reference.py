"""Pure-PyTorch implementation of every op, dense and NF4: the fallback kernel
for devices and builds without compiled code, and the oracle of the tests.

It follows the numerics contract of docs/design.md §1 at the same rounding points
as the compiled kernels: inputs are widened to the accumulation dtype (fp32,
or fp64 for float64 inputs), the low-rank intermediates stay there, and each
output is rounded to its dtype once. The dropout mask is the counter-based
hash of ``csrc/dropout_hash.h``, so the fallback, the CPU and the CUDA paths
drop exactly the same elements for the same seed.

All functions work on the op-level shapes: x [M, K], weight [N, K],
lora_A [r, K], lora_B [N, r], bias [N], grad_out [M, N]. The NF4 ops take the
quantized weight as the seven storage arguments of :class:`NF4Args`; the NF4
format itself is described in :mod:`lora_ext.quant.nf4`.
"""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch
from torch import Tensor

from .checks import check_adapter, check_grad_out, check_nf4_storage, check_op_level, check_saved_xa, check_scale

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


def lora_linear_backward(grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask):
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


def lora_linear_xa(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy):
    """(lora_linear's y, xa [M, r] = drop01(x) A^T in the accumulation dtype).

    drop01 is the dropout's 0/1 keep mask without the 1/(1-p) factor (xa is all zeros for p = 1);
    autograd keeps xa for :func:`lora_linear_backward_xa`.
    """
    y = lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy)
    acc = acc_dtype(x.dtype)
    if dropout_p >= 1.0:
        return y, x.new_zeros((x.shape[0], lora_A.shape[0]), dtype=acc)
    xd, _, _ = _dropped_input(x.to(acc), dropout_p, dropout_seed)
    return y, xd @ lora_A.to(acc).t()


def lora_linear_backward_xa(
    grad_out, x, xa, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask
):
    """lora_linear_backward's gradients with grad_B = scale/(1-p) * grad_out^T xa from the given xa."""
    check_op_level(x, weight, lora_A, lora_B, scale, None, dropout_p, dropout_seed, strategy)
    check_grad_out(grad_out, x, weight)
    check_saved_xa(xa, x, lora_A.shape[0])
    grads = list(
        lora_linear_backward(
            grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, 1, [*output_mask[:4], False]
        )
    )
    if output_mask[4]:
        factor = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0
        grads[4] = ((scale * factor) * (grad_out.to(xa.dtype).t() @ xa)).to(lora_B.dtype)
    return tuple(grads)


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


# --------------------------------------------------------------------- NF4 code tables

#: The 16 NF4 code values (bitsandbytes ``get_4bit_type("nf4")``), ascending.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: Block size of the double quantization of absmax (bitsandbytes' fixed choice).
NESTED_BLOCKSIZE = 256

#: Input dtypes bitsandbytes quantizes.
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LUT_SIZE = 65536


@cache
def _nf4_code_cpu() -> Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The NF4 code table, fp32 [16], on ``device`` (a fresh tensor)."""
    return _nf4_code_cpu().to(device, copy=True)


@cache
def _dynamic_map_cpu() -> Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8),
    # step for step (same torch ops, so the same fp32 values).
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (fp32 [256], ascending): the code of double quantization."""
    return _dynamic_map_cpu().to(device, copy=True)


# ----------------------------------------------------------------- NF4 pure-PyTorch kernels


class NF4Args(NamedTuple):
    """The quantized weight as the NF4 ops take it (the storage arguments of their schemas)."""

    packed: Tensor  # uint8 [(N*K+1)//2] (any shape with that many elements)
    absmax: Tensor  # fp32 [nblocks], or uint8 codes with double quantization
    nested_absmax: Tensor | None  # fp32 [ceil(nblocks / nested_blocksize)] or None
    nested_code: Tensor | None  # fp32 [256] or None
    offset: float
    blocksize: int
    nested_blocksize: int


def _nf4_bounds(device) -> Tensor:
    code = _nf4_code_cpu().to(device)
    return (code[:-1] + code[1:]) / 2


def nf4_quantize(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)]) of the flattened weight."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    com = flat[:full].reshape(blocks, blocksize)
    absmax = com.abs().amax(dim=-1) if blocks else flat.new_empty(0)
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, _nf4_bounds(flat.device), out_int32=True).to(torch.uint8)
    return (q[::2] << 4) | q[1::2], absmax


def _lut_8bit(code: Tensor) -> Tensor:
    """bitsandbytes' CPU quantization table: LUT index -> nearest code index (uint8 [65536])."""
    code = code.float()
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    vals = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids.contiguous(), vals, side="left").to(torch.uint8)


def blockwise_quantize_8bit(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(codes uint8 [n], absmax fp32 [ceil(n/blocksize)]): bitsandbytes' CPU ``quantize_blockwise``."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = torch.nan_to_num(padded.abs(), nan=0.0).amax(dim=1)
    v = torch.clamp(padded * (1.0 / absmax).view(-1, 1), -1.0, 1.0)
    idx = (((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64).clamp_(0, _LUT_SIZE - 1)
    q = _lut_8bit(code)[idx]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].clone(), absmax


def resolve_absmax(
    absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, offset: float, nested_blocksize: int
) -> Tensor:
    """fp32 block scales: ``absmax`` itself, or ``nested_code[absmax] * nested_absmax[i // nb] + offset``."""
    if nested_absmax is None:
        return absmax.float()
    assert nested_code is not None
    n = absmax.numel()
    scales = nested_absmax.float().repeat_interleave(nested_blocksize)[:n]
    vals = nested_code.float()[absmax.reshape(-1).long()] * scales
    return vals + torch.tensor(offset, dtype=torch.float32, device=vals.device)


def nf4_dequantize(*args) -> Tensor:
    """``nf4_dequantize(<NF4Args>, shape, dtype)``: the weight of ``shape`` in ``dtype``.

    ``code[q] * absmax`` in fp32, rounded once.
    """
    storage, (shape, dtype) = NF4Args(*args[:7]), args[7:]
    check_nf4_storage(storage, shape)
    n = math.prod(shape)
    scales = resolve_absmax(
        storage.absmax, storage.nested_absmax, storage.nested_code, storage.offset, storage.nested_blocksize
    )
    p = storage.packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    vals = _nf4_code_cpu().to(p.device)[q] * scales.repeat_interleave(storage.blocksize)[:n]
    return vals.to(dtype).reshape(shape)


def lora_linear_nf4(x: Tensor, *args) -> Tensor:
    """``lora_linear_nf4(x, <NF4Args>, out_features, bias, lora_A, lora_B, scale, dropout_p, dropout_seed)``.

    y [M, N] = x Wᵀ + bias + scale·(drop(x) Aᵀ) Bᵀ with W = nf4_dequantize(·, x.dtype), a transient.
    """
    out_features, bias, lora_A, lora_B, scale, dropout_p, dropout_seed = args[7:]
    w = nf4_dequantize(*args[:7], [out_features, x.shape[-1]], x.dtype)
    return lora_linear(x, w, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, 1)


def lora_linear_nf4_backward(grad_out: Tensor, x: Tensor, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_out, x, <NF4Args>, out_features, lora_A, lora_B, scale, dropout_p, dropout_seed, output_mask)``.

    Returns (grad_x, grad_bias, grad_A, grad_B); unrequested ones are empty [0] tensors.
    """
    out_features, lora_A, lora_B, scale, dropout_p, dropout_seed, output_mask = args[7:]
    w = nf4_dequantize(*args[:7], [out_features, x.shape[-1]], x.dtype)
    mask = [bool(output_mask[0]), False, bool(output_mask[1]), bool(output_mask[2]), bool(output_mask[3])]
    gx, _, gbias, ga, gb = lora_linear_backward(grad_out, x, w, lora_A, lora_B, scale, dropout_p, dropout_seed, 1, mask)
    return gx, gbias, ga, gb
