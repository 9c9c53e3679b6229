"""The validation contract: input checks with messages that name the tensor and show the shapes.

Used by the public functions (lora_ext/ops/functional.py) and by the
pure-PyTorch kernels (lora_ext/ops/reference.py), so a bad call gets the same
clear error on every path; the compiled kernels run the same checks in C++
(csrc/host/checks.h). Exception classes: ValueError for shapes and values,
TypeError for dtypes, devices and wrong argument types, on every path
(``TORCH_CHECK_VALUE`` / ``TORCH_CHECK_TYPE`` in C++).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Block sizes bitsandbytes accepts for 4-bit quantization.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"lora_ext: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"lora_ext: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t


def _check_same(ref: Tensor, ref_name: str, t: Tensor, name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"lora_ext: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all tensors must share one dtype"
        )
    if t.device != ref.device:
        raise TypeError(
            f"lora_ext: {name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device"
        )


def check_scale(scale: object) -> float:
    if isinstance(scale, Tensor):
        raise TypeError("lora_ext: scale must be a Python number, got a Tensor (use float(scale))")
    try:
        value = float(scale)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"lora_ext: scale must be a Python number, got {type(scale).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"lora_ext: scale must be finite, got {value}")
    return value


def check_adapter(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """Validate weight [N, K], lora_A [r, K], lora_B [N, r]; raise with names and shapes."""
    _check_tensor(weight, "weight")
    _check_tensor(lora_A, "lora_A")
    _check_tensor(lora_B, "lora_B")
    if weight.dim() != 2:
        raise ValueError(f"lora_ext: weight must be 2-D [N, K], got shape {_shape(weight)}")
    if lora_A.dim() != 2:
        raise ValueError(f"lora_ext: lora_A must be 2-D [r, K], got shape {_shape(lora_A)}")
    if lora_B.dim() != 2:
        raise ValueError(f"lora_ext: lora_B must be 2-D [N, r], got shape {_shape(lora_B)}")
    _check_same(weight, "weight", lora_A, "lora_A")
    _check_same(weight, "weight", lora_B, "lora_B")
    n, k = weight.shape
    r = lora_A.shape[0]
    if r <= 0:
        raise ValueError(f"lora_ext: rank must be positive, got lora_A of shape {_shape(lora_A)}")
    if lora_A.shape[1] != k:
        raise ValueError(
            f"lora_ext: lora_A must be [r, K] with K = {k} (weight is {_shape(weight)}), got lora_A of shape {_shape(lora_A)}"
        )
    if tuple(lora_B.shape) != (n, r):
        raise ValueError(
            f"lora_ext: lora_B must be [N, r] = [{n}, {r}] (weight is {_shape(weight)}, lora_A is {_shape(lora_A)}), "
            f"got lora_B of shape {_shape(lora_B)}"
        )


def check_lora_linear_args(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: object, bias: Tensor | None, dropout_p: object
) -> tuple[float, float]:
    """Validate a lora_linear call (x [..., K]); returns (scale, dropout_p) as floats."""
    _check_tensor(x, "x")
    check_adapter(weight, lora_A, lora_B)
    _check_same(weight, "weight", x, "x")
    if x.dim() < 1:
        raise ValueError(f"lora_ext: x must have at least 1 dim [..., K], got shape {_shape(x)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(
            f"lora_ext: x has K = {x.shape[-1]} (shape {_shape(x)}) but weight is [N, K] = {_shape(weight)}"
        )
    if bias is not None:
        _check_tensor(bias, "bias")
        _check_same(weight, "weight", bias, "bias")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"lora_ext: bias must be [N] = [{n}], got shape {_shape(bias)}")
    scale_f = check_scale(scale)
    try:
        p = float(dropout_p)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"lora_ext: dropout_p must be a number, got {type(dropout_p).__name__}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"lora_ext: dropout_p must be in [0, 1], got {p}")
    return scale_f, p


def check_dropout_seed(dropout_p: float, dropout_seed: Tensor | None, x: Tensor) -> None:
    if dropout_p <= 0.0:
        return
    if dropout_seed is None:
        raise ValueError("lora_ext: dropout_p > 0 needs a dropout_seed tensor")
    if dropout_seed.numel() != 1 or dropout_seed.dtype != torch.int64:
        raise ValueError(
            f"lora_ext: dropout_seed must be a one-element int64 tensor, got shape {_shape(dropout_seed)} and dtype {dropout_seed.dtype}"
        )
    if dropout_seed.device != x.device:
        raise TypeError(f"lora_ext: dropout_seed is on {dropout_seed.device} but x is on {x.device}")


def check_op_level(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    bias: Tensor | None,
    dropout_p: float,
    dropout_seed: Tensor | None,
    strategy: int,
) -> None:
    """The checks of the op itself (x is 2-D [M, K] there), for direct torch.ops calls."""
    if x.dim() != 2:
        raise ValueError(f"lora_ext: x must be 2-D [M, K] at the op level, got shape {_shape(x)}")
    check_lora_linear_args(x, weight, lora_A, lora_B, scale, bias, dropout_p)
    check_dropout_seed(dropout_p, dropout_seed, x)
    if strategy not in (0, 1, 2):
        raise ValueError(f"lora_ext: strategy must be 0 (auto), 1 (shrink_expand) or 2 (merge), got {strategy}")


def check_grad_out(grad_out: Tensor, x: Tensor, weight: Tensor) -> None:
    expected = (x.shape[0], weight.shape[0])
    if grad_out.dim() != 2 or tuple(grad_out.shape) != expected:
        raise ValueError(f"lora_ext: grad_out must be [M, N] = {list(expected)}, got shape {_shape(grad_out)}")
    _check_same(x, "x", grad_out, "grad_out")


# --------------------------------------------------------------------- NF4 storage


def check_saved_xa(xa: Tensor, x: Tensor, rank: int) -> None:
    """xa is what ``lora_linear_xa`` returned for x and a rank-``rank`` adapter: [M, r] in the accumulation dtype."""
    if not isinstance(xa, Tensor):
        raise TypeError(f"lora_ext: xa must be a torch.Tensor, got {type(xa).__name__}")
    if xa.dim() != 2 or xa.shape[0] != x.shape[0] or xa.shape[1] != rank:
        raise ValueError(
            f"lora_ext: xa must be [M, r] = [{x.shape[0]}, {rank}] (the xa lora_linear_xa returned), "
            f"got shape {_shape(xa)}"
        )
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if xa.dtype != acc:
        raise TypeError(f"lora_ext: xa must be {acc} for {x.dtype} x (the accumulation dtype), got {xa.dtype}")
    if xa.device != x.device:
        raise TypeError(f"lora_ext: xa is on {xa.device} but x is on {x.device}")


def check_nf4_storage(storage, shape) -> None:
    """The NF4 storage (an ``NF4Args``) is self-consistent for ``shape``; raises ValueError/TypeError naming the tensor."""
    packed, absmax, nested_absmax, nested_code = (
        storage.packed,
        storage.absmax,
        storage.nested_absmax,
        storage.nested_code,
    )
    blocksize, nested_blocksize = storage.blocksize, storage.nested_blocksize
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
        raise TypeError(f"lora_ext: absmax is on {absmax.device} but packed is on {packed.device}")
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
            raise TypeError(f"lora_ext: {name} is on {t.device} but packed is on {packed.device}")
