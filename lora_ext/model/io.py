"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key naming (PEFT's ``get_peft_model_state_dict``, adapter name removed):

    base_model.model.<module>.lora_A.weight          [r, in_features]     Linear
    base_model.model.<module>.lora_B.weight          [out_features, r]    Linear
    base_model.model.<module>.lora_embedding_A       [r, num_embeddings]  Embedding
    base_model.model.<module>.lora_embedding_B       [embedding_dim, r]   Embedding
    base_model.model.<module>.lora_magnitude_vector  [out_features]       Linear, DoRA (use_dora)
    base_model.model.<module>.<param>                modules_to_save copies
    base_model.model.<...>.bias                      trained biases (bias="all"/"lora_only")

so ``peft.PeftModel.from_pretrained(base_model, path)`` loads what
:func:`save_adapter` writes, and :func:`load_adapter` reads what PEFT's
``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.dispatch import FACTOR_KEYS
from ..nn.dora import DORA_MAGNITUDE_KEY
from ..nn.layers import LoraLayer, ModulesToSaveWrapper
from .config import LoraConfig
from .inject import _inject, _state, _unwrap, _walk, lora_layers

__all__ = ["load_adapter", "restore_adapter", "save_adapter", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."


# PEFT writes DoRA's magnitude (parameter lora_magnitude_vector.<adapter>.weight) as
# "<module>.lora_magnitude_vector" and reads that name or "<module>.lora_magnitude_vector.weight".
_DORA_FILE_KEY = DORA_MAGNITUDE_KEY.removesuffix(".weight")


def _file_suffix(suffix: str) -> str:
    return _DORA_FILE_KEY if suffix == DORA_MAGNITUDE_KEY else suffix


def _adapter_state_dict(root: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in _adapter_tensors(root, adapter_name, config).items()}


def _adapter_tensors(root: nn.Module, adapter_name: str, config: LoraConfig) -> dict[str, Tensor]:
    """PEFT file key -> the model's own tensor (not detached, not copied)."""
    out: dict[str, Tensor] = {}
    for name, layer in lora_layers(root):
        if adapter_name not in layer.adapters:
            continue
        for suffix, tensor in layer.adapter_tensors(adapter_name).items():
            out[f"{name}.{_file_suffix(suffix)}"] = tensor
    for name, module in root.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            for k, v in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{name}.{k}"] = v
    if config.bias == "all":
        for k, v in root.state_dict().items():
            # biases of the model itself, not of adapter factors or of other adapters' copies
            if (
                k.endswith("bias")
                and ".lora_" not in k
                and ".original_module." not in k
                and ".modules_to_save." not in k
            ):
                out[k] = v
    elif config.bias == "lora_only":
        for name, layer in lora_layers(root):
            if adapter_name in layer.adapters and getattr(layer.base_layer, "bias", None) is not None:
                out[f"{name}.base_layer.bias"] = layer.base_layer.bias
    return {_PREFIX + k: v for k, v in out.items()}


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` to directory ``path`` in PEFT's format.

    Files: ``adapter_config.json`` (a ``peft.LoraConfig``) and
    ``adapter_model.safetensors`` (PEFT key names, tensors in their training
    dtype). ``peft.PeftModel.from_pretrained(base_model, path)`` loads it.
    """
    root = _unwrap(model)
    state = _state(root)
    if adapter_name not in state.configs:
        raise ValueError(f"lora_ext: unknown adapter {adapter_name!r}; the model has adapters {list(state.configs)}")
    config = state.configs[adapter_name]
    tensors = _adapter_state_dict(root, adapter_name, config)
    _write_adapter(root, path, config, tensors)


def _write_adapter(root: nn.Module, path: str, config: LoraConfig, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config.to_peft_dict(name_or_path), f, indent=2, sort_keys=True)


def restore_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> None:
    """Copy the tensors of the adapter directory ``path`` into the existing adapter ``adapter_name``, in place.

    For resuming training: the layers stay as they are (so an optimizer keeps its
    parameters). The file must hold exactly the adapter's tensors, with the same
    shapes; otherwise ``ValueError`` and nothing is changed.
    """
    root = _unwrap(model)
    state = _state(root)
    if adapter_name not in state.configs:
        raise ValueError(f"lora_ext: unknown adapter {adapter_name!r}; the model has adapters {list(state.configs)}")
    _, tensors = read_adapter(path)
    live = _adapter_tensors(root, adapter_name, state.configs[adapter_name])
    missing, extra = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or extra:
        raise ValueError(
            f"lora_ext: {path!r} does not hold adapter {adapter_name!r} of this model: "
            f"missing {missing[:8]}, unexpected {extra[:8]}"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(live[k].shape):
            raise ValueError(
                f"lora_ext: shape mismatch for {k}: the file has {list(v.shape)}, the model {list(live[k].shape)}"
            )
    with torch.no_grad():
        for k, v in tensors.items():
            live[k].copy_(v)


def read_adapter(path: str) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read ``(config, tensors)`` from an adapter directory; tensors keep their file key names.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no weights file.
        ValueError: invalid JSON, a non-LoRA or unsupported config, or a
            corrupt/truncated weights file (the message names the file).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"lora_ext: adapter directory {path!r} does not exist")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"lora_ext: {config_path!r} not found")
    try:
        with open(config_path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"lora_ext: {config_path!r} is not valid JSON: {e}") from None
    return LoraConfig.from_peft_dict(data), _read_weights(path)


def _read_weights(path: str) -> dict[str, Tensor]:
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(weights_path):
        tensors = _read_safetensors(weights_path)
    elif os.path.isfile(os.path.join(path, _LEGACY_WEIGHTS_NAME)):
        legacy = os.path.join(path, _LEGACY_WEIGHTS_NAME)
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on corrupt input
            raise ValueError(f"lora_ext: cannot read {legacy!r}: {e}") from None
    else:
        raise FileNotFoundError(f"lora_ext: no {WEIGHTS_NAME} (or {_LEGACY_WEIGHTS_NAME}) in {path!r}")
    return tensors


def _read_safetensors(weights_path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    size = os.path.getsize(weights_path)
    try:
        tensors = load_file(weights_path, device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... all mean "unreadable"
        raise ValueError(
            f"lora_ext: {weights_path!r} ({size} bytes) is corrupt or truncated, not a readable safetensors file: {e}"
        ) from None
    for k, v in tensors.items():
        if not v.is_floating_point():
            raise ValueError(f"lora_ext: tensor {k!r} in {weights_path!r} has non-float dtype {v.dtype}")
    return tensors


def _split_keys(
    root: nn.Module, tensors: dict[str, Tensor], config: LoraConfig
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """File keys → (factors by module, modules_to_save state by module, plain model params)."""
    factors: dict[str, dict[str, Tensor]] = {}
    rest: dict[str, Tensor] = {}
    for key, value in tensors.items():
        k = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        if k.endswith("." + _DORA_FILE_KEY):  # PEFT's file name of the magnitude parameter
            k += ".weight"
        if k.endswith("lora_B.bias"):
            raise ValueError(f"lora_ext: key {key!r} belongs to a PEFT feature (lora_bias) that is not supported")
        for suffix in FACTOR_KEYS:
            if k.endswith("." + suffix):
                factors.setdefault(k[: -len(suffix) - 1], {})[suffix] = value
                break
        else:
            rest[k] = value

    module_weights: dict[str, dict[str, Tensor]] = {}
    if config.modules_to_save:
        for name, _ in _walk(root):
            if not any(name.endswith(m) for m in config.modules_to_save):
                continue
            prefix = name + "."
            owned = {k[len(prefix) :]: v for k, v in rest.items() if k.startswith(prefix)}
            if owned and not any(name.startswith(f"{o}.") for o in module_weights):
                module_weights[name] = owned
        for name, owned in module_weights.items():
            for k in owned:
                rest.pop(f"{name}.{k}")
    return factors, module_weights, rest


def _plain_param_targets(root: nn.Module, rest: dict[str, Tensor]) -> dict[str, Tensor]:
    """Biases (bias="all"/"lora_only") and PEFT's saved embedding base weights, checked against the model."""
    params = dict(root.named_parameters())
    # The file names the base layer of targeted modules "<m>.base_layer.<p>"; before injection it is "<m>.<p>".
    out: dict[str, Tensor] = {}
    for k, v in rest.items():
        name = k if k in params else k.replace(".base_layer.", ".")
        if name not in params:
            raise ValueError(f"lora_ext: the adapter file has a tensor {k!r} that matches no parameter of the model")
        if tuple(params[name].shape) != tuple(v.shape):
            raise ValueError(
                f"lora_ext: shape mismatch for {k}: the file has {list(v.shape)}, the model has {list(params[name].shape)}"
            )
        out[name] = v
    return out


def load_adapter(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    autocast_adapter_dtype: bool = True,
    config: Any = None,
) -> nn.Module:
    """Load an adapter saved by PEFT (``save_pretrained``) or by :func:`save_adapter`; returns ``model``.

    Injects the LoRA layers the config describes if they are not there yet. As
    with PEFT, the first adapter of a model becomes active; a further one is
    added inactive (use :func:`lora_ext.set_adapter`). With ``is_trainable=False``
    (PEFT's default) its parameters are frozen. ``config`` (a :class:`LoraConfig`
    or a ``peft.LoraConfig``) replaces the file's ``adapter_config.json``, as
    ``PeftModel.from_pretrained(..., config=...)`` does. The config's
    ``task_type`` adds PEFT's per-task ``modules_to_save`` (SEQ_CLS/TOKEN_CLS:
    ``classifier``, ``score``; QUESTION_ANS: ``qa_outputs``); entries that
    match no module are tolerated, as PEFT does, but every tensor of the file
    must find its module.

    Raises:
        FileNotFoundError / ValueError: missing files, corrupt or truncated
            safetensors, an unsupported config, tensors whose shapes do not match
            the model, missing or unexpected keys, or a duplicate adapter name.
            The model is unchanged in every case.
    """
    root = _unwrap(model)
    first = _state(root, required=False) is None
    if config is None:
        config, tensors = read_adapter(path)
    else:
        config = LoraConfig.from_peft(config)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"lora_ext: adapter directory {path!r} does not exist")
        tensors = _read_weights(path)
    config = config.with_task_modules()
    factors, module_weights, rest = _split_keys(root, tensors, config)
    plain = _plain_param_targets(root, rest)
    _inject(
        root,
        config,
        adapter_name,
        strict=False,
        autocast_adapter_dtype=autocast_adapter_dtype,
        weights=factors,
        module_weights=module_weights if config.modules_to_save else None,
    )
    params = dict(root.named_parameters())
    with torch.no_grad():
        for name, value in plain.items():
            key = name if name in params else _rebase(name, params)
            params[key].copy_(value)
    if not is_trainable and first:
        for p in root.parameters():  # inference mode, as PEFT: nothing trains
            p.requires_grad_(False)
    elif not is_trainable:
        for _, module in root.named_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.adapters:
                for p in module._adapter_params(adapter_name):
                    p.requires_grad_(False)
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for p in module.modules_to_save[adapter_name].parameters():
                    p.requires_grad_(False)
    return model


def _rebase(name: str, params: dict[str, Any]) -> str:
    """After injection "<m>.bias" lives at "<m>.base_layer.bias"."""
    head, _, leaf = name.rpartition(".")
    cand = f"{head}.base_layer.{leaf}" if head else f"base_layer.{leaf}"
    if cand in params:
        return cand
    raise KeyError(name)  # unreachable: checked by _plain_param_targets before injection


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The tensors :func:`save_adapter` writes (PEFT key names, on CPU)."""
    root = _unwrap(model)
    state = _state(root)
    if adapter_name not in state.configs:
        raise ValueError(f"lora_ext: unknown adapter {adapter_name!r}; the model has adapters {list(state.configs)}")
    return _adapter_state_dict(root, adapter_name, state.configs[adapter_name])
