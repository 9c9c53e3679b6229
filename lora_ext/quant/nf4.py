"""NF4 (4-bit NormalFloat) frozen weights, bit-compatible with bitsandbytes (QLoRA).

:class:`NF4Weight` holds the storage; :func:`quantize_nf4` / :func:`dequantize_nf4`
convert; the LoRA linear over it is :func:`lora_ext.lora_linear_nf4`. The
kernels are the NF4 op family (lora_ext/ops/nf4.py, csrc/cpu/nf4_cpu.cpp,
csrc/cuda/nf4_cuda.cpp), their pure-PyTorch versions in lora_ext/ops/reference.py.

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

import torch
from torch import Tensor

from ..ops.checks import SUPPORTED_BLOCKSIZES, check_nf4_storage
from ..ops.reference import (
    NESTED_BLOCKSIZE,
    NF4_CODE_VALUES,
    QUANTIZABLE_DTYPES,
    dynamic_map,
    nf4_code,
    resolve_absmax,
)


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
        check_nf4_storage(self, list(self.shape))

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
        return resolve_absmax(
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


__all__ = [
    "NESTED_BLOCKSIZE",
    "NF4_CODE_VALUES",
    "NF4Weight",
    "SUPPORTED_BLOCKSIZES",
    "dequantize_nf4",
    "dynamic_map",
    "nf4_code",
    "quantize_nf4",
]
