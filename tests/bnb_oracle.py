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

On CPUs with AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16()``) a
``Linear4bit`` in eval mode whose input does not require grad takes a second
path: its first forward rewrites the weight in place into a CPU tile layout
(``_convert_weight_packed_for_cpu``: codes regrouped by 32 rows, absmax
dequantized, rounded to bfloat16 and transposed, ``quant_state.packing_format_for_cpu``
set) and computes in bfloat16 (``gemv_4bit``). That is not the NF4 math: the
results differ by ~1e-3, it raises for weights whose rows are not a multiple of
the blocksize (down_proj's 96 columns), and its inverse (``state_dict()``)
re-quantizes the scales. :func:`bnb_reference_path` keeps a model's
``Linear4bit`` layers on the dequantize + matmul path (the one used in training
and on every other CPU) and :func:`assert_not_repacked` checks none was rewritten.
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


def bnb_reference_path(model: torch.nn.Module) -> torch.nn.Module:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` off the AVX512-BF16 CPU repacking (in place)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no bitsandbytes Linear4bit in the model"
    assert_not_repacked(model)
    for m in layers:
        m.support_avx512bf16_for_cpu = False  # the flag Linear4bit.forward checks before repacking
    return model


def assert_not_repacked(model: torch.nn.Module) -> None:
    """Fail if a ``Linear4bit`` of ``model`` holds its weight in bitsandbytes' CPU tile layout."""
    import bitsandbytes as bnb

    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            assert not getattr(qs, "packing_format_for_cpu", False), f"{name}: weight repacked for CPU inference"
            # set by _convert_weight_packed_for_cpu before it can fail half-way (rows not a blocksize multiple)
            assert not hasattr(qs, "original_qshape"), f"{name}: quant_state touched by the CPU repacking"


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
