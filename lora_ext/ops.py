"""Public functional API: the fused LoRA linear and the in-place merge/unmerge.

Shapes: x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the ops with the dispatcher)

STRATEGIES: dict[str, int] = {"auto": 0, "shrink_expand": 1, "merge": 2}

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"lora_ext: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lora_ext: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def _check_same(ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"lora_ext: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all tensors must share one dtype"
        )
    if t.device != ref.device:
        raise ValueError(f"lora_ext: {name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")


def _check_scale(scale: object) -> float:
    if isinstance(scale, Tensor):
        raise TypeError("lora_ext: scale must be a Python number, got a Tensor (use float(scale))")
    try:
        value = float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"lora_ext: scale must be a Python number, got {type(scale).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"lora_ext: scale must be finite, got {value}")
    return value


def check_adapter(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """Validate weight [N, K], lora_A [r, K], lora_B [N, r]; raise with names and shapes."""
    _check_tensor(weight, "weight")
    _check_tensor(lora_A, "lora_A")
    _check_tensor(lora_B, "lora_B")
    if weight.dim() != 2:
        raise ValueError(f"lora_ext: weight must be 2-D [N, K], got shape {_shape(weight)}")
    if lora_A.dim() != 2:
        raise ValueError(f"lora_ext: lora_A must be 2-D [r, K], got shape {_shape(lora_A)}")
    if lora_B.dim() != 2:
        raise ValueError(f"lora_ext: lora_B must be 2-D [N, r], got shape {_shape(lora_B)}")
    _check_same(weight, "weight", lora_A, "lora_A")
    _check_same(weight, "weight", lora_B, "lora_B")
    n, k = weight.shape
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"lora_ext: rank must be positive, got lora_A of shape {_shape(lora_A)}")
    if lora_A.shape[1] != k:
        raise ValueError(
            f"lora_ext: lora_A must be [r, K] with K = {k} (weight is {_shape(weight)}), got lora_A of shape {_shape(lora_A)}"
        )
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(
            f"lora_ext: lora_B must be [N, r] = [{n}, {r}] (weight is {_shape(weight)}, lora_A is {_shape(lora_A)}), "
            f"got lora_B of shape {_shape(lora_B)}"
        )


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    strategy: str = "auto",
) -> Tensor:
    """Fused LoRA linear: ``x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: input ``[..., K]``; any leading dims, any strides.
        weight: frozen base weight ``[N, K]``.
        lora_A: ``[r, K]``.
        lora_B: ``[N, r]``.
        scale: Python float, usually ``lora_alpha / r``.
        bias: ``[N]`` or None.
        dropout_p: inverted dropout on the LoRA branch input only, as
            ``F.dropout(x, p, training=True)``; 0 disables it. The mask is
            drawn from the device's default generator (``torch.manual_seed``
            reproduces it) and regenerated in backward, never stored.
        strategy: ``"auto"`` (cost model, see csrc/strategy.h),
            ``"shrink_expand"`` or ``"merge"`` (merge the adapter into a
            transient weight; ignored when dropout is on).

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in x, weight, bias, lora_A, lora_B.
    """
    _check_tensor(x, "x")
    check_adapter(weight, lora_A, lora_B)
    _check_same(weight, "weight", x, "x")
    if x.dim() < 1:
        raise ValueError(f"lora_ext: x must have at least 1 dim [..., K], got shape {_shape(x)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"lora_ext: x has K = {x.shape[-1]} (shape {_shape(x)}) but weight is [N, K] = {_shape(weight)}")
    if bias is not None:
        _check_tensor(bias, "bias")
        _check_same(weight, "weight", bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"lora_ext: bias must be [N] = [{n}], got shape {_shape(bias)}")
    scale = _check_scale(scale)
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"lora_ext: dropout_p must be in [0, 1], got {dropout_p}")
    if strategy not in STRATEGIES:
        raise ValueError(f"lora_ext: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")

    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, k)
    y2 = torch.ops.lora_ext.lora_linear(x2, weight, bias, lora_A, lora_B, scale, dropout_p, seed, STRATEGIES[strategy])
    return y2.view(*x.shape[:-1], n)


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Out of place ``W + scale · B A`` (fp32 accumulation, rounded once); weight is not modified."""
    check_adapter(weight, lora_A, lora_B)
    return torch.ops.lora_ext.merged_weight(weight, lora_A, lora_B, _check_scale(scale))


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """In place ``W += scale · B A``: accumulate in fp32, round once. Returns ``weight``."""
    check_adapter(weight, lora_A, lora_B)
    scale = _check_scale(scale)
    with torch.no_grad():
        torch.ops.lora_ext.merge_(weight, lora_A, lora_B, scale)
    return weight


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """In place ``W -= scale · B A``: the exact inverse formula of :func:`merge_`. Returns ``weight``."""
    check_adapter(weight, lora_A, lora_B)
    scale = _check_scale(scale)
    with torch.no_grad():
        torch.ops.lora_ext.merge_(weight, lora_A, lora_B, -scale)
    return weight


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The LoRA-branch keep mask (bool ``[rows, cols]``) for ``seed`` (one-element int64 tensor)."""
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("lora_ext: seed must be a one-element int64 tensor")
    return torch.ops.lora_ext.dropout_mask(seed, int(rows), int(cols), float(p))
