"""QLoRA modules: LinearNF4 (a frozen NF4 linear with bitsandbytes' checkpoint
format), quantize_model, LoraLinearNF4 (LoRA over it) and memory_report.

Checkpoint format of a LinearNF4 at ``prefix`` (transformers' bitsandbytes
4-bit keys and contents, so either side loads the other's files):

    prefix.weight                                  uint8 [(N*K+1)//2, 1]  packed codes
    prefix.bias                                    [N] (if any)
    prefix.weight.absmax                           fp32 [nblocks] | uint8 [nblocks] (double quant)
    prefix.weight.quant_map                        fp32 [16] NF4 code
    prefix.weight.nested_absmax                    fp32 [ceil(nblocks/256)]      (double quant)
    prefix.weight.nested_quant_map                 fp32 [256] dynamic map        (double quant)
    prefix.weight.quant_state.bitsandbytes__nf4    uint8 JSON: quant_type, blocksize, dtype, shape
                                                   (+ nested_blocksize, nested_dtype, nested_offset)
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LoraLayer, LoraLinear, _autocast_dtype, _cast
from .nf4 import (
    SUPPORTED_BLOCKSIZES,
    NF4Weight,
    dequantize_nf4,
    lora_linear_nf4,
    nf4_code,
    quantize_nf4,
)

__all__ = ["LinearNF4", "LoraLinearNF4", "memory_report", "quantize_model"]

_QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def _pack_json(d: dict) -> Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: Tensor, key: str) -> dict:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise ValueError(f"lora_ext: {key} must be a 1-D uint8 tensor holding JSON")
    try:
        d = json.loads(bytes(t.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"lora_ext: {key} does not hold valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"lora_ext: {key} must hold a JSON object, got {type(d).__name__}")
    return d


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
        state = {
            "absmax": self.absmax,
            "quant_map": nf4_code(self.weight.device),
        }
        meta: dict[str, Any] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.quant_dtype],
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            state["nested_absmax"] = self.nested_absmax
            state["nested_quant_map"] = self.nested_quant_map.clone()
            meta.update(
                {
                    "nested_blocksize": self.nested_blocksize,
                    "nested_dtype": "float32",
                    "nested_offset": self._offset_float,
                }
            )
        state[_QS_KEY] = _pack_json(meta).to(self.weight.device)
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight (packed codes) and bias
        for k, v in self.quant_state_dict().items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        wkey = prefix + "weight"
        known = {wkey} | {f"{wkey}.{k}" for k in _QS_ALL_KEYS}
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


_QS_ALL_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _QS_KEY)


def nf4_weight_from_state_dict(state_dict: dict, wkey: str, device=None) -> NF4Weight:
    """Build and validate an :class:`NF4Weight` from bitsandbytes-format entries ``wkey``, ``wkey.absmax``, ...

    Raises ValueError/TypeError naming the key when the JSON quant_state and the
    tensors disagree (quant type, dtype, shape, blocksize, lengths, code tables).
    """
    qs_key = f"{wkey}.{_QS_KEY}"
    fp4_key = f"{wkey}.quant_state.bitsandbytes__fp4"
    if fp4_key in state_dict:
        raise ValueError(f"lora_ext: {wkey} is an FP4 checkpoint; only NF4 is supported")
    if qs_key not in state_dict:
        raise ValueError(f"lora_ext: {wkey} has no {qs_key} entry (not a bitsandbytes NF4 checkpoint)")
    meta = _unpack_json(state_dict[qs_key], qs_key)
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"lora_ext: {qs_key} says quant_type={meta.get('quant_type')!r}; only 'nf4' is supported")
    blocksize = meta.get("blocksize")
    if isinstance(blocksize, bool) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: {qs_key} has blocksize {blocksize!r}; expected one of {SUPPORTED_BLOCKSIZES}")
    dtype = _DTYPES_BY_NAME.get(meta.get("dtype"))
    if dtype is None:
        raise ValueError(f"lora_ext: {qs_key} has dtype {meta.get('dtype')!r}; expected one of {list(_DTYPES_BY_NAME)}")
    shape = meta.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"lora_ext: {qs_key} has shape {shape!r}; expected [N, K] with positive ints")

    def get(name: str, required: bool = True) -> Tensor | None:
        key = f"{wkey}.{name}" if name else wkey
        if key not in state_dict:
            if required:
                raise ValueError(f"lora_ext: checkpoint lacks {key}")
            return None
        t = state_dict[key]
        if not isinstance(t, Tensor):
            raise TypeError(f"lora_ext: {key} must be a tensor, got {type(t).__name__}")
        return t.to(device) if device is not None else t

    packed = get("")
    absmax = get("absmax")
    quant_map = get("quant_map")
    if quant_map.dtype != torch.float32 or not torch.equal(quant_map.cpu(), nf4_code()):
        raise ValueError(f"lora_ext: {wkey}.quant_map is not the NF4 code table")
    nested = "nested_offset" in meta or f"{wkey}.nested_absmax" in state_dict
    nested_absmax = nested_code = offset = None
    nested_blocksize = 256
    if nested:
        nested_absmax = get("nested_absmax")
        nested_code = get("nested_quant_map")
        for field in ("nested_offset", "nested_blocksize", "nested_dtype"):
            if field not in meta:
                raise ValueError(f"lora_ext: {qs_key} lacks {field!r} but the checkpoint has nested_absmax")
        if meta["nested_dtype"] != "float32":
            raise ValueError(f"lora_ext: {qs_key} has nested_dtype {meta['nested_dtype']!r}; expected 'float32'")
        nested_blocksize = meta["nested_blocksize"]
        if isinstance(nested_blocksize, bool) or not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            raise ValueError(f"lora_ext: {qs_key} has nested_blocksize {nested_blocksize!r}")
        off = meta["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
            raise ValueError(f"lora_ext: {qs_key} has nested_offset {off!r}; expected a finite number")
        offset = torch.tensor(float(off), dtype=torch.float32, device=packed.device)
    try:
        return NF4Weight(
            packed.reshape(-1, 1) if packed.dim() != 2 else packed, absmax.reshape(-1), blocksize,
            torch.Size(shape), dtype,
            None if nested_absmax is None else nested_absmax.reshape(-1),
            None if nested_code is None else nested_code.reshape(-1), offset, nested_blocksize,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{exc} (checkpoint entries {wkey}.*, quant_state {meta})") from None


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
            with ``"." + name`` (and everything under it) stays in full precision.

    The model's tied weights are not shared with the quantized copies; a layer
    whose weight is shared with a non-Linear module (e.g. a tied ``lm_head``)
    should be listed in ``skip_modules``.
    """
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: NF4 blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    skip = tuple(skip_modules)

    def skipped(name: str) -> bool:
        return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or f".{s}." in f".{name}."
                   for s in skip)  # fmt: skip

    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and not skipped(name)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = LinearNF4.from_linear(linear, blocksize, double_quant, compute_dtype)
        setattr(parent, child, q)
    return model


# ------------------------------------------------------------------ LoRA over NF4


class LoraLinearNF4(LoraLinear):
    """LoRA around a :class:`LinearNF4`: ``y = x Wᵀ + bias + Σ s · dropout(x) Aᵀ Bᵀ`` with W in NF4.

    Same adapter layout, state-dict keys and adapter API as :class:`LoraLinear`
    (``base_layer.weight`` holds bitsandbytes' packed codes, ``base_layer.weight.*``
    its quant state, as PEFT over bitsandbytes). The first active adapter runs
    fused with the dequantization (:func:`lora_ext.lora_linear_nf4`).

    ``merge()`` cannot add into 4-bit losslessly: it swaps ``base_layer`` for an
    ``nn.Linear`` holding the dequantized-and-merged weight in compute dtype
    (so ``merge_and_unload`` returns plain ``nn.Linear`` layers), and
    ``unmerge()`` puts the original NF4 layer back unchanged.
    """

    def __init__(self, base_layer: LinearNF4, adapter_name: str | None = None, r: int = 8,
                 lora_alpha: float = 8, **adapter_kwargs: Any) -> None:  # fmt: skip
        if not isinstance(base_layer, LinearNF4):
            raise TypeError(f"lora_ext: LoraLinearNF4 wraps a LinearNF4, got {type(base_layer).__name__}")
        LoraLayer.__init__(self, base_layer)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._nf4_layer: LinearNF4 | None = None  # the NF4 layer while merged
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, **adapter_kwargs)
            self.set_active((adapter_name,))

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        return self.base_layer.compute_dtype or x.dtype

    def add_adapter(self, name: str, r: int, lora_alpha: float, **kwargs: Any) -> None:
        # The base "weight" holds uint8 codes: a dtype derived from it (or none) means the
        # compute dtype, else the dtype the weight had before quantization.
        dtype = kwargs.get("dtype")
        if dtype is None or not dtype.is_floating_point:
            kwargs["dtype"] = self.base_layer.compute_dtype or self.base_layer.quant_dtype
        if self._nf4_layer is not None:
            raise RuntimeError("lora_ext: unmerge before adding an adapter to a merged NF4 layer")
        super().add_adapter(name, r, lora_alpha, **kwargs)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._disable_adapters or self.merged_adapters or args or kwargs:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._active_adapters if a in self.r]
        if not active:
            return self.base_layer(x)
        amp = _autocast_dtype(x.device.type)
        dtype = amp if amp is not None else self._compute_dtype(x)
        guard = torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext()
        with guard:
            xc = _cast(x, dtype)
            bias = _cast(self.base_layer.bias, dtype)
            n0 = active[0]
            p0 = self.lora_dropout_p[n0] if self.training else 0.0
            y = lora_linear_nf4(
                xc, self.base_layer.nf4, _cast(self.lora_A[n0].weight, dtype), _cast(self.lora_B[n0].weight, dtype),
                self.scaling[n0], bias, p0,
            )  # fmt: skip
            for n in active[1:]:
                p = self.lora_dropout_p[n] if self.training else 0.0
                xd = F.dropout(xc, p, training=True) if p > 0 else xc
                a, b = _cast(self.lora_A[n].weight, dtype), _cast(self.lora_B[n].weight, dtype)
                y = y + F.linear(F.linear(xd, a), b) * self.scaling[n]
        return y.to(x.dtype) if amp is None else y

    def merged_weight(self, names: list[str] | None = None) -> Tensor:
        nf4 = self._nf4_layer or self.base_layer
        dtype = nf4.compute_dtype or nf4.quant_dtype
        w = dequantize_nf4(nf4.nf4, dtype)
        from .layers import _merged

        for name in names if names is not None else self.active_adapters:
            a, b = self.delta_factors(name)
            w = _merged(w, a.detach().to(dtype), b.detach().to(dtype), self.scaling[name])
        return w

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = list(adapter_names if adapter_names is not None else self.active_adapters)
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        with torch.no_grad():
            w = self.merged_weight(self.merged_adapters + names)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
        nf4 = self._nf4_layer or self.base_layer
        merged = nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None, device="meta")
        merged.weight = nn.Parameter(w, requires_grad=False)
        if nf4.bias is not None:
            merged.bias = nn.Parameter(nf4.bias.detach().to(w.dtype), requires_grad=False)
        self._nf4_layer = nf4
        self.base_layer = merged
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if self._nf4_layer is not None:
            self.base_layer = self._nf4_layer
            self._nf4_layer = None
        self.merged_adapters.clear()

    def requantize_merged(self, blocksize: int | None = None, double_quant: bool | None = None) -> LinearNF4:
        """A new LinearNF4 from the merged weight. Lossy: NF4 of W + sBA is not W + sBA (warns)."""
        if self._nf4_layer is None:
            raise RuntimeError("lora_ext: requantize_merged needs a merged layer (call merge() first)")
        warnings.warn(
            "lora_ext: requantizing a merged weight to NF4 adds a second 4-bit rounding error; the adapter's "
            "contribution is partly lost. Keep the adapter separate to stay exact.",
            UserWarning,
            stacklevel=2,
        )
        src = self._nf4_layer
        return LinearNF4.from_linear(
            self.base_layer, blocksize or src.blocksize, src.double_quant if double_quant is None else double_quant,
            src.compute_dtype,
        )  # fmt: skip


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
        weight element as one parameter).
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
    total_params = q_params + lora_params + other_params
    total_bytes = q_bytes + lora_bytes + other_bytes
    return {
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "quantized_bits_per_param": 8.0 * q_bytes / q_params if q_params else 0.0,
        "lora_params": lora_params,
        "lora_bytes": lora_bytes,
        "other_params": other_params,
        "other_bytes": other_bytes,
        "total_bytes": total_bytes,
        "bits_per_param": 8.0 * total_bytes / total_params if total_params else 0.0,
    }
