"""Public functional API: the fused LoRA linear and the in-place merge/unmerge.

Shapes: x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N].
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops  # noqa: F401  (registers the ops with the dispatcher)
from ._checks import check_adapter, check_lora_linear_args, check_scale
from .nf4 import NF4Weight, lora_linear_nf4

STRATEGIES: dict[str, int] = {"auto": 0, "shrink_expand": 1, "merge": 2}


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
        weight: frozen base weight ``[N, K]``, or an :class:`~lora_ext.NF4Weight`
            (4-bit base, dispatched to :func:`~lora_ext.lora_linear_nf4`).
        lora_A: ``[r, K]``.
        lora_B: ``[N, r]``.
        scale: Python float, usually ``lora_alpha / r``.
        bias: ``[N]`` or None.
        dropout_p: inverted dropout on the LoRA branch input only, as
            ``F.dropout(x, p, training=True)``; 0 disables it. The mask is
            drawn from the device's default generator (``torch.manual_seed``
            reproduces it) and regenerated in backward, never stored.
        strategy: ``"auto"`` (cost model, see csrc/host/strategy.h),
            ``"shrink_expand"`` or ``"merge"`` (merge the adapter into a
            transient weight; ignored when dropout is on).

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in x, weight, bias, lora_A, lora_B.
    """
    autocast_dtype = _autocast_dtype(x)
    if autocast_dtype is not None and not isinstance(weight, NF4Weight):
        # Like F.linear under autocast: run in the autocast dtype. Autocast is switched off
        # around the op, or the kernels' own fp32 accumulation GEMMs would be re-cast too.
        def cast(t):
            return t.to(autocast_dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(
                cast(x), cast(weight), cast(lora_A), cast(lora_B), scale, cast(bias), dropout_p, strategy=strategy
            )
    if isinstance(weight, NF4Weight):  # 4-bit frozen base (QLoRA): dequantization fused into the op
        if strategy not in STRATEGIES:
            raise ValueError(f"lora_ext: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        return lora_linear_nf4(x, weight, lora_A, lora_B, scale, bias=bias, dropout_p=dropout_p)
    scale, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    n, k = weight.shape
    if strategy not in STRATEGIES:
        raise ValueError(f"lora_ext: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")

    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, k)
    y2 = torch.ops.lora_ext.lora_linear(x2, weight, bias, lora_A, lora_B, scale, dropout_p, seed, STRATEGIES[strategy])
    return y2.view(*x.shape[:-1], n)


def _autocast_dtype(x: object) -> torch.dtype | None:
    """The autocast dtype in force for x's device type, or None."""
    if not isinstance(x, Tensor):
        return None
    device_type = x.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):  # a device type without autocast
        return None


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """Out of place ``W + scale · B A`` (fp32 accumulation, rounded once); weight is not modified."""
    check_adapter(weight, lora_A, lora_B)
    return torch.ops.lora_ext.merged_weight(weight, lora_A, lora_B, check_scale(scale))


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """In place ``W += scale · B A``: accumulate in fp32, round once. Returns ``weight``."""
    check_adapter(weight, lora_A, lora_B)
    scale = check_scale(scale)
    with torch.no_grad():
        torch.ops.lora_ext.merge_(weight, lora_A, lora_B, scale)
    return weight


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """In place ``W -= scale · B A``: the exact inverse formula of :func:`merge_`. Returns ``weight``."""
    check_adapter(weight, lora_A, lora_B)
    scale = check_scale(scale)
    with torch.no_grad():
        torch.ops.lora_ext.merge_(weight, lora_A, lora_B, -scale)
    return weight


def dropout_mask(seed: Tensor, rows: int, cols: int, p: float) -> Tensor:
    """The LoRA-branch keep mask (bool ``[rows, cols]``) for ``seed`` (one-element int64 tensor)."""
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("lora_ext: seed must be a one-element int64 tensor")
    return torch.ops.lora_ext.dropout_mask(seed, int(rows), int(cols), float(p))


def strategy_plan(
    m: int, n: int, k: int, dtype: torch.dtype, dropout_p: float = 0.0, strategy: str = "auto", device: str = "cpu"
) -> dict:
    """Which strategy the compiled kernels of ``device`` pick for ``x [m, k]`` and ``weight [n, k]``.

    Returns ``{"forward": "merge" | "shrink_expand", "backward": ...}`` from
    ``resolve_strategy`` in csrc/host/strategy.h (the function the kernels
    call), or ``{"forward": "reference", "backward": "reference"}`` when the
    compiled library is not loaded (the fallback has a single formula).
    """
    from . import _loader

    if strategy not in STRATEGIES:
        raise ValueError(f"lora_ext: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if not _loader.extension_loaded():
        return {"forward": "reference", "backward": "reference"}
    elem = torch.empty((), dtype=dtype).element_size()
    return dict(
        _loader._C.strategy_plan(m, n, k, elem, float(dropout_p), STRATEGIES[strategy], torch.device(device).type)
    )
