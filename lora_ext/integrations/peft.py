"""Make an existing PEFT LoRA model use lora_ext's fused ops, in place.

``accelerate(peft_model)`` changes the class of every supported
``peft.tuners.lora.Linear`` to :class:`FusedLoraLinear`, a subclass whose
``forward`` calls :func:`lora_ext.lora_linear` (one fused call for the base GEMM,
bias and LoRA branch). Parameters, their names, ``save_pretrained``/
``load_adapter``, merging and everything else stay PEFT's own, so a
PEFT + Trainer pipeline gets faster with one line.

DoRA layers (``use_dora=True`` on an ``nn.Linear``) with one active adapter run
the fused DoRA op (:func:`lora_ext.ops.dora_linear`) with PEFT's formulas,
dropout included; several active adapters keep PEFT's forward.

Layers whose features the fused path does not implement (other LoRA
variants, ``lora_bias``, ``fan_in_fan_out``/Conv1D, quantized or non-Linear
bases, Conv/MultiheadAttention LoRA) keep PEFT's forward; one warning lists
them. Per call, anything unusual (``adapter_names`` mixed batches, extra
forward arguments, a custom dropout module) also falls back to PEFT's forward.
Embedding LoRA has no fused op and is left as is (no warning).
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Any

import torch
from peft.tuners.lora import layer as _peft_lora
from torch import Tensor, nn

from .. import ops
from ..nn.layers import _cast, base_layer_is_hooked, lora_linear_multi

__all__ = ["FusedLoraLinear", "accelerate"]


class FusedLoraLinear(_peft_lora.Linear):
    """PEFT's ``lora.Linear`` with a fused forward; same parameters, state and methods."""

    def _fused_adapters(self) -> list[tuple[Tensor, Tensor, float, float]] | None:
        """The active adapters as fused-op arguments, or None if PEFT's forward must run."""
        if self.disable_adapters or self.merged or getattr(self, "fan_in_fan_out", False):
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or not base.weight.is_floating_point():
            return None
        variants = getattr(self, "lora_variant", {})
        use_dora = getattr(self, "use_dora", {})
        lora_bias = getattr(self, "lora_bias", {})
        out = []
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            if name in variants or use_dora.get(name, False) or lora_bias.get(name, False):
                return None
            a, b = self.lora_A[name], self.lora_B[name]
            if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
                return None
            drop = self.lora_dropout[name]
            if isinstance(drop, nn.Identity):
                p = 0.0
            elif type(drop) is nn.Dropout:
                p = float(drop.p) if drop.training else 0.0
            else:
                return None
            out.append((a.weight, b.weight, float(self.scaling[name]), p))
        return out or None

    def _fused_dora(self) -> tuple[Tensor, Tensor, Tensor, float, float] | None:
        """(A, B, magnitude, scale, dropout_p) of the one active DoRA adapter, or None."""
        if self.disable_adapters or self.merged or getattr(self, "fan_in_fan_out", False):
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or not base.weight.is_floating_point():
            return None
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if not getattr(self, "use_dora", {}).get(name, False) or getattr(self, "lora_bias", {}).get(name, False):
            return None
        a, b = self.lora_A[name], self.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return None
        drop = self.lora_dropout[name]
        # PEFT's DoRA: dropout only when the module is not an Identity and the layer is training
        if isinstance(drop, nn.Identity) or not self.training:
            p = 0.0
        elif type(drop) is nn.Dropout:
            p = float(drop.p)
        else:
            return None
        return a.weight, b.weight, self.lora_magnitude_vector[name].weight, float(self.scaling[name]), p

    def _dora_forward(self, x: Tensor, dora: tuple[Tensor, Tensor, Tensor, float, float]) -> Tensor:
        a, b, m, s, p = dora
        base = self.base_layer
        amp = ops.autocast_dtype_for(x)
        dtype = amp if amp is not None else base.weight.dtype
        if x.dtype != dtype and amp is None:
            return super().forward(x)  # PEFT's own dtype handling (and its error)
        with torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
            y = ops.dora_linear(
                _cast(x, dtype), _cast(base.weight, dtype), _cast(a, dtype), _cast(b, dtype), _cast(m, dtype), s,
                _cast(base.bias, dtype), p,
            )  # fmt: skip
        return y

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args or kwargs:
            return super().forward(x, *args, **kwargs)
        dora = self._fused_dora()
        if dora is not None and not base_layer_is_hooked(self.base_layer):
            return self._dora_forward(x, dora)
        adapters = self._fused_adapters()
        if adapters is None:
            return super().forward(x)
        base = self.base_layer
        if base_layer_is_hooked(base):  # e.g. accelerate offload hooks: PEFT's own forward honours them
            return super().forward(x)
        return lora_linear_multi(x, base.weight, base.bias, adapters)


def _unsupported_reason(module: _peft_lora.Linear) -> str | None:
    use_dora = getattr(module, "use_dora", {})
    variants = {n: v for n, v in getattr(module, "lora_variant", {}).items() if not use_dora.get(n, False)}
    if any(use_dora.values()) and (
        type(module.base_layer) is not nn.Linear or getattr(module, "fan_in_fan_out", False)
    ):
        return "DoRA on " + (
            "fan_in_fan_out" if getattr(module, "fan_in_fan_out", False) else type(module.base_layer).__name__
        )
    if variants:
        return "LoRA variant " + "/".join(sorted({type(v).__name__ for v in variants.values()}))
    if any(getattr(module, "lora_bias", {}).values()):
        return "lora_bias=True"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D base)"
    base = module.base_layer
    if type(base) is not nn.Linear or not base.weight.is_floating_point():
        return f"base layer {type(base).__name__}"
    return None


def accelerate(peft_model: nn.Module) -> nn.Module:
    """Switch the supported LoRA Linear layers of ``peft_model`` to the fused forward, in place; returns it.

    Idempotent. Layers added later (e.g. by ``load_adapter`` targeting new
    modules) need another call. Outputs and gradients equal PEFT's to within
    rounding (the fused op accumulates in fp32 and rounds once).
    """
    skipped: collections.Counter[str] = collections.Counter()
    for _, module in peft_model.named_modules():
        if type(module) is _peft_lora.Linear:
            reason = _unsupported_reason(module)
            if reason is None:
                module.__class__ = FusedLoraLinear
            else:
                skipped[reason] += 1
        elif isinstance(module, _peft_lora.LoraLayer) and not isinstance(
            module, (FusedLoraLinear, _peft_lora.Embedding)
        ):
            skipped[type(module).__name__] += 1
    if skipped:
        detail = ", ".join(f"{n} x {reason}" for reason, n in sorted(skipped.items()))
        warnings.warn(
            f"lora_ext.accelerate: {sum(skipped.values())} LoRA layer(s) keep PEFT's own forward "
            f"(not supported by the fused path): {detail}",
            stacklevel=2,
        )
    return peft_model
