"""``for_inference`` / ``for_training``: merged adapters for inference, the exact trainable state back for training.

Merging ``W ← round(W + s·BA)`` and unmerging ``round(W' − s·BA)`` does not give
``W`` back bit for bit (docs/model_api.md, "Numerics of merging"). So
``for_inference`` records, per merged weight, the difference between the
original bits and what the unmerge will compute, as integers of the weight's
bit pattern: small (one or two units in the last place) and stored as int8 when
they fit, else the original weight itself is kept. ``for_training`` unmerges and
adds the difference back: the weights are the original bits again.

An NF4 base (``LoraLinearNF4``) is not merged by default: merging would
dequantize it into a full-precision layer, which undoes the 4-bit load. It
stays 4-bit with its adapters on the fused dequantize-and-LoRA op
(``merge="all"`` merges those too; their unmerge puts the NF4 layer back
unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..model.inject import _state, _unwrap, lora_layers
from ..nn.layers import LoraLayer, LoraLinearNF4

__all__ = ["for_inference", "for_training"]

_ATTR = "_lora_ext_inference"
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
_MERGE_OPTIONS = ("auto", "all", "none")


@dataclass
class _InferenceState:
    training: dict[str, bool] = field(default_factory=dict)  # module name -> .training
    requires_grad: dict[str, bool] = field(default_factory=dict)  # parameter name -> requires_grad
    residuals: dict[str, Tensor] = field(default_factory=dict)  # layer name -> bits(W) − bits(unmerge(W'))
    originals: dict[str, Tensor] = field(default_factory=dict)  # layer name -> W, when the residual does not fit
    merged: list[str] = field(default_factory=list)  # layers merged by for_inference


def _bits(t: Tensor) -> Tensor:
    return t.view(_INT_VIEW[t.element_size()]).to(torch.int64)


def _residual(weight_before: Tensor, weight_back: Tensor) -> Tensor | None:
    """``bits(before) − bits(back)`` as int8, or None when some difference does not fit."""
    diff = _bits(weight_before) - _bits(weight_back)
    if diff.numel() and diff.abs().max().item() > 127:
        return None
    return diff.to(torch.int8)


def _dense_merge_exact(layer: LoraLayer, state: _InferenceState, name: str) -> None:
    weight = layer.base_layer.weight
    before = weight.detach().clone()
    layer.merge()
    with torch.no_grad():
        # What unmerge() will compute from the merged weight: the same code, run now on a copy.
        merged = weight.data
        weight.data = merged.clone()
        layer._unmerge_all()
        back = weight.data
        weight.data = merged
    residual = _residual(before, back)
    if residual is None:
        state.originals[name] = before
    else:
        state.residuals[name] = residual


def for_inference(model: nn.Module, *, merge: str = "auto") -> nn.Module:
    """Eval mode and the fastest inference form: adapters merged into the base weights (no LoRA cost per token).

    Exactly reversible with :func:`for_training`. Returns ``model``.

    Args:
        merge: ``"auto"`` (dense layers merged, 4-bit layers kept 4-bit with fused adapters), ``"all"`` (4-bit
            layers merged too, into a dequantized full-precision layer) or ``"none"`` (eval mode only).

    Raises:
        ValueError: an unknown ``merge``, a model already in inference form, or one already merged by hand.
    """
    root = _unwrap(model)
    if merge not in _MERGE_OPTIONS:
        raise ValueError(f"lora_ext: merge must be one of {list(_MERGE_OPTIONS)}, got {merge!r}")
    if getattr(root, _ATTR, None) is not None:
        raise ValueError("lora_ext: the model is already in inference form (call for_training first)")
    has_adapters = _state(root, required=False) is not None
    layers = list(lora_layers(root)) if has_adapters else []
    if any(layer.merged for _, layer in layers):
        raise ValueError("lora_ext: the model is already merged; unmerge_adapter(model) before for_inference")
    if any(layer.disabled for _, layer in layers):
        raise ValueError("lora_ext: cannot call for_inference inside disable_adapters()")
    state = _InferenceState(
        training={n: m.training for n, m in root.named_modules()},
        requires_grad={n: p.requires_grad for n, p in root.named_parameters()},
    )
    root.eval()
    if merge != "none":
        for name, layer in layers:
            if not layer.active_adapters:
                continue
            if isinstance(layer, LoraLinearNF4):
                if merge == "all":
                    layer.merge()  # swaps in a dequantized layer; the NF4 one is kept and put back by unmerge
                    state.merged.append(name)
                continue
            _dense_merge_exact(layer, state, name)
            state.merged.append(name)
    for p in root.parameters():
        p.requires_grad_(False)
    setattr(root, _ATTR, state)
    return model


def for_training(model: nn.Module) -> nn.Module:
    """Undo :func:`for_inference` exactly (original weight bits, train/eval flags, ``requires_grad``); returns ``model``.

    A model that never went through ``for_inference`` is put in training mode.
    """
    root = _unwrap(model)
    state: _InferenceState | None = getattr(root, _ATTR, None)
    if state is None:
        root.train()
        return model
    modules = dict(root.named_modules())
    with torch.no_grad():
        for name in reversed(state.merged):
            layer = modules[name]
            layer.unmerge()
            weight = layer.base_layer.weight
            if name in state.originals:
                weight.data.copy_(state.originals[name])
            elif name in state.residuals:
                bits = _bits(weight.data) + state.residuals[name].to(torch.int64)
                weight.data.copy_(bits.to(_INT_VIEW[weight.element_size()]).view(weight.dtype))
    for n, p in root.named_parameters():
        if n in state.requires_grad:
            p.requires_grad_(state.requires_grad[n])
    for n, m in root.named_modules():
        m.training = state.training.get(n, True)
    if not any(state.training.values()):
        root.train()  # a model that was in eval mode before for_inference goes to training mode
    delattr(root, _ATTR)
    return model
