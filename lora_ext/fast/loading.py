"""Loading a Hugging Face checkpoint straight into NF4: the full-precision model never exists.

The model is built on the meta device (parameters only; buffers such as rotary
frequencies are real), then the checkpoint is read one tensor at a time from
its safetensors shards. A tensor that is the weight of a quantized linear is
cast to the load dtype, quantized (:func:`lora_ext.quantize_nf4`, double
quantization) and dropped; every other tensor is cast and put in place. So
the peak is the 4-bit model plus one full-precision tensor and its
quantization temporaries (measured in tests/test_fast_loading.py and
BENCHMARKS.md).

The result equals ``quantize_model(AutoModel.from_pretrained(path, dtype=dtype))``
tensor for tensor (tested).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from .. import targets
from ..quant.linear import LinearNF4
from ..quant.nf4 import SUPPORTED_BLOCKSIZES, quantize_nf4

__all__ = ["checkpoint_files", "load_quantized", "resolve_folder"]

_WEIGHTS_INDEX = "model.safetensors.index.json"
_WEIGHTS_FILE = "model.safetensors"


def resolve_folder(model_name: str, *, revision: str | None = None, token: str | bool | None = None) -> str:
    """A local folder for ``model_name``: itself when it is a directory, else a Hub snapshot (download or cache)."""
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name):
        raise TypeError(f"lora_ext: model_name must be a local folder or a Hub id (str), got {model_name!r}")
    path = os.fspath(model_name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"lora_ext: model_name {path!r} is a file; pass the folder holding config.json")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover (transformers depends on it)
        raise ValueError(f"lora_ext: {path!r} is not a local folder and huggingface_hub is missing") from exc
    try:
        return snapshot_download(
            path,
            revision=revision,
            token=token,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"],
        )
    except Exception as exc:  # noqa: BLE001  (offline, unknown repo, auth: one clear message)
        raise ValueError(
            f"lora_ext: model_name {path!r} is neither a local folder nor a Hub repository that could be fetched "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def checkpoint_files(folder: str) -> list[str]:
    """The safetensors shards of a ``save_pretrained`` folder, in index order."""
    index = os.path.join(folder, _WEIGHTS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        return [os.path.join(folder, name) for name in dict.fromkeys(weight_map.values())]
    single = os.path.join(folder, _WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    raise ValueError(
        f"lora_ext: load_in_4bit reads safetensors checkpoints; {folder!r} has neither {_WEIGHTS_FILE} nor "
        f"{_WEIGHTS_INDEX} (load it with load_in_4bit=False, or convert it with save_pretrained)"
    )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _tensors(files: Iterable[str]) -> Iterator[tuple[str, Tensor]]:
    """``(key, tensor)`` of every tensor of the safetensors ``files``, one at a time, each read into fresh memory.

    Plain reads instead of safetensors' memory map: a mapped shard's pages stay resident (and count in the
    resident set) while anything of it is referenced, so a mapped load holds up to the whole checkpoint.
    The format: an 8-byte little-endian header length, a JSON header ``{key: {dtype, shape, data_offsets}}``,
    then the data.
    """
    for path in files:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_len))
            except ValueError as exc:
                raise ValueError(f"lora_ext: {path!r} is not a safetensors file (unreadable header)") from exc
            data_start = 8 + header_len
            entries = sorted(
                ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
            )
            for key, info in entries:
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"lora_ext: {path!r}: tensor {key!r} has unsupported dtype {info['dtype']!r}")
                begin, end = info["data_offsets"]
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(data_start + begin)
                if f.readinto(memoryview(buf.numpy())) != end - begin:
                    raise ValueError(f"lora_ext: {path!r} is truncated (tensor {key!r})")
                yield key, buf.view(dtype).reshape(info["shape"])


def _skip_names(model: nn.Module, skip_modules: Iterable[str]) -> tuple[str, ...]:
    """Modules that stay in full precision: the output head (as QLoRA and bitsandbytes do) and ``skip_modules``."""
    names = list(skip_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        names += [n for n, m in model.named_modules() if m is head]
    return tuple(dict.fromkeys(names))


def _transformers_renamer(model: nn.Module, own: dict[str, Tensor], prefix: str):
    """transformers' checkpoint-key renamings of ``model`` (transformers >= 5: e.g. Llava's legacy
    ``language_model.model.*`` keys), as ``key -> key``; None where transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers 4: checkpoints carry the model's own keys
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        new, converted = rename_source_key(key, renamings, converters, prefix, own)
        if converted is not None:
            raise ValueError(
                f"lora_ext: checkpoint tensor {key!r} needs transformers' weight conversion ({converted!r}: tensors "
                "merged or split at load); load_in_4bit cannot stream it. Load with load_in_4bit=False and "
                "lora_ext.quantize_model the result"
            )
        return new

    return rename


def _model_key(key: str, own: set[str], prefix: str) -> str | None:
    """The model's state-dict key of checkpoint key ``key``: identical, or with the base-model prefix added or removed."""
    if key in own:
        return key
    if prefix and f"{prefix}.{key}" in own:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in own:
        return key[len(prefix) + 1 :]
    return None


def load_quantized(
    model_class: type,
    folder: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    blocksize: int = 64,
    double_quant: bool = True,
    skip_modules: Iterable[str] = ("lm_head",),
    trust_remote_code: bool = False,
    config_kwargs: dict | None = None,
) -> nn.Module:
    """Build ``model_class`` from ``folder``'s config on the meta device and fill it from the checkpoint, NF4-quantizing
    every ``nn.Linear`` (outside ``skip_modules`` and the output head) as its weight arrives.

    Args:
        model_class: a transformers model class or auto class (``from_config`` is used).
        dtype: dtype of the unquantized tensors and of the NF4 layers' compute (the weight is cast to it before
            quantizing, as transformers + bitsandbytes do).
        device: where every tensor goes as it is loaded.

    Raises:
        ValueError: no safetensors checkpoint, keys missing from or unknown to the model, or shape mismatches.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, PreTrainedModel

    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"lora_ext: NF4 blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {blocksize!r}")
    files = checkpoint_files(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **(config_kwargs or {}))
    with init_empty_weights(include_buffers=False):
        if issubclass(model_class, PreTrainedModel):
            model = model_class._from_config(config, dtype=dtype)
        else:  # an auto class
            model = model_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    own_tensors = model.state_dict(keep_vars=True)
    own = set(own_tensors)
    prefix = getattr(model, "base_model_prefix", "")
    rename = _transformers_renamer(model, own_tensors, prefix)
    skip = _skip_names(model, skip_modules)
    linears = {
        name: m for name, m in model.named_modules() if type(m) is nn.Linear and not targets.within_any(name, skip)
    }
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    # module name -> {"weight": NF4Weight, "bias": Tensor}: a linear is swapped once all its tensors arrived
    pending: dict[str, dict[str, object]] = {}
    needed = {name: {"weight"} | ({"bias"} if m.bias is not None else set()) for name, m in linears.items()}
    loaded: set[str] = set()
    unknown: list[str] = []
    for key, tensor in _tensors(files):
        mapped = _model_key(key, own, prefix)
        if mapped is None and rename is not None:
            mapped = _model_key(rename(key), own, prefix)
        if mapped is None:
            unknown.append(key)
            continue
        module_name, _, attr = mapped.rpartition(".")
        if module_name in linears and attr in ("weight", "bias"):
            expected = getattr(linears[module_name], attr).shape
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(
                    f"lora_ext: checkpoint tensor {key!r} has shape {list(tensor.shape)}, the model needs {list(expected)}"
                )
            value = tensor.to(device=device, dtype=dtype)
            del tensor
            parts = pending.setdefault(module_name, {})
            parts[attr] = quantize_nf4(value, blocksize, double_quant) if attr == "weight" else value
            del value
            if set(parts) == needed[module_name]:
                nf4 = LinearNF4.from_nf4(parts["weight"], parts.get("bias"), compute_dtype=dtype)
                _set_module(model, module_name, nf4)
                del pending[module_name]
            loaded.add(mapped)
            continue
        target_dtype = dtype
        if keep_fp32 and any(part in mapped.split(".") for part in keep_fp32):
            target_dtype = torch.float32
        set_module_tensor_to_device(
            model, mapped, device, value=tensor, dtype=target_dtype if tensor.is_floating_point() else None
        )
        del tensor
        loaded.add(mapped)
    if unknown:
        raise ValueError(f"lora_ext: the checkpoint has tensors the model does not know: {sorted(unknown)[:8]}")
    if pending:
        missing = sorted(f"{n}.{a}" for n, parts in pending.items() for a in needed[n] - set(parts))
        raise ValueError(f"lora_ext: the checkpoint has no tensors for {missing[:8]}")
    untouched = [n for n in linears if n not in pending and isinstance(model.get_submodule(n), nn.Linear)]
    if untouched:
        raise ValueError(f"lora_ext: the checkpoint has no weights for the linear layers {untouched[:8]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"lora_ext: the checkpoint has no tensors for {still_meta[:8]}")
    model.to(device)  # the buffers built at construction (rotary frequencies, ...)
    model.eval()
    return model


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
