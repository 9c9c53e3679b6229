"""bitsandbytes' 4-bit checkpoint format (what transformers writes for ``load_in_4bit``).

Entries of a 4-bit linear at ``prefix`` (keys and contents are bitsandbytes',
so either side loads the other's files):

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

import json
import math
from typing import Any

import torch
from torch import Tensor

from .nf4 import SUPPORTED_BLOCKSIZES, NF4Weight, nf4_code

QS_KEY = "quant_state.bitsandbytes__nf4"
#: The ``weight.*`` entries of the format, after ``prefix.weight.``.
QS_ALL_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QS_KEY)
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


def quant_state_entries(qw: NF4Weight) -> dict[str, Tensor]:
    """The ``weight.*`` entries (without prefix) of bitsandbytes' packed quant_state for ``qw``, in its order."""
    state = {"absmax": qw.absmax, "quant_map": nf4_code(qw.device)}
    meta: dict[str, Any] = {
        "quant_type": "nf4",
        "blocksize": qw.blocksize,
        "dtype": _DTYPE_NAMES[qw.dtype],
        "shape": [int(s) for s in qw.shape],
    }
    if qw.double_quant:
        state["nested_absmax"] = qw.nested_absmax
        state["nested_quant_map"] = qw.nested_code.clone()
        meta.update(
            {"nested_blocksize": qw.nested_blocksize, "nested_dtype": "float32", "nested_offset": qw.offset_float}
        )
    state[QS_KEY] = _pack_json(meta).to(qw.device)
    return state


def nf4_weight_from_state_dict(state_dict: dict, wkey: str, device=None) -> NF4Weight:
    """Build and validate an :class:`NF4Weight` from bitsandbytes-format entries ``wkey``, ``wkey.absmax``, ...

    Raises ValueError/TypeError naming the key when the JSON quant_state and the
    tensors disagree (quant type, dtype, shape, blocksize, lengths, code tables),
    and ValueError for the bfloat16 transposed scales a bitsandbytes ``Linear4bit``
    leaves in its ``state_dict()`` after CPU inference repacking (plain NF4 only:
    with double quantization bitsandbytes re-quantizes the scales on the way back,
    a valid state that loads and equals what that layer then computes with).
    """
    qs_key = f"{wkey}.{QS_KEY}"
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
    if not nested and absmax.dtype == torch.bfloat16:
        raise ValueError(
            f"lora_ext: {wkey}.absmax is bfloat16 {list(absmax.shape)}: this is bitsandbytes' CPU inference layout, "
            "not its checkpoint format. bitsandbytes (0.50) rewrites a Linear4bit's weight when it runs in eval mode "
            "without gradients on an AVX512-BF16 CPU, rounding the block scales to bfloat16 and transposing them, "
            "and its state_dict() does not restore them; the original scales are lost. Convert from the saved "
            "checkpoint, or from a model that has not run inference that way (call model.train() or set "
            "support_avx512bf16_for_cpu = False on its Linear4bit layers before such forwards)"
        )
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
