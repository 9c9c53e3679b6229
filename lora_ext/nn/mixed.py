"""Mixed-adapter batches in the LoRA layers: one adapter name per batch row (PEFT's ``adapter_names``).

The model-level hook (lora_ext/model/mixed.py) sets ``layer._mixed_adapter_names``
(one name per row of the batch, ``"__base__"`` for none) on every layer that
supports it for the duration of one forward; the layers' ``forward`` then calls
the functions here instead of the active-adapter path.

Rows are the first dim of the layer input (PEFT's ``x[sub_batch_indices]``); every
position of a row (the sequence dim of ``[B, T, K]``) gets that row's adapter.
An adapter a layer does not hold gives its rows the base output, as in PEFT.

How adapters are held: each adapter keeps its own parameters (PEFT's layout);
per call the layer stacks the factors of the adapters present in the batch,
zero-padding smaller ranks, into ``A [n, r_max, K]`` / ``B [n, N, r_max]``.
``torch.stack`` and ``F.pad`` are differentiable, so each adapter's gradient
flows back to its own parameters (and is zero in the padding). The copy is
O(n · r · (N + K)) elements, small next to the batch.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..quant.linear import LinearNF4
from ..quant.nf4 import dequantize_nf4

if TYPE_CHECKING:
    from .layers import LoraEmbedding, LoraLinear

BASE_NAME = "__base__"


def mixed_support(module) -> bool:
    """Whether ``module`` routes rows to adapters: a layer that opted in (``supports_mixed_batch``) and
    whose ``forward`` is the one that reads the names (a subclass with a forward of its own, e.g. DoRA or
    bitsandbytes layers, would ignore them), or a modules_to_save copy of a row-wise module."""
    from .layers import LoraEmbedding, LoraLinear, ModulesToSaveWrapper

    if isinstance(module, ModulesToSaveWrapper):
        return isinstance(module.original_module, ROW_WISE_MODULES)
    if not getattr(module, "supports_mixed_batch", False):
        return False
    for cls in (LoraLinear, LoraEmbedding):
        if isinstance(module, cls):
            return type(module).forward is cls.forward
    return False


def _check_rows(layer, x: Tensor, names: list[str]) -> None:
    kind = type(layer).__name__
    if layer._disable_adapters:
        raise ValueError(f"lora_ext: adapter_names cannot be honoured inside disable_adapters() ({kind})")
    if layer.merged_adapters:
        raise ValueError(
            f"lora_ext: adapter_names cannot be honoured while adapters {layer.merged_adapters} are merged "
            f"into a {kind}; unmerge first"
        )
    if x.dim() < 1 or x.shape[0] != len(names):
        raise ValueError(
            f"lora_ext: adapter_names has {len(names)} entries but a {kind} got an input of shape {list(x.shape)}; "
            "give one name per row (first dim) of the batch"
        )


def _row_index(layer, names: list[str], x: Tensor, lead_dims: int) -> tuple[list[str], Tensor | None]:
    """(adapters of the layer present in the batch, int64 index per flattened row of x or None if none present)."""
    present = set(names)
    used = [a for a in layer.adapters if a in present]
    if not used:
        return used, None
    pos = {a: i for i, a in enumerate(used)}
    index = torch.tensor([pos.get(n, -1) for n in names], dtype=torch.int64, device=x.device)
    per_row = 1
    for d in x.shape[1:lead_dims]:
        per_row *= d
    return used, index.repeat_interleave(per_row) if per_row != 1 else index


def _stacked(factors: list[Tensor], ranks: list[int], dim: int) -> Tensor:
    """Stack [r_i, ...] (dim 0) or [..., r_i] (dim 1) factors, zero-padding the rank to the largest."""
    r_max = max(ranks)
    padded = []
    for f, r in zip(factors, ranks):
        if r != r_max:
            f = F.pad(f, (0, 0, 0, r_max - r)) if dim == 0 else F.pad(f, (0, r_max - r))
        padded.append(f)
    return torch.stack(padded)


def linear_forward(layer: LoraLinear, x: Tensor, names: list[str], *args, **kwargs) -> Tensor:
    """LoraLinear with one adapter per row through :func:`lora_ext.lora_linear_mixed`."""
    if args or kwargs:
        raise ValueError(f"lora_ext: adapter_names with extra arguments to a {type(layer).__name__} is not supported")
    _check_rows(layer, x, names)
    used, index = _row_index(layer, names, x, x.dim() - 1)
    base = layer.base_layer
    if index is None:
        return base(x)
    # Adapters with a weight-decomposed (DoRA) magnitude are not plain LoRA: refuse, as PEFT does.
    dora = getattr(layer, "use_dora", None) or {}
    magnitudes = getattr(layer, "lora_magnitude_vector", None) or {}
    refused = [a for a in used if (isinstance(dora, dict) and dora.get(a)) or a in magnitudes]
    if refused:
        raise ValueError(f"lora_ext: adapter_names does not support DoRA adapters {refused} ({type(layer).__name__})")
    ranks = [layer.r[a] for a in used]
    scales = [layer.scaling[a] for a in used]
    ps = [layer.lora_dropout_p[a] if layer.training else 0.0 for a in used]
    amp = ops.autocast_dtype_for(x)
    quantized = isinstance(base, LinearNF4)
    if quantized:  # as LoraLinearNF4: x in the base's compute dtype, the output back in x's dtype
        dtype = amp if amp is not None else (base.compute_dtype or x.dtype)
    else:
        dtype = amp if amp is not None else base.weight.dtype
    if amp is None and x.dtype != dtype and not quantized:
        raise TypeError(
            f"lora_ext: input x has dtype {x.dtype} but the layer's weight is {dtype}; "
            "cast the input (or the model), or run under torch.autocast"
        )
    from .layers import base_layer_is_hooked

    if base_layer_is_hooked(base):
        # accelerate's hooks must run: base(x), then each adapter on its own rows (unfused).
        y = base(x)
        rows = index.view(x.shape[0], -1)[:, 0]
        for i, a in enumerate(used):
            sel = (rows == i).nonzero().view(-1)
            xs = x[sel].to(layer.lora_A[a].weight.dtype)
            xs = F.dropout(xs, ps[i], training=True) if ps[i] > 0 else xs
            delta = F.linear(F.linear(xs, layer.lora_A[a].weight), layer.lora_B[a].weight) * scales[i]
            y = y.index_add(0, sel, delta.to(y.dtype))
        return y
    lora_A = _stacked([layer.lora_A[a].weight for a in used], ranks, 0)
    lora_B = _stacked([layer.lora_B[a].weight for a in used], ranks, 1)
    # the op accumulates in fp32 itself; under autocast its fallback's plain torch ops must not be re-cast
    guard = torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext()
    with guard:
        # An NF4 base is dequantized into a dense weight for the call (autograd keeps it until the
        # backward in training: one dense weight per layer, unlike the fused NF4 op).
        if quantized:
            w = dequantize_nf4(base.nf4, dtype)
        elif getattr(layer, "fan_in_fan_out", False):  # transformers' Conv1D: weight [in, out]
            w = base.weight.t().to(dtype)
        else:
            w = base.weight.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        y = ops.lora_linear_mixed(x.to(dtype), w, lora_A.to(dtype), lora_B.to(dtype), scales, index, bias, ps)
    return y.to(x.dtype) if quantized and amp is None else y


def embedding_forward(layer: LoraEmbedding, x: Tensor, names: list[str], *args, **kwargs) -> Tensor:
    """LoraEmbedding with one adapter per row: each adapter's low-rank lookup on its own rows (as PEFT)."""
    _check_rows(layer, x, names)
    result = layer.base_layer(x, *args, **kwargs)
    used, index = _row_index(layer, names, x, 1)
    if index is None:
        return result
    base = layer.base_layer
    embed_scale = getattr(base, "embed_scale", None)
    with torch.autocast(x.device.type, enabled=False):
        acc = result.float()
        for i, a in enumerate(used):
            sel = (index == i).nonzero().view(-1)
            after_a = F.embedding(
                x[sel],
                layer.lora_embedding_A[a].t(),
                padding_idx=base.padding_idx,
                max_norm=base.max_norm,
                norm_type=base.norm_type,
                scale_grad_by_freq=base.scale_grad_by_freq,
                sparse=base.sparse,
            )
            delta = (after_a.float() @ layer.lora_embedding_B[a].float().t()) * layer.scaling[a]
            if embed_scale is not None:
                delta = delta * (embed_scale.float() if isinstance(embed_scale, Tensor) else embed_scale)
            acc = acc.index_add(0, sel, delta)
    return acc.to(result.dtype)


# Module types whose rows are independent (PEFT's list for mixed batches through modules_to_save).
ROW_WISE_MODULES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def modules_to_save_forward(wrapper, x: Tensor, names: list[str], *args, **kwargs) -> Tensor:
    """ModulesToSaveWrapper with one adapter per row: each adapter's copy on its own rows, the original
    module for ``"__base__"`` and for adapters it has no copy of (as PEFT)."""
    kind = type(wrapper.original_module).__name__
    if wrapper._disable_adapters:
        raise ValueError(
            f"lora_ext: adapter_names cannot be honoured inside disable_adapters() (modules_to_save {kind})"
        )
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != len(names):
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"lora_ext: adapter_names has {len(names)} entries but a modules_to_save {kind} got an input of "
            f"shape {shape}; give one name per row (first dim) of the batch"
        )
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n if n in wrapper.modules_to_save else BASE_NAME, []).append(i)
    out = None
    for n, rows in groups.items():
        module = wrapper.original_module if n == BASE_NAME else wrapper.modules_to_save[n]
        sel = torch.tensor(rows, dtype=torch.int64, device=x.device)
        part = module(x[sel], *args, **kwargs)
        if out is None:
            out = part.new_zeros((len(names), *part.shape[1:]))
        out = out.index_copy(0, sel, part)
    return out
