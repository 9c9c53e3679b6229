"""The dense op family: schemas, fake kernels and autograd of the LoRA linear, merge and dropout mask.

Shapes: x [M, K], weight [N, K], bias [N], lora_A [r, K], lora_B [N, r], grad_out [M, N].
The compiled kernels are csrc/cpu/lora_cpu.cpp and csrc/cuda/lora_cuda.cpp; the
pure-PyTorch ones are in :mod:`lora_ext.ops.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._library import OpDef, register


def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy):
    return x.new_empty(x.shape[0], weight.shape[0])


def _lora_linear_backward_fake(
    grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask
):
    def out(flag: bool, like: Tensor, shape) -> Tensor:
        return like.new_empty(shape) if flag else x.new_empty(0)

    return (
        out(output_mask[0], x, x.shape),
        out(output_mask[1], weight, weight.shape),
        out(output_mask[2], x, (weight.shape[0],)),
        out(output_mask[3], lora_A, lora_A.shape),
        out(output_mask[4], lora_B, lora_B.shape),
    )


def _lora_linear_xa_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=acc)


def _lora_linear_backward_xa_fake(
    grad_out, x, xa, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask
):
    return _lora_linear_backward_fake(
        grad_out, x, weight, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy, output_mask
    )


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy = inputs
    # Only x (alive anyway), the parameters and the seed: no activation-sized
    # tensor and no dropout mask is kept; the backward recomputes x A^T. (The C++
    # autograd of csrc/autograd.cpp, which replaces this one when the library is
    # loaded, keeps xa = drop(x) A^T on the CPU where the forward computes it.)
    ctx.save_for_backward(x, weight, lora_A, lora_B, dropout_seed)
    ctx.scale = scale
    ctx.dropout_p = dropout_p
    ctx.strategy = strategy
    ctx.has_bias = bias is not None


def _lora_linear_backward(ctx, grad_out):
    x, weight, lora_A, lora_B, dropout_seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2]), bool(needs[3]), bool(needs[4])]
    if not any(mask):
        return (None,) * 9
    grads = torch.ops.lora_ext.lora_linear_backward(
        grad_out, x, weight, lora_A, lora_B, ctx.scale, ctx.dropout_p, dropout_seed, ctx.strategy, mask
    )
    gx, gw, gbias, ga, gb = (g if m else None for g, m in zip(grads, mask))
    return gx, gw, gbias, ga, gb, None, None, None, None


register(
    OpDef(
        "lora_linear",
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, int strategy) -> Tensor",
        reference.lora_linear,
        _lora_linear_fake,
        _lora_linear_backward,
        _lora_linear_setup_context,
    ),
    OpDef(
        "lora_linear_backward",
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, int strategy, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        reference.lora_linear_backward,
        _lora_linear_backward_fake,
    ),
    # The autograd pair that keeps xa = drop(x) A^T from the forward (csrc/autograd.cpp takes it
    # on the CPU when the forward computes xa anyway); no autograd of their own.
    OpDef(
        "lora_linear_xa",
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, int strategy) -> (Tensor, Tensor)",
        reference.lora_linear_xa,
        _lora_linear_xa_fake,
    ),
    OpDef(
        "lora_linear_backward_xa",
        "(Tensor grad_out, Tensor x, Tensor xa, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, int strategy, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        reference.lora_linear_backward_xa,
        _lora_linear_backward_xa_fake,
    ),
    OpDef(
        "merge_",
        "(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()",
        reference.merge_,
        lambda weight, lora_A, lora_B, scale: None,
    ),
    OpDef(
        "merged_weight",
        "(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor",
        reference.merged_weight,
        lambda weight, lora_A, lora_B, scale: torch.empty_like(weight),
    ),
    OpDef(
        "dropout_mask",
        "(Tensor seed, int rows, int cols, float p) -> Tensor",
        reference.dropout_mask,
        lambda seed, rows, cols, p: seed.new_empty((rows, cols), dtype=torch.bool),
    ),
)
