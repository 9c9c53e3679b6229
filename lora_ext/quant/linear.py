"""QLoRA base layers: LinearNF4 (a frozen NF4 linear in bitsandbytes' checkpoint
format, lora_ext/quant/bnb_format.py), quantize_model and memory_report.

LoRA over a LinearNF4 is :class:`lora_ext.nn.LoraLinearNF4`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import targets
from ..ops.functional import lora_linear_nf4
from .bnb_format import QS_ALL_KEYS, nf4_weight_from_state_dict, quant_state_entries
from .nf4 import SUPPORTED_BLOCKSIZES, NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["LinearNF4", "memory_report", "quantize_model"]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class LinearNF4(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (bitsandbytes' ``Linear4bit`` format).

    ``y = x Wᵀ + bias`` with ``W = dequantize_nf4(weight, compute dtype)`` built
    per call and dropped (no full-precision copy is kept).

    Attributes:
        in_features, out_features: K and N.
        weight: the packed codes, a frozen uint8 ``nn.Parameter [(N*K+1)//2, 1]``
            (what bitsandbytes' ``Params4bit`` holds; ``.nf4`` has the full state).
        bias: ``[N]`` parameter or None, in the original dtype.
        compute_dtype: dtype of the matmul (None: x's dtype).
        quant_dtype: dtype of the weight before quantization (the checkpoint's ``dtype``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"lora_ext: NF4 blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        # An all-zero weight of the right format; from_linear/load_state_dict fill it.
        zero = torch.zeros(self.out_features, self.in_features, dtype=quant_dtype, device=device)
        self._set_nf4(quantize_nf4(zero, blocksize, double_quant))
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features, dtype=quant_dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    # ---- construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearNF4:
        """Quantize an ``nn.Linear`` (its weight is read, not modified)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"lora_ext: LinearNF4.from_linear expects an nn.Linear, got {type(linear).__name__}")
        qw = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        return cls.from_nf4(qw, linear.bias, compute_dtype)

    @classmethod
    def from_nf4(cls, qw: NF4Weight, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None):
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = (int(s) for s in qw.shape)
        self.compute_dtype = compute_dtype
        self._set_nf4(qw)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return self

    def _set_nf4(self, qw: NF4Weight) -> None:
        self.weight = nn.Parameter(qw.packed, requires_grad=False)
        # Non-persistent buffers: moved by .to()/.cuda(), saved under
        # bitsandbytes' key names by _save_to_state_dict instead.
        self.register_buffer("absmax", qw.absmax, persistent=False)
        self.register_buffer("nested_absmax", qw.nested_absmax, persistent=False)
        self.register_buffer("nested_quant_map", qw.nested_code, persistent=False)
        self.register_buffer("offset", qw.offset, persistent=False)
        self.blocksize = qw.blocksize
        self.nested_blocksize = qw.nested_blocksize
        self.quant_dtype = qw.dtype
        self._offset_float = qw.offset_float

    @property
    def nf4(self) -> NF4Weight:
        """The quantized weight (views of this module's tensors)."""
        return NF4Weight(
            self.weight.data, self.absmax, self.blocksize, torch.Size((self.out_features, self.in_features)),
            self.quant_dtype, self.nested_absmax, self.nested_quant_map, self.offset, self.nested_blocksize,
            self._offset_float,
        )  # fmt: skip

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight ``[N, K]`` in ``dtype`` (default: compute_dtype, else the original dtype)."""
        return dequantize_nf4(self.nf4, dtype or self.compute_dtype or self.quant_dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype or x.dtype
        xc, bias = x.to(dtype), _cast(self.bias, dtype)
        if not (torch.is_grad_enabled() and (xc.requires_grad or (bias is not None and bias.requires_grad))):
            return F.linear(xc, dequantize_nf4(self.nf4, dtype), bias).to(x.dtype)
        # Training: F.linear would save the dequantized W for grad_x until backward. The fused
        # op (with an all-zero rank-1 adapter) saves only x and the 4-bit storage instead.
        zero_a = xc.new_zeros(1, self.in_features)
        zero_b = xc.new_zeros(self.out_features, 1)
        return lora_linear_nf4(xc, self.nf4, zero_a, zero_b, 0.0, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    # ---- checkpoint format (transformers / bitsandbytes 4-bit keys)

    def quant_state_dict(self) -> dict[str, Tensor]:
        """The ``weight.*`` entries (without prefix) of bitsandbytes' packed quant_state, in its order."""
        return quant_state_entries(self.nf4)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed codes) and bias
        for k, v in self.quant_state_dict().items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        wkey = prefix + "weight"
        known = {wkey} | {f"{wkey}.{k}" for k in QS_ALL_KEYS}
        qw = None
        if wkey in state_dict:
            try:
                qw = nf4_weight_from_state_dict(state_dict, wkey, device=self.weight.device)
                if tuple(qw.shape) != (self.out_features, self.in_features):
                    raise ValueError(
                        f"lora_ext: {wkey} holds a {list(qw.shape)} weight but this layer is "
                        f"[out_features, in_features] = [{self.out_features}, {self.in_features}]"
                    )
            except (ValueError, TypeError) as exc:
                error_msgs.append(str(exc))  # nothing of this module is modified
                return
        elif strict:
            missing_keys.append(wkey)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(wkey + ".") and k not in known)
        rest = {k: v for k, v in state_dict.items() if k not in known and not k.startswith(wkey + ".")}
        n_err = len(error_msgs)
        missing: list[str] = []
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected_keys, error_msgs)
        missing_keys.extend(k for k in missing if k != wkey)
        if qw is not None and len(error_msgs) == n_err:
            self._set_nf4(qw)


# ------------------------------------------------------------------ quantize_model


def quantize_model(
    model: nn.Module,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a :class:`LinearNF4`, in place; returns ``model``.

    Args:
        blocksize, double_quant: NF4 format (see :func:`lora_ext.quantize_nf4`).
        compute_dtype: matmul dtype of the quantized layers (None: the input's dtype).
        skip_modules: names; a module whose full name equals one of them or ends
            with ``"." + name`` (and everything under it) stays in full precision
            (the suffix rule of ``target_modules``, lora_ext/targets.py).

    The model's tied weights are not shared with the quantized copies; a layer
    whose weight is shared with a non-Linear module (e.g. a tied ``lm_head``)
    should be listed in ``skip_modules``.
    """
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: NF4 blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    skip = tuple(skip_modules)
    chosen = [
        (name, m) for name, m in model.named_modules() if type(m) is nn.Linear and not targets.within_any(name, skip)
    ]
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = LinearNF4.from_linear(linear, blocksize, double_quant, compute_dtype)
        setattr(parent, child, q)
    return model


# ------------------------------------------------------------------ memory


def memory_report(model: nn.Module) -> dict[str, float]:
    """Bytes and bits per parameter of a (quantized, LoRA-adapted) model.

    Returns:
        dict with ``quantized_params`` (weights stored in NF4), ``quantized_bytes``
        (packed codes + block scales + double-quantization state),
        ``quantized_bits_per_param``, ``lora_params``/``lora_bytes`` (adapter
        factors), ``other_params``/``other_bytes`` (everything else: embeddings,
        norms, biases, unquantized layers), ``total_bytes`` and
        ``bits_per_param`` (total bytes·8 / all parameters, counting each NF4
        weight element as one parameter), ``merge_record_bytes`` (exact-merge records,
        included in ``total_bytes``) and ``merge_record_fraction`` (those bytes over the
        bytes of the weights merged exactly).
    """
    q_params = q_bytes = lora_params = lora_bytes = other_params = other_bytes = 0
    seen: set[int] = set()
    nf4_tensors: set[int] = set()
    for m in model.modules():
        if isinstance(m, LinearNF4):
            qw = m.nf4
            q_params += qw.numel()
            q_bytes += qw.nbytes()
            nf4_tensors.update(id(t) for t in (m.weight, m.absmax, m.nested_absmax, m.offset) if t is not None)
            if m.nested_quant_map is not None:  # the 8-bit code table: 1 KiB stored per layer
                nf4_tensors.add(id(m.nested_quant_map))
                q_bytes += m.nested_quant_map.numel() * m.nested_quant_map.element_size()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or id(t) in nf4_tensors:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        if ".lora_" in f".{name}" or name.startswith("lora_"):
            lora_params += t.numel()
            lora_bytes += nbytes
        else:
            other_params += t.numel()
            other_bytes += nbytes
    # exact-merge records (lora_ext/nn/exact_merge.py): held only while merged exactly, freed on unmerge
    record_bytes = sum(m.merge_record_bytes() for m in model.modules() if hasattr(m, "merge_record_bytes"))
    recorded_weight_bytes = sum(
        m.base_layer.weight.numel() * m.base_layer.weight.element_size()
        for m in model.modules()
        if getattr(m, "_merge_records", None)
    )
    total_params = q_params + lora_params + other_params
    total_bytes = q_bytes + lora_bytes + other_bytes + record_bytes
    return {
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "quantized_bits_per_param": 8.0 * q_bytes / q_params if q_params else 0.0,
        "lora_params": lora_params,
        "lora_bytes": lora_bytes,
        "other_params": other_params,
        "other_bytes": other_bytes,
        "merge_record_bytes": record_bytes,
        "merge_record_fraction": record_bytes / recorded_weight_bytes if recorded_weight_bytes else 0.0,
        "total_bytes": total_bytes,
        "bits_per_param": 8.0 * total_bytes / total_params if total_params else 0.0,
    }
