"""NF4 (4-bit NormalFloat) frozen weights, bit-compatible with bitsandbytes, and
the LoRA linear over them (QLoRA).

Format (bitsandbytes' ``quantize_4bit(w, blocksize, quant_type="nf4")``):
the weight is flattened row-major and cut into blocks of ``blocksize``
elements (the last block may be shorter); each block is scaled by its absolute
maximum and every element is rounded to the nearest of the 16 NF4 code values
(:data:`NF4_CODE`). Two codes share a byte, the first element in the high
nibble; an odd element count pads one zero code (nibble 7). With double
quantization the fp32 ``absmax`` vector is itself quantized: ``offset =
absmax.mean()`` is subtracted and the result is quantized with the 8-bit
dynamic map (:func:`dynamic_map`) in blocks of 256, giving uint8 ``absmax``
codes, fp32 ``nested_absmax`` and the fp32 scalar ``offset``.

Rounding rules reproduced bit for bit (bitsandbytes 0.50, CPU):

- 4-bit: full blocks use ``w * (1 / max(absmax, 1e-38))``, the tail block
  ``w / max(absmax, 1e-38)`` (a true division); the result is clamped to
  [-1, 1] and bucketized against the 15 fp32 midpoints of the code with
  ``torch.bucketize(right=False)``: a value exactly on a midpoint takes the
  lower code. The stored absmax of a full block is its unclamped max, the
  tail's is clamped to 1e-38 (as bitsandbytes stores them).
- 8-bit (double quantization): bitsandbytes' CPU kernel: block absmax ignoring
  NaN, ``v * (1 / absmax)`` clamped to [-1, 1], then a 65536-entry lookup
  table indexed by ``trunc((v + 1) * 0.5 * 65535 + 0.5)`` whose entries are the
  nearest code by fp32 midpoints; an all-zero block gets code 0 and absmax 0.
- Dequantization: ``code[q] * absmax`` in fp32, rounded once to the output
  dtype; nested absmax = ``dyn[q] * nested_absmax`` then ``+ offset``, both fp32.

NaN/Inf policy: without double quantization the codes and scales equal
bitsandbytes' for any input (a block holding NaN gets absmax NaN and all codes
15; a block holding ±Inf gets absmax Inf, code 7 for finite values and 15 for
the Inf). With double quantization a non-finite block scale would turn the
mean ``offset`` and so every block's scale into NaN (bitsandbytes does so
silently); :func:`quantize_nf4` refuses such a weight with a ValueError.

All-zero block: absmax 0, every code 7 (NF4's 0.0), dequantizes to exact
zeros. This is bitsandbytes' CPU/default path; its CUDA kernel computes
``0 * (1/0) = NaN`` and stores code 0 there instead — same dequantized
zeros, different bytes.

Shapes: x [..., K], weight [N, K] (quantized), lora_A [r, K], lora_B [N, r], bias [N].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from . import (
    _loader,
    _ops,  # noqa: F401  (first: it owns the namespace's DEF library when the extension is absent)
    _reference,
)

NAMESPACE = "lora_ext"

#: The 16 NF4 code values (bitsandbytes ``get_4bit_type("nf4")``), ascending.
NF4_CODE_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: Block sizes bitsandbytes accepts for 4-bit quantization.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Block size of the double quantization of absmax (bitsandbytes' fixed choice).
NESTED_BLOCKSIZE = 256

#: Input dtypes bitsandbytes quantizes.
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LUT_SIZE = 65536


@cache
def _nf4_code_cpu() -> Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32)


def nf4_code(device: torch.device | str = "cpu") -> Tensor:
    """The NF4 code table, fp32 [16], on ``device`` (a fresh tensor)."""
    return _nf4_code_cpu().to(device, copy=True)


@cache
def _dynamic_map_cpu() -> Tensor:
    # bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8),
    # step for step (same torch ops, so the same fp32 values).
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (fp32 [256], ascending): the code of double quantization."""
    return _dynamic_map_cpu().to(device, copy=True)


# ------------------------------------------------------------- pure-PyTorch kernels


def _nf4_bounds(device) -> Tensor:
    code = _nf4_code_cpu().to(device)
    return (code[:-1] + code[1:]) / 2


def nf4_quantize_ref(weight: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)]) of the flattened weight."""
    flat = weight.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    com = flat[:full].reshape(blocks, blocksize)
    absmax = com.abs().amax(dim=-1) if blocks else flat.new_empty(0)
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, _nf4_bounds(flat.device), out_int32=True).to(torch.uint8)
    return (q[::2] << 4) | q[1::2], absmax


def _lut_8bit(code: Tensor) -> Tensor:
    """bitsandbytes' CPU quantization table: LUT index -> nearest code index (uint8 [65536])."""
    code = code.float()
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)
    vals = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids.contiguous(), vals, side="left").to(torch.uint8)


def blockwise_quantize_8bit_ref(x: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(codes uint8 [n], absmax fp32 [ceil(n/blocksize)]): bitsandbytes' CPU ``quantize_blockwise``."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    absmax = torch.nan_to_num(padded.abs(), nan=0.0).amax(dim=1)
    v = torch.clamp(padded * (1.0 / absmax).view(-1, 1), -1.0, 1.0)
    idx = (((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64).clamp_(0, _LUT_SIZE - 1)
    q = _lut_8bit(code)[idx]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n].clone(), absmax


def resolve_absmax_ref(
    absmax: Tensor, nested_absmax: Tensor | None, nested_code: Tensor | None, offset: float, nested_blocksize: int
) -> Tensor:
    """fp32 block scales: ``absmax`` itself, or ``nested_code[absmax] * nested_absmax[i // nb] + offset``."""
    if nested_absmax is None:
        return absmax.float()
    assert nested_code is not None
    n = absmax.numel()
    scales = nested_absmax.float().repeat_interleave(nested_blocksize)[:n]
    vals = nested_code.float()[absmax.reshape(-1).long()] * scales
    return vals + torch.tensor(offset, dtype=torch.float32, device=vals.device)


def nf4_dequantize_ref(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor | None,
    nested_code: Tensor | None,
    offset: float,
    blocksize: int,
    nested_blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """Dequantized weight of ``shape`` in ``dtype``: ``code[q] * absmax`` in fp32, rounded once."""
    _check_nf4_tensors(packed, absmax, nested_absmax, nested_code, blocksize, nested_blocksize, shape)
    n = math.prod(shape)
    scales = resolve_absmax_ref(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n].long()
    vals = _nf4_code_cpu().to(p.device)[q] * scales.repeat_interleave(blocksize)[:n]
    return vals.to(dtype).reshape(shape)


def _nf4_weight_for(x: Tensor, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, n):
    k = x.shape[1]
    return nf4_dequantize_ref(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, [n, k], x.dtype
    )


def lora_linear_nf4_ref(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
    bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
):  # fmt: skip
    """y [M, N] = x Wᵀ + bias + scale·(drop(x) Aᵀ) Bᵀ with W = dequantize_nf4(·, x.dtype), a transient."""
    w = _nf4_weight_for(
        x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features
    )
    return _reference.lora_linear(x, w, bias, lora_A, lora_B, scale, dropout_p, dropout_seed, 1)


def lora_linear_nf4_backward_ref(
    grad_out, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
    lora_A, lora_B, scale, dropout_p, dropout_seed, output_mask,
):  # fmt: skip
    """(grad_x, grad_bias, grad_A, grad_B); unrequested ones are empty [0] tensors."""
    w = _nf4_weight_for(
        x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features
    )
    mask = [bool(output_mask[0]), False, bool(output_mask[1]), bool(output_mask[2]), bool(output_mask[3])]
    gx, _, gbias, ga, gb = _reference.lora_linear_backward(
        grad_out, x, w, lora_A, lora_B, scale, dropout_p, dropout_seed, 1, mask
    )
    return gx, gbias, ga, gb


# ------------------------------------------------------------------ input checks


def _check_nf4_tensors(packed, absmax, nested_absmax, nested_code, blocksize, nested_blocksize, shape) -> None:
    """The NF4 storage is self-consistent for ``shape``; raises ValueError/TypeError naming the tensor."""
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: NF4 blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize}")
    if len(shape) != 2 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"lora_ext: NF4 weight shape must be 2-D [N, K] with N, K > 0, got {list(shape)}")
    n = math.prod(shape)
    if packed.dtype != torch.uint8:
        raise TypeError(f"lora_ext: packed NF4 data must be uint8, got {packed.dtype}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"lora_ext: packed NF4 data of a {list(shape)} weight must hold (N*K+1)//2 = {(n + 1) // 2} bytes, "
            f"got {packed.numel()} (shape {list(packed.shape)})"
        )
    blocks = -(-n // blocksize)
    if absmax.numel() != blocks:
        raise ValueError(
            f"lora_ext: absmax must hold ceil(N*K/blocksize) = {blocks} block scales for a {list(shape)} weight "
            f"with blocksize {blocksize}, got {absmax.numel()}"
        )
    if absmax.device != packed.device:
        raise ValueError(f"lora_ext: absmax is on {absmax.device} but packed is on {packed.device}")
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise TypeError(f"lora_ext: absmax must be float32 without double quantization, got {absmax.dtype}")
        if nested_code is not None:
            raise ValueError("lora_ext: nested_code given without nested_absmax")
        return
    if absmax.dtype != torch.uint8:
        raise TypeError(f"lora_ext: double-quantized absmax must be uint8 codes, got {absmax.dtype}")
    if nested_code is None or nested_code.dtype != torch.float32 or nested_code.numel() != 256:
        raise ValueError("lora_ext: double quantization needs nested_code, a float32 tensor of 256 values")
    if nested_blocksize <= 0:
        raise ValueError(f"lora_ext: nested_blocksize must be positive, got {nested_blocksize}")
    nested_blocks = -(-blocks // nested_blocksize)
    if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != nested_blocks:
        raise ValueError(
            f"lora_ext: nested_absmax must be float32 with ceil({blocks}/{nested_blocksize}) = {nested_blocks} "
            f"values, got {nested_absmax.dtype} with {nested_absmax.numel()}"
        )
    for t, name in ((nested_absmax, "nested_absmax"), (nested_code, "nested_code")):
        if t.device != packed.device:
            raise ValueError(f"lora_ext: {name} is on {t.device} but packed is on {packed.device}")


# ------------------------------------------------------------ dispatcher registration

NF4_SCHEMAS: dict[str, str] = {
    "nf4_quantize": "(Tensor weight, int blocksize) -> (Tensor, Tensor)",
    "blockwise_quantize_8bit": "(Tensor x, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "nf4_dequantize": (
        "(Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, int blocksize, "
        "int nested_blocksize, int[] shape, ScalarType dtype) -> Tensor"
    ),
    "lora_linear_nf4": (
        "(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, float offset, "
        "int blocksize, int nested_blocksize, int out_features, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "float scale, float dropout_p, Tensor? dropout_seed) -> Tensor"
    ),
    "lora_linear_nf4_backward": (
        "(Tensor grad_out, Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
        "float offset, int blocksize, int nested_blocksize, int out_features, Tensor lora_A, Tensor lora_B, "
        "float scale, float dropout_p, Tensor? dropout_seed, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

_FALLBACK_KERNELS = {
    "nf4_quantize": nf4_quantize_ref,
    "blockwise_quantize_8bit": blockwise_quantize_8bit_ref,
    "nf4_dequantize": nf4_dequantize_ref,
    "lora_linear_nf4": lora_linear_nf4_ref,
    "lora_linear_nf4_backward": lora_linear_nf4_backward_ref,
}

_FALLBACK_KEYS = ("CPU", "CUDA", "MPS", "XPU", "PrivateUse1")


def _schemas_compiled() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"{NAMESPACE}::nf4_quantize", "")
        return True
    except RuntimeError:
        return False


_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901
if not (_loader.extension_loaded() and _schemas_compiled()):
    # No compiled library, or one built before csrc/nf4_bindings.cpp existed.
    for _name, _schema in NF4_SCHEMAS.items():
        _lib.define(_name + _schema)

_FALLBACK_REGISTERED: dict[str, list[str]] = {}
for _name, _fn in _FALLBACK_KERNELS.items():
    _FALLBACK_REGISTERED[_name] = []
    for _key in _FALLBACK_KEYS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{_name}", _key):
            _lib.impl(_name, _fn, _key)
            _FALLBACK_REGISTERED[_name].append(_key)


def fallback_dispatch_keys(name: str) -> list[str]:
    """Dispatch keys on which NF4 op ``name`` runs the pure-PyTorch kernel."""
    return list(_FALLBACK_REGISTERED.get(name, ()))


@torch.library.register_fake(f"{NAMESPACE}::nf4_quantize")
def _nf4_quantize_fake(weight, blocksize):
    n = weight.numel()
    return (
        weight.new_empty(((n + 1) // 2,), dtype=torch.uint8),
        weight.new_empty((-(-n // blocksize),), dtype=torch.float32),
    )


@torch.library.register_fake(f"{NAMESPACE}::blockwise_quantize_8bit")
def _blockwise_quantize_8bit_fake(x, code, blocksize):
    n = x.numel()
    return x.new_empty((n,), dtype=torch.uint8), x.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::nf4_dequantize")
def _nf4_dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@torch.library.register_fake(f"{NAMESPACE}::lora_linear_nf4")
def _lora_linear_nf4_fake(
    x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
    bias, lora_A, lora_B, scale, dropout_p, dropout_seed,
):  # fmt: skip
    return x.new_empty(x.shape[0], out_features)


@torch.library.register_fake(f"{NAMESPACE}::lora_linear_nf4_backward")
def _lora_linear_nf4_backward_fake(
    grad_out, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
    lora_A, lora_B, scale, dropout_p, dropout_seed, output_mask,
):  # fmt: skip
    def out(flag, like, shape):
        return like.new_empty(shape) if flag else x.new_empty(0)

    return (
        out(output_mask[0], x, x.shape),
        out(output_mask[1], x, (out_features,)),
        out(output_mask[2], lora_A, lora_A.shape),
        out(output_mask[3], lora_B, lora_B.shape),
    )


def _lora_linear_nf4_setup_context(ctx, inputs, output):
    (x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, out_features,
     bias, lora_A, lora_B, scale, dropout_p, dropout_seed) = inputs  # fmt: skip
    # Only x, the quantized weight (alive as the module's storage), the adapter
    # and the seed: no dequantized weight, no mask, nothing activation-sized.
    ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, dropout_seed)
    ctx.args = (offset, blocksize, nested_blocksize, out_features)
    ctx.lora = (scale, dropout_p)
    ctx.has_bias = bias is not None


def _lora_linear_nf4_backward(ctx, grad_out):
    x, packed, absmax, nested_absmax, nested_code, lora_A, lora_B, dropout_seed = ctx.saved_tensors
    offset, blocksize, nested_blocksize, out_features = ctx.args
    scale, dropout_p = ctx.lora
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(ctx.has_bias and needs[9]), bool(needs[10]), bool(needs[11])]
    none = [None] * 15
    if not any(mask):
        return tuple(none)
    grads = torch.ops.lora_ext.lora_linear_nf4_backward(
        grad_out, x, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
        out_features, lora_A, lora_B, scale, dropout_p, dropout_seed, mask,
    )  # fmt: skip
    gx, gbias, ga, gb = (g if m else None for g, m in zip(grads, mask))
    none[0], none[9], none[10], none[11] = gx, gbias, ga, gb
    return tuple(none)


torch.library.register_autograd(
    f"{NAMESPACE}::lora_linear_nf4", _lora_linear_nf4_backward, setup_context=_lora_linear_nf4_setup_context
)


# -------------------------------------------------------------------- public API


@dataclass(eq=False)
class NF4Weight:
    """A frozen weight in bitsandbytes' NF4 layout.

    Attributes:
        packed: uint8 ``[(N*K+1)//2, 1]`` (bitsandbytes' ``Params4bit`` shape):
            blocks of ``blocksize`` over the flattened row-major weight, two
            codes per byte, first element in the high nibble.
        absmax: fp32 ``[nblocks]`` block scales, or uint8 ``[nblocks]`` codes
            when double-quantized.
        blocksize: elements per block (a power of two in 32..4096).
        shape: ``torch.Size([N, K])`` of the original weight.
        dtype: dtype of the original weight (the default dequantization dtype).
        nested_absmax: fp32 ``[ceil(nblocks/256)]`` scales of the absmax codes, or None.
        nested_code: fp32 ``[256]`` dynamic map of the absmax codes, or None.
        offset: fp32 scalar tensor added back to the dequantized absmax, or None.
        nested_blocksize: block size of the double quantization (256).
    """

    packed: Tensor
    absmax: Tensor
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    offset: Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset_float: float | None = None  # float(offset), cached so the ops never read tensor data (torch.compile)

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if (self.offset is None) != (self.nested_absmax is None):
            raise ValueError("lora_ext: offset and nested_absmax come together (double quantization) or not at all")
        self.validate()
        if self.offset is not None and self.offset_float is None:
            self.offset_float = float(self.offset)

    def validate(self) -> None:
        """Raise a clear error if the tensors disagree with each other or with shape/blocksize."""
        _check_nf4_tensors(
            self.packed, self.absmax, self.nested_absmax, self.nested_code, self.blocksize,
            self.nested_blocksize, list(self.shape),
        )  # fmt: skip

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def quant_map(self) -> Tensor:
        """The NF4 code table (fp32 [16]) on this weight's device."""
        return nf4_code(self.device)

    @property
    def offset_value(self) -> float:
        return self.offset_float if self.offset_float is not None else 0.0

    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of storage: packed codes, block scales and the double-quantization state."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def bits_per_param(self) -> float:
        """Storage bits per weight element (4.127 for blocksize 64 with double quantization on large weights)."""
        return 8.0 * self.nbytes() / self.numel()

    def absmax_fp32(self) -> Tensor:
        """The fp32 block scales (dequantizes the double-quantized absmax)."""
        return resolve_absmax_ref(
            self.absmax, self.nested_absmax, self.nested_code, self.offset_value, self.nested_blocksize
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_nf4(self, dtype)

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy on ``device`` (same bytes)."""

        def mv(t):
            return None if t is None else t.to(device)

        return NF4Weight(
            self.packed.to(device), self.absmax.to(device), self.blocksize, self.shape, self.dtype,
            mv(self.nested_absmax), mv(self.nested_code), mv(self.offset), self.nested_blocksize, self.offset_float,
        )  # fmt: skip

    def op_args(self) -> tuple:
        """(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize) for the ops."""
        return (
            self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset_value,
            self.blocksize, self.nested_blocksize,
        )  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"NF4Weight(shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, device={self.device})"
        )


def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a 2-D weight to NF4, bit-exact with bitsandbytes' ``quantize_4bit``.

    Args:
        weight: ``[N, K]`` float32, float16 or bfloat16 (not modified).
        blocksize: one of 32, 64, 128, ..., 4096.
        double_quant: also quantize the block scales (bitsandbytes'
            ``compress_statistics=True``): 8-bit dynamic codes in blocks of 256
            around their mean.

    Returns:
        :class:`NF4Weight` on weight's device; ``packed``, ``absmax``,
        ``nested_absmax`` and ``offset`` equal bitsandbytes' ``quant_state`` tensors.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"lora_ext: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"lora_ext: quantize_nf4 needs a 2-D weight [N, K], got shape {list(weight.shape)}")
    if weight.dtype not in QUANTIZABLE_DTYPES:
        raise TypeError(f"lora_ext: quantize_nf4 supports float32, float16 and bfloat16 weights, got {weight.dtype}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: NF4 blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    if weight.numel() == 0:
        raise ValueError(f"lora_ext: cannot quantize an empty weight of shape {list(weight.shape)}")
    with torch.no_grad():
        packed, absmax = torch.ops.lora_ext.nf4_quantize(weight.detach(), blocksize)
        packed = packed.view(-1, 1)
        if not double_quant:
            return NF4Weight(packed, absmax, blocksize, weight.shape, weight.dtype)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(
                "lora_ext: the weight holds NaN or Inf; double quantization would make every block scale NaN "
                "(their mean is subtracted). Clean the weight or use double_quant=False (bit-exact with "
                "bitsandbytes for non-finite values too)."
            )
        offset = absmax.mean()
        code = dynamic_map(weight.device)
        qabsmax, nested_absmax = torch.ops.lora_ext.blockwise_quantize_8bit(absmax - offset, code, NESTED_BLOCKSIZE)
    return NF4Weight(packed, qabsmax, blocksize, weight.shape, weight.dtype, nested_absmax, code, offset)


def dequantize_nf4(qw: NF4Weight, dtype: torch.dtype | None = None) -> Tensor:
    """The weight ``[N, K]`` in ``dtype`` (default: the original dtype); equals bitsandbytes' ``dequantize_4bit``."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"lora_ext: dequantize_nf4 expects an NF4Weight, got {type(qw).__name__}")
    dtype = dtype or qw.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"lora_ext: dequantize_nf4 dtype must be a floating dtype, got {dtype}")
    return torch.ops.lora_ext.nf4_dequantize(*qw.op_args(), list(qw.shape), dtype)


def _check_nf4_lora_args(x, qw: NF4Weight, lora_A, lora_B, scale, bias, dropout_p) -> tuple[float, float]:
    """The checks of lora_linear, against a meta stand-in of the dequantized weight; returns (scale, p)."""
    from ._checks import check_lora_linear_args

    if not isinstance(qw, NF4Weight):
        raise TypeError(f"lora_ext: weight must be an NF4Weight, got {type(qw).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"lora_ext: x must be a torch.Tensor, got {type(x).__name__}")
    for t, name in ((x, "x"), (lora_A, "lora_A"), (lora_B, "lora_B"), (bias, "bias")):
        if isinstance(t, Tensor) and t.device != qw.device:
            raise ValueError(f"lora_ext: {name} is on {t.device} but the NF4 weight is on {qw.device}")

    def meta(t):
        return t.to("meta") if isinstance(t, Tensor) else t

    w_like = torch.empty(qw.shape, dtype=x.dtype, device="meta")
    return check_lora_linear_args(meta(x), w_like, meta(lora_A), meta(lora_B), scale, meta(bias), dropout_p)


def lora_linear_nf4(
    x: Tensor,
    weight: NF4Weight,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """LoRA linear over an NF4 base: ``x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ``.

    ``W = dequantize_nf4(weight, x.dtype)`` is never stored: the compiled CPU
    kernel dequantizes it tile by tile inside the forward and again inside the
    backward; the fallback builds it as a transient per call. Autograd saves
    only x, the quantized tensors, the adapter and the dropout seed.

    Args:
        x: ``[..., K]`` in the compute dtype (float32, bfloat16, float16 or float64).
        weight: :class:`NF4Weight` of shape ``[N, K]`` on x's device.
        lora_A: ``[r, K]``, lora_B: ``[N, r]``, bias: ``[N]`` or None, all in x's dtype.
        scale: Python float (``lora_alpha / r``).
        dropout_p: inverted dropout on the LoRA branch input (same hash mask as :func:`lora_ext.lora_linear`).

    Returns:
        ``[..., N]`` in x's dtype; differentiable in x, bias, lora_A and lora_B.
    """
    scale, dropout_p = _check_nf4_lora_args(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    n, k = weight.shape
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device)
    x2 = x.reshape(-1, k)
    y2 = torch.ops.lora_ext.lora_linear_nf4(x2, *weight.op_args(), n, bias, lora_A, lora_B, scale, dropout_p, seed)
    return y2.view(*x.shape[:-1], n)


__all__ = [
    "NESTED_BLOCKSIZE",
    "NF4_CODE_VALUES",
    "NF4Weight",
    "SUPPORTED_BLOCKSIZES",
    "dequantize_nf4",
    "dynamic_map",
    "lora_linear_nf4",
    "nf4_code",
    "quantize_nf4",
]
