"""bitsandbytes as an NF4 oracle, on its pure-PyTorch backend.

bitsandbytes 0.50 serves ``dequantize_4bit`` on the CPU with a native kernel.
On CPUs where torch reports the AVX512 capability that kernel is wrong whenever
a row's length is not a multiple of the blocksize (blocks that straddle rows):
for a ``[64, 96]`` weight with blocksize 64 it is off by up to 0.04, with or
without double quantization, while bitsandbytes' own default backend
(``bitsandbytes/backends/default/ops.py``) and the math (``code[q] * absmax``)
agree bit for bit with lora_ext. The tests therefore compare with the math and
with the default backend; :func:`default_dequantize_4bit` routes bitsandbytes'
CPU ``dequantize_4bit`` (and so ``Linear4bit``'s forward and
``functional.dequantize_4bit``) to it for as long as the context is open.
``tests/test_nf4_format.py::test_bitsandbytes_native_dequantize_discrepancy``
documents the native kernel's error where it is in use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def _default_kernel(
    A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    from bitsandbytes.backends.default import ops as default_ops
    from bitsandbytes.backends.utils import _get_4bit_code

    if A.dtype != torch.uint8:
        A = A.view(torch.uint8)
    code = _get_4bit_code(quant_type, A.device)
    return default_ops._dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)


@contextlib.contextmanager
def default_dequantize_4bit() -> Iterator[None]:
    """Serve ``bitsandbytes::dequantize_4bit`` on CPU with bitsandbytes' default (pure-PyTorch) kernel."""
    import bitsandbytes  # noqa: F401  (defines the op)

    lib = torch.library.Library("bitsandbytes", "IMPL")  # noqa: TOR901
    lib.impl("dequantize_4bit", _default_kernel, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def nf4_math_dequantize(packed: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """``code[q] * absmax`` straight from the definition (fp32 products, one rounding to dtype)."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type("nf4", device="cpu").float()
    b = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    q = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)
    n = 1
    for d in qs.shape:
        n *= int(d)
    q = q[:n]
    absmax = qs.absmax
    if qs.nested:
        nested = qs.state2
        scales = (
            nested.code[absmax.to(torch.int64)] * nested.absmax.repeat_interleave(nested.blocksize)[: absmax.numel()]
        )
        absmax = scales + qs.offset
    block = torch.arange(n) // qs.blocksize
    return (code[q] * absmax.float()[block]).reshape(qs.shape).to(dtype)
