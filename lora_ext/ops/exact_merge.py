"""Exact merge and unmerge: ``W += s·BA`` in place, with a record that gives W back bit for bit.

In bf16 (or fp16, or fp32) ``round(round(W + Δ) − Δ) ≠ W`` wherever the merged value's ulp
is coarser than the original's; no choice of merged value avoids it. The exact merge computes,
in the same pass over W, which elements the unmerge formula would not restore and records
their positions and original values (:class:`MergeRecord`); the exact unmerge applies the
formula and writes the recorded originals back. After any number of cycles of any adapters,
in any order (last merged, first unmerged), W is bit-identical to the original.

The per-element function (the same bits on the CPU kernel, the CUDA kernel and this
module's pure-PyTorch fallback; ``csrc/host/exact_merge.h``):

    acc = B[n,0]·A[0,k], then acc = acc + B[n,j]·A[j,k] for j = 1 .. r-1   (fp32, each op rounded)
    d   = fp32(scale) · acc
    merge:   W'[n,k] = round(W[n,k] + d)         unmerge: round(W'[n,k] − d)

so a record made on one path unmerges exactly on any other.

Record size: 6 bytes per recorded element for bf16/fp16 (int32 index + value), 8 for fp32
(int64 indices once N·K ≥ 2³¹). Adapters with |ΔW| ≈ 1e-3..1e-2 of |W| record
0.2 %..1.3 % of the elements (0.6 %..4 % of W's bytes); |ΔW| ≈ |W| records about a third
of them (about W's size in bytes). Figures: BENCHMARKS.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import OpDef, register
from .checks import _check_tensor, _shape, check_adapter, check_scale

__all__ = ["MergeRecord", "merge_exact_", "unmerge_exact_"]

EXACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def index_dtype(numel: int) -> torch.dtype:
    return torch.int64 if numel > 2**31 - 1 else torch.int32


# ------------------------------------------------------------------ validation


def check_exact_adapter(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """check_adapter, except that the factors may also be float32; weight float32/float16/bfloat16."""
    _check_tensor(weight, "weight")
    _check_tensor(lora_A, "lora_A")
    if lora_A.dtype == torch.float32 and weight.dtype != torch.float32:
        # fp32 factors on a half-precision weight: the shape checks on a free fp32 stand-in for weight
        check_adapter(torch.empty((), dtype=torch.float32, device=weight.device).expand(weight.shape), lora_A, lora_B)
    else:
        check_adapter(weight, lora_A, lora_B)
    if weight.dtype not in EXACT_DTYPES:
        raise TypeError(
            f"lora_ext: exact merge takes float32, float16 or bfloat16 weights, got weight of dtype {weight.dtype} "
            "(use merge_ without a record)"
        )


def check_record_tensors(weight: Tensor, index: Tensor, value: Tensor) -> None:
    if not isinstance(index, Tensor) or index.dtype not in (torch.int32, torch.int64):
        got = index.dtype if isinstance(index, Tensor) else type(index).__name__
        raise TypeError(f"lora_ext: merge record index must be int32 or int64, got {got}")
    _check_tensor(value, "merge record value")
    if value.dtype != weight.dtype:
        raise TypeError(f"lora_ext: merge record value must have weight's dtype {weight.dtype}, got {value.dtype}")
    if index.device != weight.device or value.device != weight.device:
        raise TypeError(
            f"lora_ext: merge record index and value must be on weight's device {weight.device}, "
            f"got {index.device} and {value.device}"
        )
    if index.dim() != 1 or value.dim() != 1 or index.shape[0] != value.shape[0]:
        raise ValueError(
            f"lora_ext: merge record index and value must be 1-D of one length, got shapes {_shape(index)} "
            f"and {_shape(value)}"
        )
    if index.numel() > 0:
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= weight.numel():
            raise ValueError(
                f"lora_ext: merge record index must lie in [0, {weight.numel()}) for weight of shape "
                f"{_shape(weight)}, got values in [{lo}, {hi}]"
            )


# ------------------------------------------------------------------ pure-PyTorch kernels


def delta(lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """``fp32(scale) · (B A)`` [N, K] in fp32, summed in the fixed order the kernels use (no FMA)."""
    a, b = lora_A.float(), lora_B.float()
    d = b[:, 0:1] * a[0:1, :]
    for j in range(1, a.shape[0]):
        d = d + b[:, j : j + 1] * a[j : j + 1, :]
    return d * torch.tensor(scale, dtype=torch.float32, device=d.device)


def merge_exact_reference(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    check_exact_adapter(weight, lora_A, lora_B)
    check_scale(scale)
    d = delta(lora_A, lora_B, scale)
    merged = (weight.float() + d).to(weight.dtype)
    back = (merged.float() - d).to(weight.dtype)
    bits = _BITS[weight.dtype]
    lost = (back.view(bits) != weight.view(bits)).reshape(-1)
    index = lost.nonzero().reshape(-1)
    value = weight.reshape(-1).index_select(0, index)
    weight.copy_(merged)
    return index.to(index_dtype(weight.numel())), value


def unmerge_exact_reference(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, index: Tensor, value: Tensor
) -> None:
    check_exact_adapter(weight, lora_A, lora_B)
    check_scale(scale)
    check_record_tensors(weight, index, value)
    restored = (weight.float() - delta(lora_A, lora_B, scale)).to(weight.dtype).contiguous()
    restored.view(-1).index_copy_(0, index.long(), value)
    weight.copy_(restored)


def _merge_exact_fake(weight, lora_A, lora_B, scale):
    n = torch.library.get_ctx().new_dynamic_size()
    return weight.new_empty(n, dtype=index_dtype(weight.numel())), weight.new_empty(n)


register(
    OpDef(
        "merge_exact_",
        "(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale) -> (Tensor, Tensor)",
        merge_exact_reference,
        _merge_exact_fake,
    ),
    OpDef(
        "unmerge_exact_",
        "(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, float scale, Tensor index, Tensor value) -> ()",
        unmerge_exact_reference,
        lambda weight, lora_A, lora_B, scale, index, value: None,
    ),
)


# ------------------------------------------------------------------ the record and the public functions


def _fingerprint(lora_A: Tensor, lora_B: Tensor) -> tuple[float, ...]:
    """A cheap checksum of the factors (sums and sums of squares in fp64), to catch changed factors."""
    out = []
    for t in (lora_A, lora_B):
        t64 = t.detach().double()
        out += [float(t64.sum()), float((t64 * t64).sum())]
    return tuple(out)


class MergeRecord:
    """What an exact merge needs to restore W bit for bit: the elements unmerge would not restore.

    Create an empty one, pass it to ``merge_(..., record=rec)``; ``unmerge_(..., record=rec)``
    restores W exactly and empties it (its memory is freed). Attributes (while it holds a merge):
    ``index`` (flat positions ``n·K + k``, sorted, int32 or int64), ``value`` (original values,
    W's dtype), ``shape``, ``dtype``, ``scale`` and a checksum of the factors.
    """

    def __init__(self) -> None:
        self.index: Tensor | None = None
        self.value: Tensor | None = None
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None
        self.scale: float | None = None
        self.fingerprint: tuple[float, ...] | None = None

    @property
    def filled(self) -> bool:
        return self.index is not None

    @property
    def nbytes(self) -> int:
        """Bytes of the record's tensors (0 when empty)."""
        if self.index is None or self.value is None:
            return 0
        return self.index.numel() * self.index.element_size() + self.value.numel() * self.value.element_size()

    @property
    def count(self) -> int:
        """Number of recorded elements."""
        return 0 if self.index is None else self.index.numel()

    def clear(self) -> None:
        self.__init__()

    def __repr__(self) -> str:
        if not self.filled:
            return "MergeRecord(empty)"
        return f"MergeRecord(shape={list(self.shape or ())}, dtype={self.dtype}, elements={self.count}, bytes={self.nbytes})"

    # state-dict form: tensors only (safetensors-friendly)
    def to_tensors(self) -> dict[str, Tensor]:
        if not self.filled:
            raise ValueError("lora_ext: an empty MergeRecord has no tensors")
        meta = torch.tensor([self.scale, *self.fingerprint, *self.shape], dtype=torch.float64)
        return {"index": self.index, "value": self.value, "meta": meta}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], weight: Tensor) -> MergeRecord:
        missing = [k for k in ("index", "value", "meta") if k not in tensors]
        if missing:
            raise ValueError(f"lora_ext: merge record lacks {missing}")
        meta = tensors["meta"]
        if meta.dtype != torch.float64 or meta.shape != (7,):
            raise ValueError(f"lora_ext: merge record meta must be float64 [7], got {meta.dtype} {_shape(meta)}")
        values = meta.tolist()
        shape = (int(values[5]), int(values[6]))
        if shape != tuple(weight.shape):
            raise ValueError(f"lora_ext: merge record is for a weight of shape {list(shape)}, got {_shape(weight)}")
        index = tensors["index"].to(weight.device)
        value = tensors["value"].to(weight.device)
        check_record_tensors(weight, index, value)
        rec = cls()
        rec.index, rec.value, rec.shape, rec.dtype = index, value, shape, weight.dtype
        rec.scale, rec.fingerprint = values[0], tuple(values[1:5])
        return rec


def merge_exact_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, record: MergeRecord) -> Tensor:
    """In place ``W += scale · B A`` (fp32, one rounding), filling ``record``. Returns ``weight``.

    Raises:
        TypeError: weight is not float32/float16/bfloat16, or ``record`` is not a MergeRecord.
        ValueError: ``record`` already holds a merge (nothing is changed).
    """
    if not isinstance(record, MergeRecord):
        raise TypeError(f"lora_ext: record must be a lora_ext.MergeRecord, got {type(record).__name__}")
    if record.filled:
        raise ValueError("lora_ext: record already holds a merge; unmerge with it first or pass a new MergeRecord")
    check_exact_adapter(weight, lora_A, lora_B)
    scale = check_scale(scale)
    with torch.no_grad():
        index, value = torch.ops.lora_ext.merge_exact_(weight, lora_A, lora_B, scale)
    record.index, record.value = index, value
    record.shape, record.dtype, record.scale = tuple(weight.shape), weight.dtype, scale
    record.fingerprint = _fingerprint(lora_A, lora_B)
    return weight


def unmerge_exact_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, record: MergeRecord) -> Tensor:
    """Undo :func:`merge_exact_` bit for bit and empty ``record``. Returns ``weight``.

    The factors and scale must be those of the merge (checked: scale exactly, the factors by
    checksum); W must be the merged weight (not modified since, other merges undone first).

    Raises:
        ValueError: an empty record, or one made for another shape, scale or factors (nothing
            is changed).
        TypeError: a record of another dtype or device.
    """
    if not isinstance(record, MergeRecord):
        raise TypeError(f"lora_ext: record must be a lora_ext.MergeRecord, got {type(record).__name__}")
    if not record.filled:
        raise ValueError("lora_ext: record is empty (no exact merge to undo)")
    check_exact_adapter(weight, lora_A, lora_B)
    scale = check_scale(scale)
    if record.shape != tuple(weight.shape):
        raise ValueError(
            f"lora_ext: record is for a weight of shape {list(record.shape)}, got weight of shape {_shape(weight)}"
        )
    if record.dtype != weight.dtype:
        raise TypeError(f"lora_ext: record is for a {record.dtype} weight, got weight of dtype {weight.dtype}")
    if record.scale != scale:
        raise ValueError(f"lora_ext: record was made with scale {record.scale}, got scale {scale}")
    if record.fingerprint != _fingerprint(lora_A, lora_B):
        raise ValueError("lora_ext: lora_A/lora_B differ from the factors the record was made with")
    check_record_tensors(weight, record.index, record.value)
    with torch.no_grad():
        torch.ops.lora_ext.unmerge_exact_(weight, lora_A, lora_B, scale, record.index, record.value)
    record.clear()
    return weight
