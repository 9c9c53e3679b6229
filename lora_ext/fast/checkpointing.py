"""Activation checkpointing for the Unsloth-style entry points, with optional offload to CPU memory.

``use_gradient_checkpointing=True`` is transformers' own checkpointing of
every decoder/encoder layer (``torch.utils.checkpoint``, non-reentrant): each
layer keeps only its input and recomputes the rest in the backward.

``"unsloth"`` additionally moves that one kept input per layer (the hidden
states) to CPU memory, pinned and asynchronous on CUDA, and brings it back for
the recompute: the checkpoint runs under ``torch.autograd.graph.save_on_cpu``,
and the checkpoint keeps its inputs through ``save_for_backward``, which goes
through the offload hooks (the tensors saved inside the layer are not kept at
all). On a model whose parameters are on the CPU there is nothing to offload
to, and ``"unsloth"`` is plain checkpointing. (transformers 5.24's
``activation_checkpointing_enable(offload=True)`` does the same; this works with
any transformers version that has ``_set_gradient_checkpointing``.)

Both restore the RNG state for the recompute, and the fused dropout mask is a
function of its seed, so the gradients equal those without checkpointing with
dropout on (tested).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["enable_checkpointing", "offloaded_checkpoint"]


def offloaded_checkpoint(function: Callable, *args: Any, pin_memory: bool | None = None, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint`` whose kept inputs live in CPU memory until the backward.

    Args:
        function: the layer's forward (keyword arguments bound, as transformers passes it).
        args: its positional inputs; tensors among them are copied to CPU memory (pinned when ``pin_memory``,
            default: when a CUDA device is in use) and back to their device for the recompute.
    """
    if pin_memory is None:
        pin_memory = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
    with torch.autograd.graph.save_on_cpu(pin_memory=pin_memory):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _parameters_on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def enable_checkpointing(model: nn.Module, mode: bool | str, *, offload: bool | None = None) -> str:
    """Turn on the model's activation checkpointing; returns what was enabled ("off", "checkpoint", "offload").

    Args:
        mode: False/None (nothing), True, or ``"unsloth"`` (checkpoint + offload of the kept inputs to CPU memory
            when the model is on an accelerator).
        offload: force the offload on or off (tests use it on CPU); default: ``mode == "unsloth"`` and the
            parameters are not on the CPU.

    Raises:
        ValueError: an unknown mode, or a model without transformers' checkpointing support.
    """
    if mode is None or mode is False:
        return "off"
    if not (mode is True or (isinstance(mode, str) and mode.lower() == "unsloth")):
        raise ValueError(f"lora_ext: use_gradient_checkpointing must be True, False or 'unsloth', got {mode!r}")
    if not getattr(model, "supports_gradient_checkpointing", False) or not hasattr(
        model, "_set_gradient_checkpointing"
    ):
        raise ValueError(
            f"lora_ext: {type(model).__name__} does not support transformers' gradient checkpointing "
            "(use_gradient_checkpointing needs a transformers model whose layers support it)"
        )
    if offload is None:
        offload = mode is not True and not _parameters_on_cpu(model)
    if offload:
        func = offloaded_checkpoint
    else:
        func = functools.partial(checkpoint, use_reentrant=False)
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    # Embedding outputs that require grad, as PEFT and Unsloth set up (needed by reentrant checkpoint
    # functions a user may install later; harmless for the non-reentrant one).
    if hasattr(model, "enable_input_require_grads"):
        try:
            model.enable_input_require_grads()
        except NotImplementedError:  # a model without input embeddings
            pass
    if hasattr(model, "config"):
        model.config.use_cache = False
    return "offload" if offload else "checkpoint"
