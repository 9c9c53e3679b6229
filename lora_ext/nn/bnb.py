"""LoRA around bitsandbytes' 4-bit ``Linear4bit`` (what ``BitsAndBytesConfig(load_in_4bit=True)`` gives).

bitsandbytes is imported lazily: lora_ext imports without it, and a module can
only be a ``Linear4bit`` once bitsandbytes has been imported, so the table row
(lora_ext/nn/dispatch.py) asks :func:`is_bnb_linear4bit`, which never imports it.

Compute paths, on bitsandbytes' own storage (nothing is copied or re-packed):

- ``quant_type="nf4"``: the fused NF4 op (:func:`lora_ext.lora_linear_nf4`)
  reads the ``Params4bit`` codes and its ``quant_state`` (absmax, and with double
  quantization the nested absmax, code and offset) in place;
- ``quant_type="fp4"``: the weight is dequantized (``code[q] · absmax`` with
  bitsandbytes' FP4 code table from the quant_state, in fp32, rounded to the
  quant_state dtype as bitsandbytes does; on CUDA bitsandbytes' own
  ``dequantize_4bit``), then the dense fused op runs. The dequantized weight is a
  temporary of the compute dtype that autograd keeps until backward.

The compute dtype is bitsandbytes': the layer's ``compute_dtype``, set from the
first input when it is None (``Linear4bit.set_compute_type``); x is cast to it and
the output comes back in x's dtype.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.checks import SUPPORTED_BLOCKSIZES
from ..ops.reference import resolve_absmax
from ..quant.nf4 import NF4Weight, dequantize_nf4, nf4_code
from .layers import LoraLinear, add_lora_unfused, base_layer_is_hooked, lora_linear_multi

__all__ = ["LoraLinear4bit", "check_linear4bit", "dequantize_4bit_storage", "is_bnb_linear4bit"]


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """``module`` is a ``bitsandbytes.nn.Linear4bit`` (False when bitsandbytes was never imported)."""
    bnb = sys.modules.get("bitsandbytes")
    linear4bit = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return linear4bit is not None and isinstance(module, linear4bit)


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _packed_codes(weight: Tensor) -> Tensor:
    """The ``Params4bit`` bytes as uint8 ``[n, 1]``: a view (another ``quant_storage`` dtype is reinterpreted)."""
    data = weight.data
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    return data.reshape(-1, 1)


def dequantize_4bit_storage(weight: Tensor, dtype: torch.dtype, offset: float | None = None) -> Tensor:
    """The ``[N, K]`` weight of a quantized ``Params4bit`` in ``dtype``, as bitsandbytes computes it.

    ``code[q] · absmax`` in fp32 (absmax resolved from the double quantization
    first), rounded to the quant_state dtype, then cast to ``dtype``. On CPU this
    is computed here in PyTorch (bitsandbytes' native AVX-512 CPU kernel is wrong for
    some shapes); elsewhere bitsandbytes' ``dequantize_4bit`` runs. ``offset``: ``float(quant_state.offset)``
    when the caller has it (reading it is a device sync, and a recompile under torch.compile).
    """
    qs = weight.quant_state
    if weight.device.type != "cpu":
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, qs).to(dtype)
    n = int(qs.shape[0]) * int(qs.shape[1])
    b = _packed_codes(weight).reshape(-1)
    q = torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)[:n].long()
    if qs.nested:
        s2 = qs.state2
        absmax = resolve_absmax(
            qs.absmax, s2.absmax, s2.code, float(qs.offset) if offset is None else offset, s2.blocksize
        )
    else:
        absmax = qs.absmax.float()
    blocks = absmax.numel()
    vals = qs.code.float()[q]
    vals = F.pad(vals, (0, blocks * qs.blocksize - n)).view(blocks, qs.blocksize) * absmax.view(-1, 1)
    return vals.reshape(-1)[:n].view(tuple(qs.shape)).to(qs.dtype).to(dtype)


def check_linear4bit(base_layer: nn.Module) -> None:
    """Raise TypeError/ValueError unless ``base_layer`` is a quantized Linear4bit lora_ext can read."""
    if not is_bnb_linear4bit(base_layer):
        raise TypeError(f"lora_ext: LoraLinear4bit wraps a bitsandbytes Linear4bit, got {type(base_layer).__name__}")
    qs = getattr(base_layer.weight, "quant_state", None)
    if qs is None:
        raise ValueError(
            "lora_ext: this Linear4bit is not quantized yet (its weight has no quant_state); bitsandbytes "
            "quantizes when the layer is moved to a device, e.g. layer.to('cpu') or layer.cuda()"
        )
    if qs.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"lora_ext: Linear4bit quant_type must be 'nf4' or 'fp4', got {qs.quant_type!r}")
    if qs.blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: Linear4bit blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {qs.blocksize}")
    if qs.quant_type == "nf4" and not torch.equal(qs.code.detach().float().cpu(), nf4_code()):
        raise ValueError("lora_ext: this Linear4bit's quant_state.code is not the NF4 code table")
    if tuple(qs.shape) != (base_layer.out_features, base_layer.in_features):
        raise ValueError(
            f"lora_ext: the Linear4bit quant_state shape {list(qs.shape)} is not [out_features, in_features] = "
            f"[{base_layer.out_features}, {base_layer.in_features}]"
        )


class LoraLinear4bit(LoraLinear):
    """LoRA around a ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, with or without double quantization).

    Same adapter layout, state-dict keys and adapter API as PEFT's
    ``peft.tuners.lora.bnb.Linear4bit``: ``base_layer`` is the bitsandbytes layer
    itself (its ``Params4bit`` and quant_state are used in place), adapter factors
    are fp32 by default (as PEFT). See the module docstring for the compute paths.

    Merging cannot add into 4-bit losslessly. Unlike PEFT (which re-quantizes the
    merged weight to 4 bits, a second rounding error), ``merge()`` swaps
    ``base_layer`` for an ``nn.Linear`` holding ``dequantize(W) + s·BA`` in the
    layer's original dtype (the quant_state dtype: the dtype the weight had before
    quantization, i.e. the dtype of the rest of the model), so ``merge_and_unload``
    returns plain ``nn.Linear`` layers that run in the model's dtype;
    ``unmerge()`` puts the untouched 4-bit layer back. :meth:`requantize_merged`
    gives PEFT's re-quantized ``Linear4bit`` on request.
    """

    base_type = nn.Linear  # Linear4bit subclasses nn.Linear; _check_base asks for the bitsandbytes class
    base_name = "a bitsandbytes Linear4bit"

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        self._bnb_layer: nn.Module | None = None  # the 4-bit layer while merged
        self._offset_cache: tuple[Tensor, float] | None = None
        super().__init__(base_layer, *args, **kwargs)

    def _check_base(self, base_layer: nn.Module) -> None:
        check_linear4bit(base_layer)

    # ---- storage views

    @property
    def _quantized(self) -> nn.Module:
        return self._bnb_layer if self._bnb_layer is not None else self.base_layer

    @property
    def quant_type(self) -> str:
        return self._quantized.weight.quant_state.quant_type

    @property
    def quant_dtype(self) -> torch.dtype:
        """dtype of the weight before quantization (bitsandbytes' quant_state dtype)."""
        return self._quantized.weight.quant_state.dtype

    def _repacked(self) -> bool:
        # bitsandbytes' CPU inference path (eval, no grad, AVX512-BF16) may have rewritten the
        # weight into its own tile layout before this layer was wrapped.
        return bool(getattr(self._quantized.weight.quant_state, "packing_format_for_cpu", False))

    def _offset_float(self) -> float | None:
        """``float(quant_state.offset)`` (double quantization), read once per quant_state."""
        qs = self._quantized.weight.quant_state
        if not qs.nested:
            return None
        if self._offset_cache is None or self._offset_cache[0] is not qs.offset:
            self._offset_cache = (qs.offset, float(qs.offset))  # one device sync per quant_state
        return self._offset_cache[1]

    def nf4_weight(self) -> NF4Weight:
        """The NF4 weight as an :class:`~lora_ext.NF4Weight` over bitsandbytes' own tensors (no copy)."""
        weight = self._quantized.weight
        qs = weight.quant_state
        nested_absmax = nested_code = offset = None
        nested_blocksize = 256
        offset_float = None
        if qs.nested:
            nested_absmax, nested_code, nested_blocksize = qs.state2.absmax, qs.state2.code, qs.state2.blocksize
            offset = qs.offset.reshape(())
            offset_float = self._offset_float()
        return NF4Weight(
            _packed_codes(weight), qs.absmax, qs.blocksize, torch.Size(qs.shape), qs.dtype,
            nested_absmax, nested_code, offset, nested_blocksize, offset_float,
        )  # fmt: skip

    def check_mergeable(self, name: str | None = None) -> None:
        """Raise ValueError if the 4-bit weight cannot be read for a merge (merge_adapter asks every layer first)."""
        if self._repacked():
            where = "this layer" if name is None else repr(name)
            raise ValueError(
                f"lora_ext: cannot merge into {where}: its Linear4bit weight was repacked by bitsandbytes' CPU "
                "inference path (quant_state.packing_format_for_cpu, after running the layer in eval mode without "
                "gradients); lora_ext reads only bitsandbytes' standard layout. Reload the 4-bit model; nothing was "
                "merged"
            )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The 4-bit base weight ``[N, K]`` in ``dtype`` (default: the quant_state dtype)."""
        dtype = dtype or self.quant_dtype
        self.check_mergeable()
        if self.quant_type == "nf4":
            # bitsandbytes rounds the dequantized weight to the quant_state dtype before casting it
            return dequantize_nf4(self.nf4_weight(), self.quant_dtype).to(dtype)
        return dequantize_4bit_storage(self._quantized.weight, dtype, self._offset_float())

    # ---- adapters

    def _factor_dtype(self, requested: torch.dtype | None) -> torch.dtype:
        # The base "weight" holds packed codes: a dtype derived from it means PEFT's default, fp32.
        if requested is not None and requested.is_floating_point:
            return requested
        return torch.float32

    def add_adapter(self, name: str, r: int, lora_alpha: float, **kwargs: Any) -> None:
        if self._bnb_layer is not None:
            raise RuntimeError("lora_ext: unmerge before adding an adapter to a merged 4-bit layer")
        super().add_adapter(name, r, lora_alpha, **kwargs)

    # ---- forward

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        base = self.base_layer
        if not base.compute_type_is_set:  # bitsandbytes' own rule, applied as its forward would
            base.set_compute_type(x)
            base.compute_type_is_set = True
        return base.compute_dtype or x.dtype

    def _bias(self, x: Tensor, dtype: torch.dtype) -> Tensor | None:
        # bitsandbytes rounds the bias to x's dtype, then to the compute dtype (without rewriting it here)
        return _cast(_cast(self.base_layer.bias, x.dtype), dtype)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.merged_adapters or args or kwargs:
            return self.base_layer(x, *args, **kwargs)
        active = [] if self._disable_adapters else [a for a in self._active_adapters if a in self.r]
        adapters = [
            (
                self.lora_A[n].weight,
                self.lora_B[n].weight,
                self.scaling[n],
                self.lora_dropout_p[n] if self.training else 0.0,
            )
            for n in active
        ]
        if self._repacked() or base_layer_is_hooked(self.base_layer):
            # bitsandbytes' own forward: it runs the hooks, and it reads its CPU tile layout
            return add_lora_unfused(self.base_layer(x), x, adapters)
        if not adapters:
            # the base alone (disabled / no active adapter): a zero rank-1 adapter keeps the
            # fused path, which saves no dequantized weight for backward
            zero_a = x.new_zeros(1, self.in_features, dtype=torch.float32)
            zero_b = x.new_zeros(self.out_features, 1, dtype=torch.float32)
            adapters = [(zero_a, zero_b, 0.0, 0.0)]
        return self._fused_forward(x, adapters)

    def _fused_forward(self, x: Tensor, adapters: list[tuple[Tensor, Tensor, float, float]]) -> Tensor:
        dtype = self._compute_dtype(x)
        amp = ops.autocast_dtype_for(x)
        bias = self._bias(x, amp or dtype)
        if self.quant_type == "nf4":
            weight: Tensor | NF4Weight = self.nf4_weight()
        else:
            weight = dequantize_4bit_storage(self.base_layer.weight, amp or dtype, self._offset_float())
        y = lora_linear_multi(x, weight, bias, adapters, compute_dtype=dtype)
        return y if amp is not None else y.to(x.dtype)

    # ---- merging

    def _unmerged_weight(self) -> Tensor:
        return self.dequantize(self.quant_dtype)

    def _merge_names(self, names: list[str], safe_merge: bool) -> None:
        with torch.no_grad():
            w = self.merged_weight(self.merged_adapters + names)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
        q = self._quantized
        merged = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        merged.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:  # the same bias parameter (a trained bias stays one tensor) unless its dtype differs
            merged.bias = q.bias if q.bias.dtype == w.dtype else nn.Parameter(q.bias.detach().to(w.dtype), False)
        self._bnb_layer = q
        self.base_layer = merged

    def _unmerge_all(self) -> None:
        if self._bnb_layer is not None:
            self.base_layer = self._bnb_layer
            self._bnb_layer = None

    def requantize_merged(self) -> nn.Module:
        """PEFT's merge result: a new ``Linear4bit`` (same quant type, blocksize, double quant, compute dtype)
        holding the merged weight re-quantized by bitsandbytes. Lossy (warns): the adapter's contribution
        is partly lost in the second 4-bit rounding."""
        import warnings

        import bitsandbytes as bnb

        if self._bnb_layer is None:
            raise RuntimeError("lora_ext: requantize_merged needs a merged layer (call merge() first)")
        warnings.warn(
            "lora_ext: requantizing a merged weight to 4 bits adds a second rounding error; the adapter's "
            "contribution is partly lost. Keep the adapter separate to stay exact.",
            UserWarning,
            stacklevel=2,
        )
        src, dense = self._bnb_layer, self.base_layer
        qs = src.weight.quant_state
        new = bnb.nn.Linear4bit(
            src.in_features, src.out_features, bias=src.bias is not None, compute_dtype=src.compute_dtype,
            compress_statistics=qs.nested, quant_type=qs.quant_type, quant_storage=src.weight.data.dtype,
            device="meta",
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(
            dense.weight.detach().to("cpu"), requires_grad=False, blocksize=qs.blocksize,
            compress_statistics=qs.nested, quant_type=qs.quant_type, quant_storage=src.weight.data.dtype,
        ).to(src.weight.device)  # fmt: skip
        if src.bias is not None:
            new.bias = nn.Parameter(src.bias.detach().clone(), requires_grad=False)
        return new
