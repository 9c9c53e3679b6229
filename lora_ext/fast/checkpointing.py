"""Activation checkpointing for the Unsloth-style entry points, with optional offload to CPU memory.

``use_gradient_checkpointing=True`` is transformers' own checkpointing of
every decoder/encoder layer (``torch.utils.checkpoint``, non-reentrant): each
layer keeps only its input and recomputes the rest in the backward.

``"unsloth"`` additionally moves that one kept input per layer (the hidden
states) to CPU memory and brings it back for the recompute: the checkpoint runs
under saved-tensor hooks (:class:`offload_saved_tensors`) that copy each saved
device tensor into pinned host memory with a non-blocking copy (ordered on the
current stream, so the device memory can be reused at once) and copy it back
non-blocking in the backward. The checkpoint keeps its inputs through
``save_for_backward``, which goes through these hooks (the tensors saved inside
the layer are not kept at all). ``torch.autograd.graph.save_on_cpu`` does the
same with a blocking device-to-host copy. On a model whose parameters are on the CPU there is nothing to offload
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

__all__ = ["enable_checkpointing", "offload_saved_tensors", "offloaded_checkpoint"]


def _pack_to_cpu(t: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
    """A saved tensor's copy in host memory (pinned and non-blocking from CUDA); sparse tensors stay as they are."""
    if t.layout != torch.strided:
        return None, t
    pin = t.is_cuda
    packed = torch.empty(t.size(), dtype=t.dtype, pin_memory=pin)
    packed.copy_(t, non_blocking=pin)
    return t.device, packed


def _unpack_from_cpu(saved: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
    device, packed = saved
    if device is None:
        return packed
    return packed.to(device, non_blocking=packed.is_pinned())


class offload_saved_tensors(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801  (a context manager, as torch's)
    """Saved-tensor hooks: every tensor autograd saves inside the block waits for the backward in host memory."""

    def __init__(self) -> None:
        super().__init__(lambda t: _pack_to_cpu(t), lambda saved: _unpack_from_cpu(saved))


def offloaded_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint`` (non-reentrant) whose kept inputs live in host memory until the backward.

    Args:
        function: the layer's forward (keyword arguments bound, as transformers passes it).
        args: its positional inputs; the tensors among them are what the checkpoint keeps, copied to host
            memory (pinned, non-blocking from CUDA) and back to their device for the recompute.
    """
    with offload_saved_tensors():
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
