"""Public functional API: the fused LoRA linear (dense or NF4 base), the in-place
merge/unmerge, the dropout mask and the strategy the cost model picks.

Shapes: x [..., K], weight [N, K], lora_A [r, K], lora_B [N, r], bias [N].
Each function validates its arguments once (lora_ext/ops/checks.py) and calls
one op of the dispatcher (torch.ops.lora_ext.*).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..quant.nf4 import NF4Weight
from . import _loader
from .checks import check_adapter, check_lora_linear_args, check_scale
from .exact_merge import MergeRecord, merge_exact_, unmerge_exact_

__all__ = [
    "STRATEGIES",
    "MergeRecord",
    "autocast_dtype_for",
    "dropout_mask",
    "lora_linear",
    "lora_linear_nf4",
    "merge_",
    "merged_weight",
    "strategy_plan",
    "unmerge_",
]

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
        strategy: ``"auto"`` (cost model, docs/design.md §2),
            ``"shrink_expand"`` or ``"merge"`` (merge the adapter into a
            transient weight; refused with dropout, whose mask acts on the
            LoRA branch only). An NF4 base takes only ``"auto"``.

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in x, weight, bias, lora_A, lora_B.
    """
    code = STRATEGIES.get(strategy) if isinstance(strategy, str) else None
    if code is None:
        raise ValueError(f"lora_ext: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if isinstance(weight, NF4Weight):  # 4-bit frozen base (QLoRA): dequantization fused into the op
        if code != STRATEGIES["auto"]:
            raise ValueError(
                f"lora_ext: an NF4 base has a single strategy (dequantized tile by tile); strategy must be 'auto', "
                f"got {strategy!r}"
            )
        return lora_linear_nf4(x, weight, lora_A, lora_B, scale, bias=bias, dropout_p=dropout_p)
    autocast_dtype = autocast_dtype_for(x)
    if autocast_dtype is not None:
        # Like F.linear under autocast: run in the autocast dtype. Autocast is switched off
        # around the op, or the kernels' own fp32 accumulation GEMMs would be re-cast too.
        def cast(t):
            return t.to(autocast_dtype) if isinstance(t, Tensor) and t.is_floating_point() else t

        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(
                cast(x), cast(weight), cast(lora_A), cast(lora_B), scale, cast(bias), dropout_p, strategy=strategy
            )
    scale, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    if code == STRATEGIES["merge"] and dropout_p > 0.0:
        raise ValueError(
            "lora_ext: strategy='merge' cannot apply dropout (its mask acts on x on the LoRA branch only); "
            "use strategy='auto' or 'shrink_expand' with dropout_p > 0"
        )
    n, k = weight.shape

    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, k)
    y2 = torch.ops.lora_ext.lora_linear(x2, weight, bias, lora_A, lora_B, scale, dropout_p, seed, code)
    return y2.view(*x.shape[:-1], n)


def autocast_dtype_for(x: object) -> torch.dtype | None:
    """The autocast dtype in force for the device type of tensor ``x``, or None (the one autocast helper)."""
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


def merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, record: MergeRecord | None = None) -> Tensor:
    """In place ``W += scale · B A``: accumulate in fp32, round once. Returns ``weight``.

    With ``record`` (an empty :class:`MergeRecord`), the merge is exact: ``record`` receives what
    ``unmerge_(..., record=record)`` needs to give W back bit for bit (lora_ext/ops/exact_merge.py).
    """
    if record is not None:
        return merge_exact_(weight, lora_A, lora_B, scale, record)
    check_adapter(weight, lora_A, lora_B)
    scale = check_scale(scale)
    with torch.no_grad():
        torch.ops.lora_ext.merge_(weight, lora_A, lora_B, scale)
    return weight


def unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, record: MergeRecord | None = None) -> Tensor:
    """In place ``W -= scale · B A``: the exact inverse formula of :func:`merge_`. Returns ``weight``.

    With the ``record`` of an exact merge, W is restored bit for bit and ``record`` is emptied.
    """
    if record is not None:
        return unmerge_exact_(weight, lora_A, lora_B, scale, record)
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
    call; docs/design.md §2), or ``{"forward": "reference", "backward": "reference"}``
    when the compiled library is not loaded (the fallback has a single formula).
    For a bf16 weight on a CPU whose bf16 GEMMs run natively (``lora_ext._C.cpu_bf16_gemm()``,
    AMX) auto is shrink_expand (for ranks up to 128, which the fused kernels take).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"lora_ext: strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if not _loader.extension_loaded():
        return {"forward": "reference", "backward": "reference"}
    elem = torch.empty((), dtype=dtype).element_size()
    kind = torch.device(device).type
    return dict(
        _loader._C.strategy_plan(
            m, n, k, elem, float(dropout_p), STRATEGIES[strategy], kind, bf16=dtype == torch.bfloat16
        )
    )


def _check_nf4_lora_args(x, qw: NF4Weight, lora_A, lora_B, scale, bias, dropout_p) -> tuple[float, float]:
    """The checks of lora_linear, against a meta stand-in of the dequantized weight; returns (scale, p)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"lora_ext: weight must be an NF4Weight, got {type(qw).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"lora_ext: x must be a torch.Tensor, got {type(x).__name__}")
    for t, name in ((x, "x"), (lora_A, "lora_A"), (lora_B, "lora_B"), (bias, "bias")):
        if isinstance(t, Tensor) and t.device != qw.device:
            raise TypeError(f"lora_ext: {name} is on {t.device} but the NF4 weight is on {qw.device}")

    def meta(t):
        return t.to("meta") if isinstance(t, Tensor) else t

    w_like = torch.empty(qw.shape, dtype=x.dtype, device="meta")
    return check_lora_linear_args(meta(x), w_like, meta(lora_A), meta(lora_B), scale, meta(bias), dropout_p)


def lora_linear_nf4(
    x: Tensor,
    weight: NF4Weight,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """LoRA linear over an NF4 base: ``x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ``.

    ``W = dequantize_nf4(weight, x.dtype)`` is never stored: the compiled CPU
    kernel dequantizes it tile by tile inside the forward and again inside the
    backward; the fallback builds it as a transient per call. Autograd saves
    only x, the quantized tensors, the adapter and the dropout seed.

    Args:
        x: ``[..., K]`` in the compute dtype (float32, bfloat16, float16 or float64).
        weight: :class:`~lora_ext.NF4Weight` of shape ``[N, K]`` on x's device.
        lora_A: ``[r, K]``, lora_B: ``[N, r]``, bias: ``[N]`` or None, all in x's dtype.
        scale: Python float (``lora_alpha / r``).
        dropout_p: inverted dropout on the LoRA branch input (same hash mask as :func:`lora_linear`).

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, bias, lora_A and lora_B.
    """
    scale, dropout_p = _check_nf4_lora_args(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    n, k = weight.shape
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, k)
    y2 = torch.ops.lora_ext.lora_linear_nf4(x2, *weight.op_args(), n, bias, lora_A, lora_B, scale, dropout_p, seed)
    return y2.view(*x.shape[:-1], n)
