"""Mixed-adapter LoRA linear: the validation contract and the pure-PyTorch kernels.

One batch, several adapters, one adapter (or none) per row:

    y[i] = x[i] Wᵀ + bias + s[a] · (drop_a(x[i]) A[a]ᵀ) B[a]ᵀ     a = adapter_index[i]; a = -1: base only

Op-level shapes: x [M, K], weight [N, K], bias [N], lora_A [n, r, K], lora_B [n, N, r]
(adapters of smaller rank zero-padded to the largest r), scale float[n],
adapter_index int64 [M] with values in [-1, n), dropout_p float[n], grad_out [M, N].

Dropout: the keep mask of row i is the counter-based hash of the dense op
(``csrc/dropout_hash.h``, element i*K + k of one [M, K] grid) against the
threshold of row i's adapter, so with every row on one adapter the mask is the
one :func:`lora_ext.lora_linear` draws for the same seed.

Numerics as the dense op (docs/design.md §1): fp32 accumulation (fp64 for
float64), the [M, r] intermediates stay there, each output is rounded once.
These kernels are the fallback and the tests' oracle; the compiled ones are
csrc/cpu/mixed_cpu.cpp and csrc/cuda/mixed_cuda.cpp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import _check_same, _check_tensor, _shape, check_dropout_seed
from .reference import _MASK32, _hash32, acc_dtype, dropout_threshold


def check_mixed(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: Sequence[float],
    adapter_index: Tensor,
    dropout_p: Sequence[float],
    dropout_seed: Tensor | None,
) -> None:
    """The checks of the op (x 2-D [M, K]); ValueError for shapes and values, TypeError for dtypes and devices."""
    _check_tensor(x, "x")
    _check_tensor(weight, "weight")
    _check_tensor(lora_A, "lora_A")
    _check_tensor(lora_B, "lora_B")
    if x.dim() != 2:
        raise ValueError(f"lora_ext: x must be 2-D [M, K] at the op level, got shape {_shape(x)}")
    if weight.dim() != 2:
        raise ValueError(f"lora_ext: weight must be 2-D [N, K], got shape {_shape(weight)}")
    if lora_A.dim() != 3:
        raise ValueError(f"lora_ext: lora_A must be 3-D [n_adapters, r, K], got shape {_shape(lora_A)}")
    if lora_B.dim() != 3:
        raise ValueError(f"lora_ext: lora_B must be 3-D [n_adapters, N, r], got shape {_shape(lora_B)}")
    _check_same(weight, "weight", x, "x")
    _check_same(weight, "weight", lora_A, "lora_A")
    _check_same(weight, "weight", lora_B, "lora_B")
    n_out, k = weight.shape
    n_ad, r = lora_A.shape[0], lora_A.shape[1]
    if n_ad <= 0 or r <= 0:
        raise ValueError(
            f"lora_ext: lora_A must hold at least one adapter of positive rank, got shape {_shape(lora_A)}"
        )
    if x.shape[1] != k:
        raise ValueError(
            f"lora_ext: x has K = {x.shape[1]} (shape {_shape(x)}) but weight is [N, K] = {_shape(weight)}"
        )
    if lora_A.shape[2] != k:
        raise ValueError(
            f"lora_ext: lora_A must be [n_adapters, r, K] with K = {k} (weight is {_shape(weight)}), "
            f"got shape {_shape(lora_A)}"
        )
    if tuple(lora_B.shape) != (n_ad, n_out, r):
        raise ValueError(
            f"lora_ext: lora_B must be [n_adapters, N, r] = [{n_ad}, {n_out}, {r}] (weight is {_shape(weight)}, "
            f"lora_A is {_shape(lora_A)}), got shape {_shape(lora_B)}"
        )
    if bias is not None:
        _check_tensor(bias, "bias")
        _check_same(weight, "weight", bias, "bias")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"lora_ext: bias must be [N] = [{n_out}], got shape {_shape(bias)}")
    if len(scale) != n_ad:
        raise ValueError(f"lora_ext: scale must hold one value per adapter ({n_ad}), got {len(scale)}")
    for v in scale:
        if not math.isfinite(v):
            raise ValueError(f"lora_ext: scale must be finite, got {list(scale)}")
    if len(dropout_p) != n_ad:
        raise ValueError(f"lora_ext: dropout_p must hold one value per adapter ({n_ad}), got {len(dropout_p)}")
    for p in dropout_p:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"lora_ext: dropout_p must be in [0, 1], got {list(dropout_p)}")
    check_dropout_seed(max(dropout_p), dropout_seed, x)
    check_adapter_index(adapter_index, x.shape[0], n_ad, x.device)


def check_adapter_index(adapter_index: object, m: int, n_ad: int, device: torch.device) -> None:
    """adapter_index: int64 [M] on x's device with values in [-1, n_adapters)."""
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"lora_ext: adapter_index must be a torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype != torch.int64:
        raise TypeError(f"lora_ext: adapter_index must be int64, got {adapter_index.dtype}")
    if adapter_index.device != device:
        raise TypeError(f"lora_ext: adapter_index is on {adapter_index.device} but x is on {device}")
    if tuple(adapter_index.shape) != (m,):
        raise ValueError(
            f"lora_ext: adapter_index must be [M] = [{m}] (one entry per row of x), got shape {_shape(adapter_index)}"
        )
    if m and bool(((adapter_index < -1) | (adapter_index >= n_ad)).any()):
        bad = adapter_index[(adapter_index < -1) | (adapter_index >= n_ad)][0].item()
        raise ValueError(
            f"lora_ext: adapter_index values must be in [-1, {n_ad}) (-1 = base only, {n_ad} adapters), got {bad}"
        )


def mixed_keep_mask(seed: Tensor, adapter_index: Tensor, cols: int, dropout_p: Sequence[float]) -> Tensor:
    """Keep mask bool [M, cols]: the dense op's hash of element i*cols + k against row i's adapter threshold."""
    rows = adapter_index.shape[0]
    device = adapter_index.device
    if rows * cols == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=device)
    s = seed.reshape(()).to(torch.int64)
    s_lo, s_hi = s & _MASK32, (s >> 32) & _MASK32
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    h = _hash32((idx & _MASK32) ^ _hash32(s_lo ^ _hash32((idx >> 32) ^ s_hi))).view(rows, cols)
    # -1 rows get threshold 0 (all kept; they have no LoRA branch anyway).
    thresholds = torch.tensor([0] + [dropout_threshold(p) for p in dropout_p], dtype=torch.int64, device=device)
    return h >= thresholds[adapter_index + 1].view(rows, 1)


def _factors(dropout_p: Sequence[float]) -> list[float]:
    return [0.0 if p >= 1.0 else 1.0 / (1.0 - p) for p in dropout_p]


def _segments(adapter_index: Tensor, n_ad: int) -> list[tuple[int, Tensor]]:
    """(adapter, row indices) for every adapter that owns rows (the oracle's grouping)."""
    out = []
    for a in range(n_ad):
        rows = (adapter_index == a).nonzero().view(-1)
        if rows.numel():
            out.append((a, rows))
    return out


def lora_linear_mixed(x, weight, bias, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed) -> Tensor:
    """y [M, N]: the base for every row plus row i's adapter (none for -1), rounded once."""
    check_mixed(x, weight, bias, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed)
    acc = acc_dtype(x.dtype)
    x_acc = x.to(acc)
    y = x_acc @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    keep = mixed_keep_mask(dropout_seed, adapter_index, x.shape[1], dropout_p) if max(dropout_p) > 0 else None
    factor = _factors(dropout_p)
    for a, rows in _segments(adapter_index, lora_A.shape[0]):
        xs = x_acc[rows]
        if keep is not None:
            xs = xs * keep[rows]
        xa = (xs @ lora_A[a].to(acc).t()) * factor[a]
        y = y.index_add(0, rows, scale[a] * (xa @ lora_B[a].to(acc).t()))
    return y.to(x.dtype)


def lora_linear_mixed_backward(
    grad_out, x, weight, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed, output_mask
):
    """Gradients (x, bias, lora_A, lora_B); unrequested ones are empty [0] tensors. W is frozen."""
    check_mixed(x, weight, None, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed)
    expected = (x.shape[0], weight.shape[0])
    if grad_out.dim() != 2 or tuple(grad_out.shape) != expected:
        raise ValueError(f"lora_ext: grad_out must be [M, N] = {list(expected)}, got shape {_shape(grad_out)}")
    _check_same(x, "x", grad_out, "grad_out")
    acc = acc_dtype(x.dtype)
    g, x_acc = grad_out.to(acc), x.to(acc)
    keep = mixed_keep_mask(dropout_seed, adapter_index, x.shape[1], dropout_p) if max(dropout_p) > 0 else None
    factor = _factors(dropout_p)
    grad_x, grad_bias, grad_a, grad_b = (x.new_empty(0) for _ in range(4))
    gx = g @ weight.to(acc) if output_mask[0] else None
    ga = torch.zeros(lora_A.shape, dtype=acc, device=x.device) if output_mask[2] else None
    gb_out = torch.zeros(lora_B.shape, dtype=acc, device=x.device) if output_mask[3] else None
    if output_mask[0] or output_mask[2] or output_mask[3]:
        for a, rows in _segments(adapter_index, lora_A.shape[0]):
            a_acc, b_acc = lora_A[a].to(acc), lora_B[a].to(acc)
            gs, xs = g[rows], x_acc[rows]
            ks = keep[rows] if keep is not None else None
            xd = xs * ks if ks is not None else xs
            gb = gs @ b_acc  # [rows, r]
            sf = scale[a] * factor[a]
            if gx is not None:
                part = gb @ a_acc
                if ks is not None:
                    part = part * ks
                gx = gx.index_add(0, rows, sf * part)
            if ga is not None:
                ga[a] = sf * (gb.t() @ xd)
            if gb_out is not None:
                gb_out[a] = scale[a] * (gs.t() @ ((xd @ a_acc.t()) * factor[a]))
    if gx is not None:
        grad_x = gx.to(x.dtype)
    if output_mask[1]:
        grad_bias = g.sum(0).to(x.dtype)
    if ga is not None:
        grad_a = ga.to(lora_A.dtype)
    if gb_out is not None:
        grad_b = gb_out.to(lora_B.dtype)
    return grad_x, grad_bias, grad_a, grad_b
