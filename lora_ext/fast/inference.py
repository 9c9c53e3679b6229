"""``for_inference`` / ``for_training``: merged adapters for inference, the exact trainable state back for training.

Dense layers are merged with lora_ext's exact merge (``LoraLayer.merge(exact=True)``,
docs/model_api.md "Exact merge"): the elements a merge/unmerge round trip would
not restore are recorded, and the unmerge in ``for_training`` writes them back,
so the weights are the original bits again.

An NF4 base (``LoraLinearNF4``) is not merged by default: merging would
dequantize it into a full-precision layer, which undoes the 4-bit load. It
stays 4-bit with its adapters on the fused dequantize-and-LoRA op
(``merge="all"`` merges those too; their unmerge puts the NF4 layer back
unchanged); bitsandbytes ``Linear4bit`` bases likewise. Conv and DoRA layers,
whose unmerge is exact only to rounding, stay unmerged (still exactly reversible).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.inject import _state, _unwrap, lora_layers

__all__ = ["for_inference", "for_training"]

_ATTR = "_lora_ext_inference"
_MERGE_OPTIONS = ("auto", "all", "none")


@dataclass
class _InferenceState:
    training: dict[str, bool] = field(default_factory=dict)  # module name -> .training
    requires_grad: dict[str, bool] = field(default_factory=dict)  # parameter name -> requires_grad
    merged: list[str] = field(default_factory=list)  # layers merged by for_inference


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
            if layer.exact_unmerge == "restore":  # 4-bit bases (LinearNF4, bitsandbytes Linear4bit)
                if merge == "all":
                    layer.merge()  # swaps in a dequantized layer; the 4-bit one is kept and put back by unmerge
                    state.merged.append(name)
                continue
            if not layer.supports_exact_merge():
                continue  # conv / DoRA layers: a merge would not reverse bit for bit; they stay unmerged
            layer.merge(exact=True)
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
            modules[name].unmerge()  # exact: the recorded elements are written back
    for n, p in root.named_parameters():
        if n in state.requires_grad:
            p.requires_grad_(state.requires_grad[n])
    for n, m in root.named_modules():
        m.training = state.training.get(n, True)
    if not any(state.training.values()):
        root.train()  # a model that was in eval mode before for_inference goes to training mode
    delattr(root, _ATTR)
    return model
