"""DoRA (weight-decomposed LoRA) on an ``nn.Linear``: :class:`LoraLinearDora`, PEFT's ``use_dora=True``.

Per DoRA adapter the layer holds, besides ``lora_A``/``lora_B``, a magnitude vector
under PEFT's name, so state dicts and adapter files have PEFT's keys::

    <path>.lora_magnitude_vector.<adapter>.weight    [out_features]

Forward (one active DoRA adapter, the fused op :func:`lora_ext.ops.dora_linear`)::

    y = (m / ‖W + s·BA‖_row) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias                          eval / no dropout
    y = x Wᵀ + bias + (m/‖·‖ − 1) ⊙ (x̃ Wᵀ) + (m/‖·‖) ⊙ s·(x̃ Aᵀ) Bᵀ,  x̃ = drop(x)   training with dropout

(PEFT's ``peft/tuners/lora/dora.py`` formulas, the norm detached). ``‖w_n‖²`` is cached
while the base weight is unchanged (keyed on its storage, version counter, dtype and
shape). Several active adapters, or a hooked base layer, run PEFT's sequence of
per-adapter updates unfused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.reference import acc_dtype
from .layers import LoraLinear, _cast, base_layer_is_hooked

__all__ = ["DORA_MAGNITUDE_KEY", "DoraMagnitude", "LoraLinearDora", "as_dora"]

#: PEFT's state-dict suffix of a DoRA adapter's magnitude vector (after ``"<path>."``).
DORA_MAGNITUDE_KEY = "lora_magnitude_vector.weight"


class DoraMagnitude(nn.Module):
    """One adapter's magnitude ``m [out_features]`` (PEFT's ``DoraLinearLayer``: a parameter named ``weight``)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}"


class LoraLinearDora(LoraLinear):
    """:class:`LoraLinear` whose adapters may be DoRA adapters (``add_adapter(..., use_dora=True)``).

    Non-DoRA adapters on the same layer behave exactly as in :class:`LoraLinear`.
    ``merge()`` writes ``(m / ‖W + s·BA‖) ⊙ (W + s·BA)`` (fp32 accumulation, one
    rounding) and remembers the norm, so ``unmerge()`` can divide it out again, as PEFT.
    """

    adapter_layer_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def _init_containers(self, base_layer: nn.Module) -> None:
        super()._init_containers(base_layer)
        self._init_dora_state()

    def _init_dora_state(self) -> None:
        if "lora_magnitude_vector" not in self._modules:
            self.lora_magnitude_vector = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self._merged_norms: dict[str, Tensor] = {}
        self._sq_norm_cache: tuple[tuple, Tensor] | None = None

    # ---- adapters

    def _adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        yield from super()._adapter_params(name)
        if name in self.lora_magnitude_vector:
            yield self.lora_magnitude_vector[name].weight

    def add_adapter(self, name: str, r: int, lora_alpha: float, *, use_dora: bool = False, **kwargs: Any) -> None:
        """As :meth:`LoraLinear.add_adapter`; ``use_dora=True`` adds a magnitude vector.

        The magnitude starts at ``‖W + s·BA‖_row`` (so a fresh DoRA adapter leaves the
        layer's output as plain LoRA's), or takes ``weights["lora_magnitude_vector.weight"]``.
        """
        if not isinstance(use_dora, bool):
            raise TypeError(f"lora_ext: use_dora must be a bool, got {type(use_dora).__name__}")
        weights = kwargs.get("weights")
        magnitude = None
        if use_dora and weights is not None:
            if DORA_MAGNITUDE_KEY not in weights:
                raise ValueError(f"lora_ext: DoRA adapter {name!r} needs {DORA_MAGNITUDE_KEY!r} in its weights")
            magnitude = weights[DORA_MAGNITUDE_KEY]
            if tuple(magnitude.shape) != (self.out_features,):
                raise ValueError(
                    f"lora_ext: {DORA_MAGNITUDE_KEY} has shape {list(magnitude.shape)}, expected [{self.out_features}]"
                )
        super().add_adapter(name, r, lora_alpha, **kwargs)
        self.use_dora[name] = use_dora
        if not use_dora:
            return
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if magnitude is None:
                w = self.base_layer.weight.detach()
                acc = acc_dtype(w.dtype)
                magnitude = ops.dora_weight_norm(w.to(acc), a.to(acc), b.to(acc), self.scaling[name])
            value = magnitude.detach().to(device=a.device, dtype=a.dtype).clone()
        self.lora_magnitude_vector[name] = DoraMagnitude(value)
        self.lora_magnitude_vector[name].weight.requires_grad_(name in self._active_adapters)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.use_dora.pop(name, None)

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        out = super().adapter_tensors(name)
        if self.use_dora.get(name, False):
            out[DORA_MAGNITUDE_KEY] = self.lora_magnitude_vector[name].weight
        return out

    def _is_dora(self, name: str) -> bool:
        return self.use_dora.get(name, False)

    # ---- forward

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._disable_adapters or self.merged_adapters or args or kwargs:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._active_adapters if a in self.r]
        if not any(self._is_dora(n) for n in active):
            return super().forward(x)
        if len(active) == 1 and not base_layer_is_hooked(self.base_layer):
            return self._fused_dora(x, active[0])
        return self._peft_sequence(x, active)

    def _weight_sq_norm(self, w: Tensor, source: Tensor) -> Tensor | None:
        """Cached ``‖w_n‖²`` of ``w`` (``source`` cast to the compute dtype); None under torch.compile."""
        if torch.compiler.is_compiling():
            return None
        key = (source.data_ptr(), source._version, source.dtype, w.dtype, source.device, tuple(source.shape))
        cached = self._sq_norm_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        value = ops.weight_sq_norm(w)
        self._sq_norm_cache = (key, value)
        return value

    def _fused_dora(self, x: Tensor, name: str) -> Tensor:
        amp = ops.autocast_dtype_for(x)
        base = self.base_layer
        dtype = amp if amp is not None else base.weight.dtype
        if amp is None and x.dtype != dtype:
            raise TypeError(
                f"lora_ext: input x has dtype {x.dtype} but the layer's weight is {dtype}; "
                "cast the input (or the model), or run under torch.autocast"
            )
        guard = torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext()
        with guard:
            w = _cast(base.weight, dtype)
            sq = self._weight_sq_norm(w.detach(), base.weight)
            return ops.dora_linear(
                _cast(x, dtype),
                w,
                _cast(self.lora_A[name].weight, dtype),
                _cast(self.lora_B[name].weight, dtype),
                _cast(self.lora_magnitude_vector[name].weight, dtype),
                self.scaling[name],
                _cast(base.bias, dtype),
                self.lora_dropout_p[name] if self.training else 0.0,
                weight_sq_norm=sq,
            )

    def _peft_sequence(self, x: Tensor, active: list[str]) -> Tensor:
        """PEFT's ``lora.Linear.forward`` order: base, then each adapter's update on the running result."""
        base = self.base_layer
        result = base(x)
        out_dtype = result.dtype
        for n in active:
            a, b, s = self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]
            p = self.lora_dropout_p[n] if self.training else 0.0
            xc = x.to(a.dtype)
            if not self._is_dora(n):
                xd = F.dropout(xc, p, training=True) if p > 0 else xc
                result = result + (F.linear(F.linear(xd, a), b) * s).to(result.dtype)
                continue
            w = base.weight.to(xc.dtype)
            acc = acc_dtype(xc.dtype)
            norm = ops.dora_weight_norm(w.detach().to(acc), a.detach().to(acc), b.detach().to(acc), s)
            g = (self.lora_magnitude_vector[n].weight / norm.to(xc.dtype)).view(1, -1)
            if p > 0:
                xc = F.dropout(xc, p, training=True)
                base_result = F.linear(xc, w)
            else:
                base_result = result if base.bias is None else result - base.bias
            result = result + (g - 1) * base_result + g * F.linear(F.linear(xc, a), b) * s
        return result.to(out_dtype)

    # ---- merging

    def _dora_merge(self, w: Tensor, w0: Tensor, names: list[str], sign: int) -> Tensor:
        """``w`` (acc dtype) with adapters ``names`` merged (sign +1, in order) or unmerged (−1, reversed)."""
        for n in names if sign > 0 else reversed(names):
            a, b = (t.detach().to(w.dtype) for t in self.delta_factors(n))
            s = self.scaling[n]
            if not self._is_dora(n):
                w = torch.addmm(w, b, a, alpha=sign * s)
                continue
            if sign > 0:
                norm = ops.dora_weight_norm(w0, a, b, s)  # the norm of the unmerged weight, as forward uses it
                self._merged_norms[n] = norm
            else:
                norm = self._merged_norms.pop(n)
            g = (self.lora_magnitude_vector[n].weight.detach().to(w.dtype) / norm).view(-1, 1)
            w = g * torch.addmm(w, b, a, alpha=s) if sign > 0 else torch.addmm(w / g, b, a, alpha=-s)
        return w

    def _unmerged_weight(self) -> Tensor:
        w = self.base_layer.weight.detach()
        if not self.merged_adapters:
            return w
        norms = dict(self._merged_norms)
        try:
            acc = acc_dtype(w.dtype)
            return self._dora_merge(w.to(acc), w, list(self.merged_adapters), -1).to(w.dtype)
        finally:
            self._merged_norms = norms

    def merged_weight(self, names: list[str] | None = None) -> Tensor:
        names = list(names if names is not None else self.active_adapters)
        w0 = self._unmerged_weight()
        acc = acc_dtype(w0.dtype)
        w0_acc = w0.to(acc)
        norms = dict(self._merged_norms)
        try:
            return self._dora_merge(w0_acc, w0_acc, names, +1).to(w0.dtype)
        finally:
            self._merged_norms = norms

    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        all_names = list(self.merged_adapters) + names
        with torch.no_grad():
            w0 = self._unmerged_weight()
            w0_acc = w0.to(acc_dtype(w0.dtype))
            norms = dict(self._merged_norms)
            new = self._dora_merge(w0_acc, w0_acc, all_names, +1).to(w0.dtype)
            if safe_merge and not torch.isfinite(new).all():
                self._merged_norms = norms
                raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
            self.base_layer.weight.copy_(new)

    def _unmerge_all(self) -> None:
        if not self.merged_adapters:
            return
        w = self.base_layer.weight
        with torch.no_grad():
            acc = acc_dtype(w.dtype)
            w.copy_(self._dora_merge(w.detach().to(acc), w, list(self.merged_adapters), -1).to(w.dtype))
        self._merged_norms.clear()

    def _repr_state(self) -> str:
        dora = [n for n in self.adapters if self._is_dora(n)]
        return super()._repr_state() + (f", dora={dora}" if dora else "")


def as_dora(layer: LoraLinear) -> LoraLinearDora:
    """``layer`` as a :class:`LoraLinearDora` (in place: same object, same parameters and adapters)."""
    if isinstance(layer, LoraLinearDora):
        return layer
    if type(layer) is not LoraLinear:
        raise ValueError(
            f"lora_ext: DoRA is implemented for nn.Linear base layers only, got a {type(layer).__name__} "
            f"around a {type(layer.base_layer).__name__}"
        )
    layer.__class__ = LoraLinearDora
    layer._init_dora_state()
    for name in layer.adapters:
        layer.use_dora[name] = False
    return layer
