"""Dispatcher registration: schemas (when the compiled library is absent), the
pure-PyTorch kernels for devices without compiled ones, fake kernels for
``torch.compile``/``opcheck``, and autograd.

The schemas are declared once in ``csrc/bindings.cpp``; ``SCHEMAS`` mirrors
them for the fallback and ``tests/test_registration.py`` checks that the two
agree.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _loader, _reference

NAMESPACE = "lora_ext"

SCHEMAS: dict[str, str] = {
    "lora_linear": (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, int strategy) -> Tensor"
    ),
    "lora_linear_backward": (
        "(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, float scale, "
        "float dropout_p, Tensor? dropout_seed, int strategy, bool[5] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "merge_": "(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> ()",
    "merged_weight": "(Tensor weight, Tensor lora_A, Tensor lora_B, float scale) -> Tensor",
    "dropout_mask": "(Tensor seed, int rows, int cols, float p) -> Tensor",
}

_FALLBACK_KERNELS = {
    "lora_linear": _reference.lora_linear,
    "lora_linear_backward": _reference.lora_linear_backward,
    "merge_": _reference.merge_,
    "merged_weight": _reference.merged_weight,
    "dropout_mask": _reference.dropout_mask,
}

# Dispatch keys that get the pure-PyTorch kernel when no compiled one is registered.
_FALLBACK_KEYS = ("CPU", "CUDA", "MPS", "XPU", "PrivateUse1")

if _loader.extension_loaded():
    _lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901
else:
    _lib = torch.library.Library(NAMESPACE, "DEF")  # noqa: TOR901
    for _name, _schema in SCHEMAS.items():
        _lib.define(_name + _schema)


def _has_compiled_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)


def fallback_dispatch_keys(name: str) -> list[str]:
    """Dispatch keys on which op ``name`` runs the pure-PyTorch fallback (for tests and diagnostics)."""
    return list(_FALLBACK_REGISTERED.get(name, ()))


_FALLBACK_REGISTERED: dict[str, list[str]] = {}
for _name, _fn in _FALLBACK_KERNELS.items():
    _FALLBACK_REGISTERED[_name] = []
    for _key in _FALLBACK_KEYS:
        if not _has_compiled_kernel(_name, _key):
            _lib.impl(_name, _fn, _key)
            _FALLBACK_REGISTERED[_name].append(_key)


# ---------------------------------------------------------------- fake kernels


@torch.library.register_fake(f"{NAMESPACE}::lora_linear")
def _lora_linear_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::lora_linear_backward")
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


@torch.library.register_fake(f"{NAMESPACE}::merge_")
def _merge_fake(weight, lora_A, lora_B, scale):
    return None


@torch.library.register_fake(f"{NAMESPACE}::merged_weight")
def _merged_weight_fake(weight, lora_A, lora_B, scale):
    return torch.empty_like(weight)


@torch.library.register_fake(f"{NAMESPACE}::dropout_mask")
def _dropout_mask_fake(seed, rows, cols, p):
    return seed.new_empty((rows, cols), dtype=torch.bool)


# -------------------------------------------------------------------- autograd


def _lora_linear_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, strategy = inputs
    # Only x (alive anyway), the parameters and the seed: no activation-sized
    # tensor and no dropout mask is kept; the backward recomputes x A^T.
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


torch.library.register_autograd(
    f"{NAMESPACE}::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup_context
)
