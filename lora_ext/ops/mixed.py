"""The mixed-adapter op family: one batch, one adapter (or none) per row.

    lora_linear_mixed(x [M,K], weight [N,K], bias [N]?, lora_A [n,r,K], lora_B [n,N,r], scale float[n],
                      adapter_index int64 [M], dropout_p float[n], dropout_seed?) -> y [M,N]
    lora_linear_mixed_backward(grad_out [M,N], x, weight, lora_A, lora_B, scale, adapter_index, dropout_p,
                      dropout_seed?, output_mask bool[4] (x, bias, A, B)) -> (grad_x, grad_bias, grad_A, grad_B)

The math and the pure-PyTorch kernels are in :mod:`lora_ext.ops.mixed_reference`;
the compiled ones in csrc/cpu/mixed_cpu.cpp and csrc/cuda/mixed_cuda.cpp (schemas:
csrc/mixed_registration.cpp). The weight is frozen: the op has no weight gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import mixed_reference as ref
from ._library import OpDef, register
from .functional import autocast_dtype_for

__all__ = ["lora_linear_mixed"]


def _fake(x, weight, bias, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed):
    return x.new_empty(x.shape[0], weight.shape[0])


def _backward_fake(grad_out, x, weight, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed, output_mask):
    def out(flag: bool, like: Tensor, shape) -> Tensor:
        return like.new_empty(shape) if flag else x.new_empty(0)

    return (
        out(output_mask[0], x, x.shape),
        out(output_mask[1], x, (weight.shape[0],)),
        out(output_mask[2], lora_A, lora_A.shape),
        out(output_mask[3], lora_B, lora_B.shape),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, adapter_index, dropout_p, dropout_seed = inputs
    # x (alive anyway), the parameters, the index and the seed: nothing of size M x r, no mask.
    ctx.save_for_backward(x, weight, lora_A, lora_B, adapter_index, dropout_seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, lora_A, lora_B, adapter_index, dropout_seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[1]:
        raise RuntimeError(
            "lora_ext: lora_linear_mixed keeps the base weight frozen; it has no weight gradient "
            "(call weight.requires_grad_(False))"
        )
    mask = [bool(needs[0]), bool(ctx.has_bias and needs[2]), bool(needs[3]), bool(needs[4])]
    if not any(mask):
        return (None,) * 9
    grads = torch.ops.lora_ext.lora_linear_mixed_backward(
        grad_out, x, weight, lora_A, lora_B, ctx.scale, adapter_index, ctx.dropout_p, dropout_seed, mask
    )
    gx, gbias, ga, gb = (g if m else None for g, m in zip(grads, mask))
    return gx, None, gbias, ga, gb, None, None, None, None


register(
    OpDef(
        "lora_linear_mixed",
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float[] scale, "
        "Tensor adapter_index, float[] dropout_p, Tensor? dropout_seed) -> Tensor",
        ref.lora_linear_mixed,
        _fake,
        _backward,
        _setup_context,
    ),
    OpDef(
        "lora_linear_mixed_backward",
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float[] scale, "
        "Tensor adapter_index, float[] dropout_p, Tensor? dropout_seed, bool[4] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)",
        ref.lora_linear_mixed_backward,
        _backward_fake,
    ),
)


def _per_adapter(value: object, n: int, name: str) -> list[float]:
    """A float, a sequence of n numbers or a 1-D float tensor of n values -> list of n floats."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"lora_ext: {name} must be a floating-point tensor (float64/float32), got {value.dtype}")
        if value.dim() > 1:
            raise ValueError(f"lora_ext: {name} must be a number or 1-D [{n}], got shape {list(value.shape)}")
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * n
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(
            f"lora_ext: {name} must be a number, a sequence of numbers or a tensor, got {type(value).__name__}"
        )
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"lora_ext: {name} must hold numbers, got {type(v).__name__}")
        out.append(float(v))
    if len(out) != n:
        raise ValueError(f"lora_ext: {name} must hold one value per adapter ({n}), got {len(out)}")
    return out


def lora_linear_mixed(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float | Sequence[float] | Tensor,
    adapter_index: Tensor,
    bias: Tensor | None = None,
    dropout_p: float | Sequence[float] = 0.0,
) -> Tensor:
    """LoRA linear with one adapter per row: ``y[i] = x[i] Wᵀ + bias + s[a] · (drop_a(x[i]) A[a]ᵀ) B[a]ᵀ``.

    Args:
        x: input ``[..., K]``; the leading dims flatten into M rows.
        weight: frozen base weight ``[N, K]`` (no gradient).
        lora_A: stacked adapters ``[n, r, K]``; adapters of smaller rank zero-padded to the largest r.
        lora_B: ``[n, N, r]``, padded the same way.
        scale: per-adapter scale: one number for all, a sequence of n numbers, or a 1-D float tensor ``[n]``.
        adapter_index: int64, shape ``x.shape[:-1]`` or ``[M]``: the adapter of each row, ``-1`` for the base only.
        bias: ``[N]`` or None.
        dropout_p: per-adapter inverted dropout on the LoRA branch input (a number or n numbers);
            the mask is the dense op's hash (:func:`lora_ext.dropout_mask`) against each row's adapter rate.

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, bias, lora_A and lora_B (each adapter's
        gradient comes from its own rows only).
    """
    if not isinstance(lora_A, Tensor) or not isinstance(x, Tensor):
        raise TypeError("lora_ext: x and lora_A must be tensors")
    if lora_A.dim() != 3:
        raise ValueError(f"lora_ext: lora_A must be 3-D [n_adapters, r, K], got shape {list(lora_A.shape)}")
    n_ad = lora_A.shape[0]
    scales = _per_adapter(scale, n_ad, "scale")
    ps = _per_adapter(dropout_p, n_ad, "dropout_p")
    amp = autocast_dtype_for(x)
    if amp is not None:

        def cast(t):
            return t.to(amp) if isinstance(t, Tensor) and t.is_floating_point() else t

        with torch.autocast(x.device.type, enabled=False):
            return lora_linear_mixed(cast(x), cast(weight), cast(lora_A), cast(lora_B), scales, adapter_index,
                                     cast(bias), ps)  # fmt: skip
    if x.dim() < 1:
        raise ValueError(f"lora_ext: x must have at least 1 dim [..., K], got shape {list(x.shape)}")
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"lora_ext: adapter_index must be a torch.Tensor, got {type(adapter_index).__name__}")
    lead = tuple(x.shape[:-1])
    m = math.prod(lead)
    if tuple(adapter_index.shape) not in (lead, (m,)):
        raise ValueError(
            f"lora_ext: adapter_index must have shape x.shape[:-1] = {list(lead)} or [M] = [{m}], "
            f"got {list(adapter_index.shape)}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError("lora_ext: weight must be a 2-D tensor [N, K]")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "lora_ext: lora_linear_mixed keeps the base weight frozen (no weight gradient); "
            "pass a weight with requires_grad=False"
        )
    seed = None
    if max(ps) > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(m, x.shape[-1])
    y2 = torch.ops.lora_ext.lora_linear_mixed(
        x2, weight, bias, lora_A, lora_B, scales, adapter_index.reshape(m), ps, seed
    )
    return y2.view(*lead, weight.shape[0])
