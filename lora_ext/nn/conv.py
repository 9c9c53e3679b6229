"""LoRA layers for GPT-2's ``Conv1D`` (a transposed linear) and for ``nn.Conv1d/2d/3d``.

Same parameter names and shapes as PEFT's ``lora.Linear`` (over ``Conv1D``,
``fan_in_fan_out=True``) and ``lora.Conv1d/Conv2d/Conv3d``, so adapter files
load both ways:

    Conv1D (weight [in, out]):   lora_A.<adapter>.weight [r, in]     lora_B.<adapter>.weight [out, r]
    ConvNd (weight [out, in/g, *k]):
        lora_A.<adapter>.weight [r, in, *k]         a conv with the base's kernel, stride, padding, dilation
        lora_B.<adapter>.weight [out, r/g, 1, ...]  a 1x1 conv with the base's groups
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LoraLayer, LoraLinear, _copy_checked, _merge_into, lora_linear_multi

try:  # transformers is optional at import time; without it no module is a Conv1D
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is installed in every supported setup

    class Conv1D(nn.Module):  # type: ignore[no-redef]
        """Placeholder: transformers is not installed."""


__all__ = ["Conv1D", "check_conv_rank", "LoraConv1D", "LoraConv1d", "LoraConv2d", "LoraConv3d", "LoraConvNd"]


class LoraConv1D(LoraLinear):
    """LoRA around a transformers ``Conv1D`` (GPT-2 family): ``y = x W + bias + Σ s · dropout(x) Aᵀ Bᵀ``.

    ``Conv1D`` is a linear layer with a transposed weight ``[in_features, out_features]``.
    The fused op takes ``W [N, K]``: it gets ``weight.t()``, a view (no copy per call;
    the kernels read transposed weights in place). Adapter layout and API as
    :class:`LoraLinear` (PEFT's ``lora.Linear`` with ``fan_in_fan_out=True``).
    """

    base_type = Conv1D
    base_name = "a transformers Conv1D"
    feature_attrs = ("nx", "nf")  # weight [nx, nf] = [in, out]
    fan_in_fan_out = True

    def _check_base(self, base_layer: nn.Module) -> None:
        if not base_layer.weight.is_floating_point():
            raise TypeError(f"lora_ext: LoraConv1D needs a floating-point weight, got {base_layer.weight.dtype}")
        if tuple(base_layer.weight.shape) != (base_layer.nx, base_layer.nf):
            raise ValueError(
                f"lora_ext: Conv1D weight has shape {list(base_layer.weight.shape)}, expected [nx, nf] = "
                f"[{base_layer.nx}, {base_layer.nf}]"
            )

    def _fused_forward(self, x: Tensor, adapters: list[tuple[Tensor, Tensor, float, float]]) -> Tensor:
        return lora_linear_multi(x, self.base_layer.weight.t(), self.base_layer.bias, adapters)

    def delta_factors(self, name: str) -> tuple[Tensor, Tensor]:
        # weight [in, out] += s · (B A)ᵀ = s · Aᵀ Bᵀ: the merge op's A' = Bᵀ [r, out], B' = Aᵀ [in, r]
        return self.lora_B[name].weight.t().contiguous(), self.lora_A[name].weight.t().contiguous()


def check_conv_rank(groups: int, r: object) -> None:
    """PEFT's rule for convolutions: the rank must be a multiple of ``groups`` (ValueError otherwise)."""
    if isinstance(r, int) and not isinstance(r, bool) and r > 0 and r % groups != 0:
        raise ValueError(
            f"lora_ext: rank r={r} must be a multiple of the convolution's groups={groups} "
            "(lora_B is a grouped 1x1 convolution, as in PEFT)"
        )


class LoraConvNd(LoraLayer):
    """LoRA around an ``nn.Conv1d/2d/3d``: ``y = base(x) + Σ s · B(A(dropout(x)))`` (PEFT's two convolutions).

    ``A`` is a convolution from ``in_channels`` to ``r`` channels with the base's
    kernel size, stride, padding, dilation and padding mode; ``B`` a 1×1
    convolution from ``r`` to ``out_channels`` with the base's ``groups`` (so r
    must be a multiple of groups). The sum runs in the adapters' dtype and is
    rounded to the base output's dtype once. Merging computes
    ``W += s · B A`` on the ``[out, in·k]`` matrix view of the weight (the
    merge op, fp32 accumulation); it is refused for grouped convolutions
    (``groups > 1``), whose LoRA update is not a grouped weight.
    """

    adapter_layer_names = ("lora_A", "lora_B")
    factor_keys = ("lora_A.weight", "lora_B.weight")
    feature_attrs = ("in_channels", "out_channels")
    conv_class: type[nn.Module] = nn.Conv2d
    base_type = nn.Conv2d
    base_name = "an nn.Conv2d"

    def _check_base(self, base_layer: nn.Module) -> None:
        if not base_layer.weight.is_floating_point():
            raise TypeError(
                f"lora_ext: {type(self).__name__} needs a floating-point weight, got {base_layer.weight.dtype}"
            )
        if base_layer.groups > 1:
            warnings.warn(
                f"lora_ext: LoRA on a {type(base_layer).__name__} with groups={base_layer.groups}: merging is not "
                "supported (as in PEFT)",
                UserWarning,
                stacklevel=4,
            )

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def add_adapter(self, name: str, r: int, lora_alpha: float, **kwargs: Any) -> None:
        check_conv_rank(self.base_layer.groups, r)
        super().add_adapter(name, r, lora_alpha, **kwargs)

    def _adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.lora_A[name].parameters()
        yield from self.lora_B[name].parameters()

    def _factor_convs(self, r: int, device=None, dtype=None) -> tuple[nn.Module, nn.Module]:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        a = self.conv_class(
            self.in_features, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode, device=device, dtype=dtype,
        )  # fmt: skip
        b = self.conv_class(
            r, self.out_features, ones, ones, groups=base.groups, bias=False, device=device, dtype=dtype
        )
        return a, b

    def _create_factors(self, name, r, init, device, dtype, weights) -> None:
        if weights is not None:
            a, b = self._factor_convs(r, device="meta")
            for conv, key in ((a, "lora_A.weight"), (b, "lora_B.weight")):
                conv.weight = nn.Parameter(torch.empty(conv.weight.shape, device=device, dtype=dtype))
                _copy_checked(conv.weight, weights[key], key)
        else:
            # PEFT's construction and RNG order: both convs (default init), then A re-initialised, B zero.
            a, b = self._factor_convs(r)
            if init is True:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)
            elif isinstance(init, str) and init.lower() == "gaussian":
                nn.init.normal_(a.weight, std=1 / r)
                nn.init.zeros_(b.weight)
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        self.lora_A[name] = a
        self.lora_B[name] = b

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        return dict(zip(self.factor_keys, (self.lora_A[name].weight, self.lora_B[name].weight)))

    # ---- merging on the [out, in·k] matrix view of the weight

    def check_mergeable(self, name: str | None = None) -> None:
        groups = self.base_layer.groups
        if groups > 1:
            raise ValueError(
                f"lora_ext: cannot merge LoRA into a {type(self.base_layer).__name__} with groups={groups}: "
                "the update B A is not a grouped weight (PEFT refuses it too)"
            )

    def delta_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A [r, in·k], B [out, r])`` with ``weight.view(out, -1) += s · B A``."""
        self.check_mergeable()
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def _unmerged_weight(self) -> Tensor:
        w = self.base_layer.weight.detach()
        return w.reshape(w.shape[0], -1)

    def merged_weight(self, names: list[str] | None = None) -> Tensor:
        return super().merged_weight(names).reshape(self.base_layer.weight.shape)

    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        self.check_mergeable()
        weight = self.base_layer.weight
        with torch.no_grad():
            if safe_merge or not weight.is_contiguous():  # e.g. channels_last: no matrix view in place
                new = self.merged_weight(names)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
                weight.copy_(new)
                return
            matrix = weight.view(weight.shape[0], -1)
            for name in names:
                _merge_into(matrix, *self.delta_factors(name), self.scaling[name])

    def _unmerge_all(self) -> None:
        weight = self.base_layer.weight
        with torch.no_grad():
            matrix = weight.view(weight.shape[0], -1) if weight.is_contiguous() else weight.reshape(weight.shape[0], -1)
            for name in reversed(self.merged_adapters):
                _merge_into(matrix, *self.delta_factors(name), -self.scaling[name])
            if not weight.is_contiguous():
                weight.copy_(matrix.reshape(weight.shape))

    # ---- forward

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged_adapters:
            return result
        active = [a for a in self._active_adapters if a in self.r]
        if not active:
            return result
        out_dtype = result.dtype
        for n in active:
            lora_A, lora_B = self.lora_A[n], self.lora_B[n]
            xc = x.to(lora_A.weight.dtype)  # PEFT casts the input to the adapter's dtype
            p = self.lora_dropout_p[n]
            xd = F.dropout(xc, p, training=True) if self.training and p > 0 else xc
            result = result + lora_B(lora_A(xd)) * self.scaling[n]
        return result.to(out_dtype)


class LoraConv1d(LoraConvNd):
    """LoRA around an ``nn.Conv1d`` (see :class:`LoraConvNd`)."""

    conv_class = nn.Conv1d
    base_type = nn.Conv1d
    base_name = "an nn.Conv1d"


class LoraConv2d(LoraConvNd):
    """LoRA around an ``nn.Conv2d`` (see :class:`LoraConvNd`)."""

    conv_class = nn.Conv2d
    base_type = nn.Conv2d
    base_name = "an nn.Conv2d"


class LoraConv3d(LoraConvNd):
    """LoRA around an ``nn.Conv3d`` (see :class:`LoraConvNd`)."""

    conv_class = nn.Conv3d
    base_type = nn.Conv3d
    base_name = "an nn.Conv3d"


def resolve_fan_in_fan_out(flag: bool, bases: list[nn.Module]) -> bool:
    """PEFT's ``fan_in_fan_out`` after injecting into ``bases`` (in module order).

    PEFT sets the flag per layer type, warning each time it flips it: True for a
    ``Conv1D`` (weight ``[in, out]``), False for an ``nn.Linear``; other layers
    ignore it. The config keeps the last value, which is what PEFT saves.
    """
    for base in bases:
        if isinstance(base, nn.Linear) and flag:
            warnings.warn(
                "lora_ext: fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                "Setting fan_in_fan_out to False.",
                UserWarning,
                stacklevel=4,
            )
            flag = False
        elif isinstance(base, Conv1D) and not flag:
            warnings.warn(
                "lora_ext: fan_in_fan_out is set to False but the target module is `Conv1D`. "
                "Setting fan_in_fan_out to True.",
                UserWarning,
                stacklevel=4,
            )
            flag = True
    return flag
