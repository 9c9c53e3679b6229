"""The DoRA op family: weight-decomposed LoRA (Liu et al. 2024, PEFT's ``use_dora=True``).

DoRA rescales each output row of ``W + s·BA`` to a learned magnitude ``m [N]``::

    n   = ‖W + s·B A‖_row        (detached: no gradient flows into it, as in PEFT)
    g   = m / n
    y   = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias                                without dropout
    y   = x Wᵀ + bias + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ s·(x̃ Aᵀ) Bᵀ,  x̃ = drop(x)    with dropout (PEFT's formula)

The norm needs no ``N×K`` temporary:
``n² = ‖w_n‖² + 2s·b_n·(A w_n) + s²·b_nᵀ (A Aᵀ) b_n`` from one ``W Aᵀ [N, r]``
product and the ``r×r`` Gram matrix (``‖w_n‖²`` can be cached while W is
frozen). Rows where the expansion cancels (``n² < T / 4``, T the sum of the
terms' magnitudes) use the direct ``‖w_n + s·b_n A‖`` for those rows only
(docs/design.md, "DoRA").

Ops (schemas as in csrc/dora_bindings.cpp; compiled kernels csrc/host/dora_impl.h
for CPU and CUDA; the pure-PyTorch kernels below are the fallback and follow the
same blocks and rounding points):

- ``dora_weight_norm(weight, lora_A, lora_B, scale, weight_sq_norm?) -> n [N]`` (accumulation dtype)
- ``dora_linear(x, weight, bias?, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, seed?) -> y``
- ``dora_linear_backward(grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, scale,
  dropout_p, seed?, output_mask[6]) -> (dx, dW, dbias, dA, dB, dm)``
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import OpDef, register
from .checks import _check_tensor, check_adapter, check_grad_out, check_lora_linear_args, check_op_level, check_scale
from .functional import autocast_dtype_for
from .reference import acc_dtype, dropout_mask

__all__ = ["CANCELLATION_RATIO", "dora_linear", "dora_weight_norm", "weight_sq_norm"]

#: ``T / n²`` above this means the expansion lost more than ~2 bits: the row takes the direct formula.
CANCELLATION_RATIO = 4.0

_BLOCK_ELEMS = 1 << 18  # elements of W converted to the accumulation dtype at a time (fp16/bf16)


# --------------------------------------------------------------------------- checks


def _check_vector(t: object, name: str, n: int, dtype: torch.dtype, ref: Tensor) -> Tensor:
    """A ``[N]`` argument: ValueError for the shape, TypeError for type, dtype and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"lora_ext: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"lora_ext: {name} must be [N] = [{n}], got shape {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"lora_ext: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise TypeError(f"lora_ext: {name} is on {t.device} but weight is on {ref.device}")
    return t


def _check_weight_norm_args(weight, lora_A, lora_B, scale, weight_sq_norm) -> None:
    check_adapter(weight, lora_A, lora_B)
    check_scale(scale)
    if weight_sq_norm is not None:
        _check_vector(weight_sq_norm, "weight_sq_norm", weight.shape[0], acc_dtype(weight.dtype), weight)


def _check_dora_op(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed) -> None:
    check_op_level(x, weight, lora_A, lora_B, scale, bias, dropout_p, dropout_seed, 0)
    _check_vector(magnitude, "magnitude", weight.shape[0], weight.dtype, weight)
    _check_vector(weight_norm, "weight_norm", weight.shape[0], acc_dtype(weight.dtype), weight)


# --------------------------------------------------------------------------- pure-PyTorch kernels


def _weight_blocks(weight: Tensor):
    """(n0, rows) of the row blocks of W: one block (a view) when W is in the accumulation dtype."""
    n, k = weight.shape
    rows = n if weight.dtype == acc_dtype(weight.dtype) else max(16, _BLOCK_ELEMS // max(k, 1))
    for n0 in range(0, n, max(rows, 1)):
        yield n0, min(rows, n - n0)


def weight_sq_norm(weight: Tensor) -> Tensor:
    """``‖w_n‖²`` per row ``[N]`` in the accumulation dtype (the cacheable term of the DoRA norm)."""
    _check_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"lora_ext: weight must be 2-D [N, K], got shape {list(weight.shape)}")
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
        for n0, nb in _weight_blocks(weight):
            out[n0 : n0 + nb] = torch.linalg.vector_norm(weight[n0 : n0 + nb].to(acc), 2, dim=1).square()
    return out


def _weight_norm_ref(weight, lora_A, lora_B, scale, weight_sq_norm):
    _check_weight_norm_args(weight, lora_A, lora_B, scale, weight_sq_norm)
    acc = acc_dtype(weight.dtype)
    a_acc, b_acc = lora_A.to(acc), lora_B.to(acc)
    gram = a_acc @ a_acc.t()
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for n0, nb in _weight_blocks(weight):
        w_b = weight[n0 : n0 + nb].to(acc)
        b_b = b_acc[n0 : n0 + nb]
        if weight_sq_norm is not None:
            a = weight_sq_norm[n0 : n0 + nb]
        else:
            a = torch.linalg.vector_norm(w_b, 2, dim=1).square()
        c = (b_b * (w_b @ a_acc.t())).sum(1) * scale
        q = ((b_b @ gram) * b_b).sum(1) * (scale * scale)
        n2 = a + 2.0 * c + q
        terms = a + 2.0 * c.abs() + q
        n = n2.clamp_min(0.0).sqrt()
        bad = torch.logical_not(n2 * CANCELLATION_RATIO >= terms)
        if bool(bad.any()):
            idx = bad.nonzero().squeeze(1)
            direct = torch.addmm(w_b.index_select(0, idx), b_b.index_select(0, idx), a_acc, alpha=scale)
            n = n.index_copy(0, idx, torch.linalg.vector_norm(direct, 2, dim=1))
        out[n0 : n0 + nb] = n
    return out


def _kept(x_acc: Tensor, dropout_p: float, dropout_seed: Tensor | None) -> tuple[Tensor | None, float]:
    """(keep mask or None, the 1/(1-p) factor)."""
    if dropout_p <= 0.0:
        return None, 1.0
    keep = dropout_mask(dropout_seed, x_acc.shape[0], x_acc.shape[1], dropout_p)
    return keep, (0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p))


def _dora_linear_ref(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed):
    _check_dora_op(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed)
    acc = acc_dtype(x.dtype)
    m, n = x.shape[0], weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    x_acc = x.to(acc)
    keep, factor = _kept(x_acc, dropout_p, dropout_seed)
    xd = x_acc if keep is None else x_acc * keep
    a_acc, b_acc = lora_A.to(acc), lora_B.to(acc)
    g = magnitude.to(acc) / weight_norm
    xa = (xd @ a_acc.t()) * (scale * factor)
    for n0, nb in _weight_blocks(weight):
        w_b, b_b, g_b = weight[n0 : n0 + nb].to(acc), b_acc[n0 : n0 + nb], g[n0 : n0 + nb]
        if keep is None:
            out = (x_acc @ w_b.t() + xa @ b_b.t()) * g_b
        else:
            out = x_acc @ w_b.t() + (xd @ w_b.t()) * factor * (g_b - 1.0) + (xa @ b_b.t()) * g_b
        if bias is not None:
            out = out + bias[n0 : n0 + nb].to(acc)
        y[:, n0 : n0 + nb] = out
    return y


def _dora_linear_backward_ref(
    grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed, output_mask
):
    _check_dora_op(x, weight, None, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed)
    check_grad_out(grad_out, x, weight)
    need_x, need_w, need_bias, need_a, need_b, need_m = (bool(f) for f in output_mask)
    acc = acc_dtype(x.dtype)
    x_acc, g_out = x.to(acc), grad_out.to(acc)
    keep, factor = _kept(x_acc, dropout_p, dropout_seed)
    xd = x_acc if keep is None else x_acc * keep
    a_acc, b_acc = lora_A.to(acc), lora_B.to(acc)
    g = magnitude.to(acc) / weight_norm
    xa = (xd @ a_acc.t()) * factor
    n, k = weight.shape
    r = lora_A.shape[0]
    dx = torch.zeros(x.shape[0], k, dtype=acc, device=x.device)
    dxd = torch.zeros_like(dx)
    ggb = torch.zeros(x.shape[0], r, dtype=acc, device=x.device)
    gw = torch.zeros(n, k, dtype=acc, device=x.device) if need_w else None
    gb = torch.zeros(n, r, dtype=acc, device=x.device)
    gm = torch.zeros(n, dtype=acc, device=x.device)
    for n0, nb in _weight_blocks(weight):
        sl = slice(n0, n0 + nb)
        w_b, b_b, g_b, gr = weight[sl].to(acc), b_acc[sl], g[sl], g_out[:, sl]
        gg = gr * g_b
        if keep is None:
            dx += gg @ w_b
            if need_w:
                gw[sl] += gg.t() @ x_acc
        else:
            dx += gr @ w_b
            dxd += (gr * (g_b - 1.0)) @ w_b
            if need_w:
                gw[sl] += gr.t() @ x_acc + factor * ((gr * (g_b - 1.0)).t() @ xd)
        ggb += gg @ b_b
        gb[sl] = scale * (gg.t() @ xa)
        if need_m:
            lin = (xd @ w_b.t()) * factor + scale * (xa @ b_b.t())
            gm[sl] = (gr * lin).sum(0)
    empty = [x.new_empty(0) for _ in range(6)]
    grad_x = grad_w = grad_bias = grad_a = grad_b = grad_m = None
    if need_x:
        if keep is None:
            dx = dx + scale * (ggb @ a_acc)
        else:
            dx = dx + factor * (keep * (dxd + scale * (ggb @ a_acc)))
        grad_x = dx.to(x.dtype)
    if need_w:
        grad_w = gw.to(weight.dtype)
    if need_bias:
        grad_bias = g_out.sum(0).to(x.dtype)
    if need_a:
        grad_a = ((scale * factor) * (ggb.t() @ xd)).to(lora_A.dtype)
    if need_b:
        grad_b = gb.to(lora_B.dtype)
    if need_m:
        grad_m = (gm / weight_norm).to(magnitude.dtype)
    outs = (grad_x, grad_w, grad_bias, grad_a, grad_b, grad_m)
    return tuple(o if o is not None else e for o, e in zip(outs, empty))


# --------------------------------------------------------------------------- fakes and autograd


def _dora_linear_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed):
    return x.new_empty(x.shape[0], weight.shape[0])


def _dora_linear_backward_fake(
    grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed, output_mask
):
    likes = ((x, x.shape), (weight, weight.shape), (x, (weight.shape[0],)), (lora_A, lora_A.shape))
    likes += ((lora_B, lora_B.shape), (magnitude, magnitude.shape))
    return tuple(like.new_empty(shape) if flag else x.new_empty(0) for flag, (like, shape) in zip(output_mask, likes))


def _dora_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scale, dropout_p, dropout_seed = inputs
    # x (alive anyway), the parameters, the [N] norm and the seed: nothing activation-sized;
    # the backward recomputes x A^T and, for the magnitude's gradient, x W^T block by block.
    ctx.save_for_backward(x, weight, lora_A, lora_B, magnitude, weight_norm, dropout_seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.has_bias = bias is not None


def _dora_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, magnitude, weight_norm, dropout_seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2]), bool(needs[3]), bool(needs[4])]
    mask.append(bool(needs[5]))
    if not any(mask):
        return (None,) * 10
    grads = torch.ops.lora_ext.dora_linear_backward(
        grad_out, x, weight, lora_A, lora_B, magnitude, weight_norm, ctx.scale, ctx.dropout_p, dropout_seed, mask
    )
    gx, gw, gbias, ga, gb, gm = (gr if f else None for gr, f in zip(grads, mask))
    # weight_norm is detached by definition (PEFT, DoRA paper §4.3): no gradient.
    return gx, gw, gbias, ga, gb, gm, None, None, None, None


register(
    OpDef(
        "dora_weight_norm",
        "(Tensor weight, Tensor lora_A, Tensor lora_B, float scale, Tensor? weight_sq_norm) -> Tensor",
        _weight_norm_ref,
        lambda weight, lora_A, lora_B, scale, weight_sq_norm: weight.new_empty(
            weight.shape[0], dtype=acc_dtype(weight.dtype)
        ),
    ),
    OpDef(
        "dora_linear",
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "Tensor weight_norm, float scale, float dropout_p, Tensor? dropout_seed) -> Tensor",
        _dora_linear_ref,
        _dora_linear_fake,
        _dora_backward,
        _dora_setup_context,
    ),
    OpDef(
        "dora_linear_backward",
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, "
        "Tensor weight_norm, float scale, float dropout_p, Tensor? dropout_seed, bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        _dora_linear_backward_ref,
        _dora_linear_backward_fake,
    ),
)


# --------------------------------------------------------------------------- public functions


def dora_weight_norm(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, weight_sq_norm: Tensor | None = None
) -> Tensor:
    """``‖W + scale·B A‖`` per row, ``[N]`` in the accumulation dtype (fp32; fp64 for float64), detached.

    Computed from ``W Aᵀ [N, r]`` and ``A Aᵀ [r, r]`` without an ``N×K`` temporary,
    with the direct formula for rows where that expansion cancels.
    ``weight_sq_norm`` (:func:`weight_sq_norm` of W) skips the pass over W for ``‖w_n‖²``.
    """
    check_adapter(weight, lora_A, lora_B)
    scale = check_scale(scale)
    with torch.no_grad():
        return torch.ops.lora_ext.dora_weight_norm(weight, lora_A, lora_B, scale, weight_sq_norm)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    magnitude: Tensor,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    """Fused DoRA linear: ``(m / ‖W + s·BA‖_row) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias`` (PEFT's ``use_dora``).

    Args:
        x: ``[..., K]``; weight ``[N, K]``; lora_A ``[r, K]``; lora_B ``[N, r]``;
            magnitude ``[N]``; bias ``[N]`` or None; all one dtype (autocast casts them).
        scale: Python float (``lora_alpha / r``).
        dropout_p: dropout on the adapter path with PEFT's DoRA formula
            ``x Wᵀ + bias + (g − 1) ⊙ (x̃ Wᵀ) + g ⊙ s·(x̃ Aᵀ) Bᵀ``, ``x̃ = drop(x)``
            (the mask of :func:`lora_ext.dropout_mask`, regenerated in backward).
        weight_sq_norm: optional cached ``‖w_n‖²`` (:func:`weight_sq_norm`) of this very W.

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, weight, bias, lora_A, lora_B and
        magnitude; the norm is detached (no gradient through it), as in PEFT.
    """
    amp = autocast_dtype_for(x)
    if amp is not None:

        def cast(t):
            return t.to(amp) if isinstance(t, Tensor) and t.is_floating_point() else t

        with torch.autocast(x.device.type, enabled=False):
            return dora_linear(
                cast(x), cast(weight), cast(lora_A), cast(lora_B), cast(magnitude), scale, cast(bias), dropout_p,
                weight_sq_norm=weight_sq_norm,
            )  # fmt: skip
    scale, dropout_p = check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    n, k = weight.shape
    _check_vector(magnitude, "magnitude", n, weight.dtype, weight)
    norm = dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scale, weight_sq_norm)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, k)
    y2 = torch.ops.lora_ext.dora_linear(x2, weight, bias, lora_A, lora_B, magnitude, norm, scale, dropout_p, seed)
    return y2.view(*x.shape[:-1], n)
