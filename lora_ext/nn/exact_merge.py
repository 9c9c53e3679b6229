"""Exact merge on the LoRA layers: the records behind ``merge(exact=True)`` / ``unmerge()``.

A layer merged exactly keeps one :class:`~lora_ext.MergeRecord` per merged adapter
(``layer._merge_records``); ``unmerge()`` undoes the adapters last merged first, each with its
record, so the base weight comes back bit for bit. The records are plain attributes, not
buffers: ``state_dict()`` carries them under ``<layer>.merge_record.<adapter>.{index,value,meta,order}``
only while the layer is merged exactly, and ``load_state_dict`` restores them (and the
merged state). Loading a weight without records into an exactly merged layer is refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ops.exact_merge import EXACT_DTYPES, MergeRecord, merge_exact_, unmerge_exact_

KEY = "merge_record."
FIELDS = ("index", "value", "meta", "order")


def supports(weight: Tensor) -> bool:
    return weight.dtype in EXACT_DTYPES


def _factors(layer, name: str, weight: Tensor) -> tuple[Tensor, Tensor]:
    a, b = (t.detach() for t in layer.delta_factors(name))
    if a.dtype != weight.dtype and a.dtype != torch.float32:
        a, b = a.float(), b.float()  # exact widening: the kernels compute in fp32 anyway
    return a, b


def merge_names(layer, weight: Tensor, names: list[str], safe_merge: bool) -> dict[str, MergeRecord]:
    """Merge ``names`` exactly, in order; with ``safe_merge``, undo (bit-exact) and raise if non-finite."""
    records: dict[str, MergeRecord] = {}
    with torch.no_grad():
        for name in names:
            record = MergeRecord()
            merge_exact_(weight.data, *_factors(layer, name, weight), layer.scaling[name], record)
            records[name] = record
        if safe_merge and not torch.isfinite(weight).all():
            for name in reversed(names):
                unmerge_exact_(weight.data, *_factors(layer, name, weight), layer.scaling[name], records[name])
            raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
    return records


def unmerge_name(layer, weight: Tensor, name: str, record: MergeRecord) -> None:
    if record.index is not None and record.index.device != weight.device:  # the layer moved since the merge
        record.index, record.value = record.index.to(weight.device), record.value.to(weight.device)
    with torch.no_grad():
        unmerge_exact_(weight.data, *_factors(layer, name, weight), layer.scaling[name], record)


def save_records(layer, destination: dict, prefix: str) -> None:
    for order, name in enumerate(n for n in layer.merged_adapters if n in layer._merge_records):
        key = f"{prefix}{KEY}{name}."
        for field, t in layer._merge_records[name].to_tensors().items():
            destination[key + field] = t
        destination[key + "order"] = torch.tensor(order, dtype=torch.int64)


def load_records(layer, state_dict: dict, prefix: str) -> None:
    """Take this layer's record keys out of ``state_dict`` and install them (before the weight loads)."""
    start = prefix + KEY
    found: dict[str, dict[str, Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(start)]:
        name, _, field = key[len(start) :].rpartition(".")
        if not name or field not in FIELDS:
            raise ValueError(f"lora_ext: unexpected merge record key {key!r}")
        found.setdefault(name, {})[field] = state_dict.pop(key)
    weight_key = prefix + "base_layer.weight"
    if not found:
        if layer._merge_records and weight_key in state_dict:
            raise ValueError(
                f"lora_ext: {prefix.rstrip('.') or 'the layer'} is merged exactly but the state_dict has no merge "
                "record for it; unmerge_adapter() before loading plain weights, or load a state_dict saved while merged"
            )
        return
    if weight_key not in state_dict:
        raise ValueError(f"lora_ext: the state_dict has merge records under {start!r} but no {weight_key!r}")
    unknown = [n for n in found if n not in layer.adapters]
    if unknown:
        raise ValueError(f"lora_ext: merge records for adapter(s) {unknown} this layer does not hold")
    weight = layer.base_layer.weight
    records, order = {}, {}
    for name, tensors in found.items():
        if "order" not in tensors:
            raise ValueError(f"lora_ext: merge record {start}{name} lacks 'order'")
        records[name] = MergeRecord.from_tensors(tensors, weight)
        if records[name].scale != layer.scaling[name]:
            raise ValueError(
                f"lora_ext: merge record {start}{name} was made with scale {records[name].scale}, "
                f"the layer's adapter has scale {layer.scaling[name]}"
            )
        order[name] = int(tensors["order"])
    layer._merge_records = records
    layer.merged_adapters = sorted(records, key=order.__getitem__)
