"""The NF4 (QLoRA) op family: schemas, fake kernels and autograd.

Every NF4 op takes the quantized weight as the seven storage arguments of
:class:`~lora_ext.ops.reference.NF4Args` (packed, absmax, nested_absmax,
nested_code, offset, blocksize, nested_blocksize), written ``<nf4>`` below:

    nf4_quantize(weight, blocksize) -> (packed uint8 [(n+1)/2], absmax fp32 [nblocks])
    blockwise_quantize_8bit(x, code [256], blocksize) -> (codes uint8 [n], absmax fp32 [nblocks])
    nf4_dequantize(<nf4>, shape, dtype) -> Tensor [shape]
    lora_linear_nf4(x [M,K], <nf4>, out_features N, bias [N]?, lora_A [r,K], lora_B [N,r],
                    scale, dropout_p, dropout_seed?) -> y [M,N]
    lora_linear_nf4_backward(grad_out [M,N], x, <nf4>, N, lora_A, lora_B, scale, dropout_p,
                    dropout_seed?, output_mask bool[4] (x, bias, A, B)) -> (grad_x, grad_bias, grad_A, grad_B)

The compiled kernels are csrc/cpu/nf4_cpu.cpp and csrc/cuda/nf4_cuda.cpp.
"""

from __future__ import annotations

import torch

from . import reference
from ._library import OpDef, register

_NF4 = (
    "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, int blocksize, "
    "int nested_blocksize"
)
_NSTORAGE = 7  # arguments in _NF4


def _nf4_quantize_fake(weight, blocksize):
    n = weight.numel()
    return (
        weight.new_empty(((n + 1) // 2,), dtype=torch.uint8),
        weight.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


def _blockwise_quantize_8bit_fake(x, code, blocksize):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


def _nf4_dequantize_fake(*args):
    packed, (shape, dtype) = args[0], args[_NSTORAGE:]
    return packed.new_empty(tuple(shape), dtype=dtype)


def _lora_linear_nf4_fake(x, *args):
    return x.new_empty(x.shape[0], args[_NSTORAGE])


def _lora_linear_nf4_backward_fake(grad_out, x, *args):
    out_features, lora_A, lora_B = args[_NSTORAGE : _NSTORAGE + 3]
    output_mask = args[-1]

    def out(flag, like, shape):
        return like.new_empty(shape) if flag else x.new_empty(0)

    return (
        out(output_mask[0], x, x.shape),
        out(output_mask[1], x, (out_features,)),
        out(output_mask[2], lora_A, lora_A.shape),
        out(output_mask[3], lora_B, lora_B.shape),
    )


# lora_linear_nf4's inputs: x, <nf4> (1..7), out_features (8), bias (9), lora_A (10), lora_B (11),
# scale, dropout_p, dropout_seed (12..14).
_BIAS, _LORA_A, _LORA_B = 9, 10, 11


def _lora_linear_nf4_setup_context(ctx, inputs, output):
    x, storage = inputs[0], reference.NF4Args(*inputs[1 : 1 + _NSTORAGE])
    out_features, bias, lora_A, lora_B, scale, dropout_p, dropout_seed = inputs[1 + _NSTORAGE :]
    # Only x, the quantized weight (alive as the module's storage), the adapter
    # and the seed: no dequantized weight, no mask, nothing activation-sized.
    ctx.save_for_backward(
        x, storage.packed, storage.absmax, storage.nested_absmax, storage.nested_code, lora_A, lora_B, dropout_seed
    )
    ctx.args = (storage.offset, storage.blocksize, storage.nested_blocksize, out_features, scale, dropout_p)
    ctx.has_bias = bias is not None


def _lora_linear_nf4_backward(ctx, grad_out):
    x, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, dropout_seed = ctx.saved_tensors
    offset, blocksize, nested_blocksize, out_features, scale, dropout_p = ctx.args
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(ctx.has_bias and needs[_BIAS]), bool(needs[_LORA_A]), bool(needs[_LORA_B])]
    grads: list = [None] * len(needs)
    if not any(mask):
        return tuple(grads)
    storage = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize)
    out = torch.ops.lora_ext.lora_linear_nf4_backward(
        grad_out, x, *storage, out_features, lora_A, lora_B, scale, dropout_p, dropout_seed, mask
    )
    for index, g, wanted in zip((0, _BIAS, _LORA_A, _LORA_B), out, mask):
        grads[index] = g if wanted else None
    return tuple(grads)


register(
    OpDef(
        "nf4_quantize",
        "(Tensor weight, int blocksize) -> (Tensor, Tensor)",
        reference.nf4_quantize,
        _nf4_quantize_fake,
    ),
    OpDef(
        "blockwise_quantize_8bit",
        "(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)",
        reference.blockwise_quantize_8bit,
        _blockwise_quantize_8bit_fake,
    ),
    OpDef(
        "nf4_dequantize",
        f"({_NF4}, int[] shape, ScalarType dtype) -> Tensor",
        reference.nf4_dequantize,
        _nf4_dequantize_fake,
    ),
    OpDef(
        "lora_linear_nf4",
        f"(Tensor x, {_NF4}, int out_features, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed) -> Tensor",
        reference.lora_linear_nf4,
        _lora_linear_nf4_fake,
        _lora_linear_nf4_backward,
        _lora_linear_nf4_setup_context,
    ),
    OpDef(
        "lora_linear_nf4_backward",
        f"(Tensor grad_out, Tensor x, {_NF4}, int out_features, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)",
        reference.lora_linear_nf4_backward,
        _lora_linear_nf4_backward_fake,
    ),
)
