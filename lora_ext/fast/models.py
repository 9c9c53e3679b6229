"""FastLanguageModel and FastVisionModel: Unsloth's entry points, on lora_ext's fused LoRA and NF4.

Notebook code written for Unsloth runs with the import changed to
``from lora_ext import FastLanguageModel`` (docs/model_api.md, "Unsloth-style
entry points"). Differences:

- the model returned by ``get_peft_model`` is the transformers model itself,
  injected with lora_ext's layers (not a ``PeftModel``); it has
  ``print_trainable_parameters()``; save the adapter with
  ``lora_ext.save_adapter(model, path)`` (PEFT's file format);
- ``lora_dropout > 0`` and ``bias != "none"`` run on the same fused op as the
  defaults (Unsloth falls back to slower code for them);
- arguments for features lora_ext does not have (8-bit, full fine-tuning,
  LoftQ, vLLM, ...) are refused with a ValueError naming them; arguments that
  change nothing here are accepted with one warning.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import targets as _targets
from ..model.config import LoraConfig
from ..model.inject import _walk, inject_adapter, print_trainable_parameters
from ..nn.dispatch import kind_of
from .checkpointing import enable_checkpointing
from .inference import for_inference, for_training
from .loading import load_quantized, resolve_folder
from .vision import select_linears

__all__ = ["FastLanguageModel", "FastVisionModel"]

UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Arguments of Unsloth's from_pretrained/get_peft_model for features lora_ext does not implement:
# accepted only at the value that means "off".
_REFUSED_UNLESS = {
    "load_in_8bit": False,
    "full_finetuning": False,
    "fast_inference": False,
    "load_in_fp8": False,
    "float8_kv_cache": False,
    "qat_scheme": None,
    "offload_embedding": False,
    "unsloth_tiled_mlp": False,
    "rope_scaling": None,
    "resize_model_vocab": None,
    "ensure_weight_tying": False,
    "use_dora": False,
    "lora_bias": False,
}
_REFUSED_WHY = {
    "load_in_8bit": "8-bit loading (load_in_4bit=True gives NF4, or load in 16 bits)",
    "full_finetuning": "full fine-tuning (lora_ext trains LoRA adapters)",
    "fast_inference": "vLLM inference",
    "load_in_fp8": "FP8 loading",
    "float8_kv_cache": "an FP8 KV cache",
    "qat_scheme": "quantization-aware training",
    "offload_embedding": "embedding offload",
    "unsloth_tiled_mlp": "tiled MLPs",
    "rope_scaling": "RoPE scaling at load time (set it in the model's config.json)",
    "resize_model_vocab": "vocabulary resizing at load time",
    "ensure_weight_tying": "PEFT's weight-tying option",
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
}
# Arguments that have no effect here: accepted, named in one warning when set to a non-default value.
_IGNORED_DEFAULTS = {
    "fix_tokenizer": True,
    "use_exact_model_name": False,
    "gpu_memory_utilization": 0.5,
    "max_lora_rank": 64,
    "disable_log_stats": True,
    "float32_mixed_precision": None,
    "temporary_location": "_unsloth_temporary_saved_buffers",
    "use_gradient_checkpointing": "unsloth",  # in from_pretrained: get_peft_model's argument decides
    "random_state": 3407,  # in from_pretrained: get_peft_model's argument seeds the adapters
    "max_seq_length": 2048,  # in get_peft_model: from_pretrained's argument is the one used
    "return_logits": False,
    "fullgraph": True,
    "use_cache": None,
}


def _check_extra(kwargs: dict[str, Any], where: str, ignorable: tuple[str, ...]) -> None:
    """Refuse unsupported features, warn once about arguments without effect, refuse unknown names."""
    refused = [k for k in kwargs if k in _REFUSED_UNLESS and kwargs[k] not in (_REFUSED_UNLESS[k], None)]
    if refused:
        raise ValueError(
            f"lora_ext: {where} does not support "
            + "; ".join(f"{k}={kwargs[k]!r} ({_REFUSED_WHY[k]})" for k in refused)
        )
    unknown = [k for k in kwargs if k not in _REFUSED_UNLESS and k not in ignorable]
    if unknown:
        raise TypeError(f"lora_ext: {where} got unexpected keyword argument(s) {unknown}")
    ignored = [k for k in kwargs if k in ignorable and kwargs[k] != _IGNORED_DEFAULTS.get(k, object())]
    if ignored:
        warnings.warn(
            f"lora_ext: {where}: argument(s) {', '.join(f'{k}={kwargs[k]!r}' for k in ignored)} have no effect "
            "here and are ignored",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------- loading


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:  # Unsloth's rule on CUDA; the CPU kernels are fastest and exact in fp32
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"lora_ext: dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    return dtype


def _resolve_device(device_map: Any, ignored: list[str]) -> torch.device:
    cuda = torch.cuda.is_available()
    default = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if device_map in (None, "auto", "sequential", "balanced", "balanced_low_0"):
        if device_map not in (None, "sequential") and not cuda:
            ignored.append(f"device_map={device_map!r} (no accelerator: the model loads on the CPU)")
        return default
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"lora_ext: device_map with several devices {sorted(map(str, devices))} is not supported "
                "(the model loads on one device)"
            )
        device_map = devices.pop()
    try:
        device = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"lora_ext: device_map {device_map!r} names no device") from exc
    if device.type == "cuda" and not cuda:
        raise ValueError(f"lora_ext: device_map={device_map!r} asks for CUDA but no CUDA device is available")
    return device


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def _load_tokenizer(folder: str, processor: bool, trust_remote_code: bool):
    from transformers import AutoProcessor, AutoTokenizer

    files = set(os.listdir(folder))
    if processor and files.intersection(_PROCESSOR_FILES):
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if files.intersection(_TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return None


def _model_class(folder: str, vision: bool, trust_remote_code: bool):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    if not vision:
        return transformers.AutoModelForCausalLM
    return getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _from_pretrained(
    model_name: str,
    max_seq_length: int | None,
    dtype: Any,
    load_in_4bit: bool,
    *,
    vision: bool,
    token: Any = None,
    device_map: Any = "sequential",
    trust_remote_code: bool = False,
    revision: str | None = None,
    load_in_16bit: bool = False,
    **kwargs: Any,
):
    where = ("FastVisionModel" if vision else "FastLanguageModel") + ".from_pretrained"
    _check_extra(kwargs, where, tuple(_IGNORED_DEFAULTS))
    if max_seq_length is not None and (
        isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0
    ):
        raise ValueError(f"lora_ext: max_seq_length must be a positive integer or None, got {max_seq_length!r}")
    if load_in_4bit and load_in_16bit:
        raise ValueError("lora_ext: load_in_4bit and load_in_16bit are exclusive")
    ignored: list[str] = []
    device = _resolve_device(device_map, ignored)
    dtype = _resolve_dtype(dtype, device)
    local = os.path.isdir(os.fspath(model_name)) if isinstance(model_name, (str, os.PathLike)) else False
    if local and token is not None:
        ignored.append("token (a local folder needs none)")
    if local and revision is not None:
        ignored.append("revision (a local folder has one)")
    if ignored:
        warnings.warn(f"lora_ext: {where}: {'; '.join(ignored)}", stacklevel=3)
    folder = resolve_folder(model_name, revision=revision, token=token)
    model_class = _model_class(folder, vision, trust_remote_code)
    if load_in_4bit:
        model = load_quantized(model_class, folder, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    else:
        model = model_class.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
        model.eval()
    tokenizer = _load_tokenizer(folder, vision, trust_remote_code)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
        text = _text_config(model)
        limit = getattr(text, "max_position_embeddings", None)
        if isinstance(limit, int) and max_seq_length > limit:
            warnings.warn(
                f"lora_ext: max_seq_length={max_seq_length} exceeds the model's max_position_embeddings={limit}; "
                "no RoPE scaling is applied (set rope_scaling in config.json for that)",
                stacklevel=3,
            )
        tok = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        if tok is not None and hasattr(tok, "model_max_length"):
            tok.model_max_length = max_seq_length
    return model, tokenizer


# --------------------------------------------------------------------------- adapters


def _check_loftq(loftq_config: Any, init_lora_weights: Any) -> None:
    if loftq_config not in (None, {}) or (isinstance(init_lora_weights, str) and init_lora_weights.lower() == "loftq"):
        raise ValueError("lora_ext: LoftQ initialisation is not supported (pass loftq_config=None)")


def _lora_config_kwargs(kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Split off LoraConfig fields (rank_pattern, alpha_pattern, ...) from the rest, which _check_extra vets."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    config_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in fields}
    _check_extra(kwargs, where, tuple(_IGNORED_DEFAULTS))
    return config_kwargs


def _inject_seeded(model: nn.Module, config: LoraConfig, random_state: int | None) -> None:
    if random_state is None:
        inject_adapter(model, config)
        return
    if isinstance(random_state, bool) or not isinstance(random_state, int):
        raise ValueError(f"lora_ext: random_state must be an integer or None, got {random_state!r}")
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):  # the caller's RNG streams are left as they were
        torch.manual_seed(random_state)
        inject_adapter(model, config)


def _finish(model: nn.Module, use_gradient_checkpointing: Any) -> nn.Module:
    enable_checkpointing(model, use_gradient_checkpointing)
    # Notebooks call model.print_trainable_parameters() on what get_peft_model returns (a PeftModel in Unsloth).
    model.print_trainable_parameters = _bound(print_trainable_parameters, model)
    return model


def _bound(fn: Callable, model: nn.Module) -> Callable:
    import weakref

    ref = weakref.ref(model)

    def call() -> None:
        return fn(ref())

    call.__doc__ = fn.__doc__
    return call


def _check_not_injected(model: nn.Module, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"lora_ext: {where} expects the model from from_pretrained (an nn.Module), got {type(model).__name__}"
        )
    if getattr(model, "_lora_ext_state", None) is not None:
        raise ValueError(
            f"lora_ext: {where}: the model already has LoRA adapters (use lora_ext.inject_adapter to add another)"
        )


def _get_peft_model(
    model: nn.Module,
    *,
    where: str,
    target_modules: Any,
    r: int,
    lora_alpha: float,
    lora_dropout: float,
    bias: str,
    layers_to_transform: Any,
    layers_pattern: Any,
    use_gradient_checkpointing: Any,
    random_state: int | None,
    use_rslora: bool,
    modules_to_save: Any,
    init_lora_weights: Any,
    loftq_config: Any,
    kwargs: dict[str, Any],
) -> nn.Module:
    _check_not_injected(model, where)
    _check_loftq(loftq_config, init_lora_weights)
    config_kwargs = _lora_config_kwargs(kwargs, where)
    if use_gradient_checkpointing not in (True, False, None) and not (
        isinstance(use_gradient_checkpointing, str) and use_gradient_checkpointing.lower() == "unsloth"
    ):
        raise ValueError(
            f"lora_ext: use_gradient_checkpointing must be True, False or 'unsloth', got {use_gradient_checkpointing!r}"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules,
        lora_dropout=lora_dropout,
        bias=bias,
        use_rslora=use_rslora,
        init_lora_weights=init_lora_weights,
        modules_to_save=modules_to_save,
        layers_to_transform=layers_to_transform,
        layers_pattern=layers_pattern,
        **config_kwargs,
    )
    if use_gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"lora_ext: {type(model).__name__} does not support gradient checkpointing; pass use_gradient_checkpointing=False"
        )
    _inject_seeded(model, config, random_state)
    return _finish(model, use_gradient_checkpointing)


class FastLanguageModel:
    """Unsloth's ``FastLanguageModel`` API: load (optionally straight into 4 bits), add LoRA, switch modes."""

    @staticmethod
    def from_pretrained(
        model_name: str = "",
        max_seq_length: int | None = 2048,
        dtype: Any = None,
        load_in_4bit: bool = True,
        *,
        token: Any = None,
        device_map: Any = "sequential",
        trust_remote_code: bool = False,
        revision: str | None = None,
        load_in_16bit: bool = False,
        **kwargs: Any,
    ):
        """Load a causal LM from a local folder or a Hub id; returns ``(model, tokenizer)``.

        Args:
            model_name: a ``save_pretrained`` folder (safetensors) or a Hub id.
            max_seq_length: stored as ``model.max_seq_length`` and the tokenizer's ``model_max_length``
                (a warning when it exceeds the model's positions: no RoPE scaling is applied).
            dtype: None (bf16, or fp16 without bf16 support, on CUDA; fp32 on the CPU), or a float dtype.
            load_in_4bit: every linear but the output head becomes a :class:`~lora_ext.LinearNF4` (NF4, double
                quantization, blocksize 64) while the checkpoint loads, tensor by tensor: the full-precision
                model is never in memory.
            device_map: one device (default: the current CUDA device, else the CPU).

        Returns:
            ``(model, tokenizer)``; the tokenizer is None when the folder has none. The model is in eval mode.
        """
        return _from_pretrained(
            model_name, max_seq_length, dtype, load_in_4bit, vision=False, token=token, device_map=device_map,
            trust_remote_code=trust_remote_code, revision=revision, load_in_16bit=load_in_16bit, **kwargs,
        )  # fmt: skip

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        r: int = 16,
        target_modules: Any = None,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: Any = None,
        layers_pattern: Any = None,
        use_gradient_checkpointing: Any = "unsloth",
        random_state: int | None = 3407,
        use_rslora: bool = False,
        modules_to_save: Any = None,
        init_lora_weights: Any = True,
        loftq_config: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Inject LoRA (PEFT's meaning of every argument) and set up checkpointing; returns ``model``.

        Args:
            target_modules: default Unsloth's seven projections (q, k, v, o, gate, up, down).
            use_gradient_checkpointing: True (checkpoint every layer), ``"unsloth"`` (and keep the one saved
                input per layer in CPU memory when the model is on an accelerator), or False.
            random_state: seeds the adapter initialisation (same seed, same factors); the caller's RNG
                state is left unchanged. None: the current RNG state.
            loftq_config: must be None (or ``{}``): LoftQ is not supported.
            kwargs: other :class:`~lora_ext.LoraConfig` fields (``rank_pattern``, ``alpha_pattern``, ...).
        """
        return _get_peft_model(
            model, where="FastLanguageModel.get_peft_model", target_modules=target_modules or list(UNSLOTH_TARGETS),
            r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias, layers_to_transform=layers_to_transform,
            layers_pattern=layers_pattern, use_gradient_checkpointing=use_gradient_checkpointing,
            random_state=random_state, use_rslora=use_rslora, modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights, loftq_config=loftq_config, kwargs=kwargs,
        )  # fmt: skip

    @staticmethod
    def for_inference(model: nn.Module, **kwargs: Any) -> nn.Module:
        """Eval mode, adapters merged (exactly reversible, see :func:`lora_ext.fast.for_inference`)."""
        return for_inference(model, **kwargs)

    @staticmethod
    def for_training(model: nn.Module, **kwargs: Any) -> nn.Module:
        """Undo :meth:`for_inference` exactly: original weights, training mode, trainable adapters."""
        _check_extra(kwargs, "for_training", ("use_gradient_checkpointing",))
        return for_training(model)


def _union_targets(model: nn.Module, selected: list[str], target_modules: Any, layers: Any, pattern: Any) -> list[str]:
    names = list(selected)
    if layers is not None:
        probe = LoraConfig(target_modules=["_"], layers_to_transform=layers, layers_pattern=pattern)
        names = [n for n in names if _targets.layer_selected(probe, n)]
    if target_modules is not None and not (isinstance(target_modules, str) and target_modules.lower() == "all-linear"):
        extra = LoraConfig(target_modules=target_modules)
        matched, _ = _targets.resolve_targets(model, list(_walk(model)), extra, True, kind_of)
        names += [n for n, _ in matched]
    return list(dict.fromkeys(names))


class FastVisionModel(FastLanguageModel):
    """Unsloth's ``FastVisionModel`` API: vision-language models (and vision models such as ViT)."""

    @staticmethod
    def from_pretrained(
        model_name: str = "",
        max_seq_length: int | None = 2048,
        dtype: Any = None,
        load_in_4bit: bool = True,
        *,
        token: Any = None,
        device_map: Any = "sequential",
        trust_remote_code: bool = False,
        revision: str | None = None,
        load_in_16bit: bool = False,
        **kwargs: Any,
    ):
        """As :meth:`FastLanguageModel.from_pretrained`; returns ``(model, processor)`` (the processor, else the
        tokenizer, else None). The model class is the checkpoint's ``architectures`` entry."""
        return _from_pretrained(
            model_name, max_seq_length, dtype, load_in_4bit, vision=True, token=token, device_map=device_map,
            trust_remote_code=trust_remote_code, revision=revision, load_in_16bit=load_in_16bit, **kwargs,
        )  # fmt: skip

    @staticmethod
    def get_peft_model(
        model: nn.Module,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        r: int = 16,
        target_modules: Any = None,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: Any = None,
        layers_pattern: Any = None,
        use_gradient_checkpointing: Any = "unsloth",
        random_state: int | None = 3407,
        use_rslora: bool = False,
        modules_to_save: Any = None,
        init_lora_weights: Any = True,
        loftq_config: Any = None,
        **kwargs: Any,
    ) -> nn.Module:
        """Inject LoRA into the linears the four switches select; returns ``model``.

        The switches choose the vision tower's and/or the language model's attention and/or MLP projections,
        found by tower, block and sub-block type (:mod:`lora_ext.fast.vision`), not by name patterns. The
        projector between the towers is never selected by them. ``target_modules`` (names or a regex, PEFT's
        rules) adds modules to the selection (Unsloth replaces the selection with it); ``"all-linear"`` or None
        means the switches alone. ``layers_to_transform`` filters the switches' selection by layer index.
        """
        where = "FastVisionModel.get_peft_model"
        _check_not_injected(model, where)
        for flag_name, flag in (
            ("finetune_vision_layers", finetune_vision_layers),
            ("finetune_language_layers", finetune_language_layers),
            ("finetune_attention_modules", finetune_attention_modules),
            ("finetune_mlp_modules", finetune_mlp_modules),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"lora_ext: {where}: {flag_name} must be a bool, got {flag!r}")
        selected = select_linears(
            model,
            vision=finetune_vision_layers,
            language=finetune_language_layers,
            attention=finetune_attention_modules,
            mlp=finetune_mlp_modules,
        )
        names = _union_targets(model, selected, target_modules, layers_to_transform, layers_pattern)
        if not names:
            raise ValueError(
                f"lora_ext: {where}: the switches (vision={finetune_vision_layers}, language={finetune_language_layers}, "
                f"attention={finetune_attention_modules}, mlp={finetune_mlp_modules}) and target_modules="
                f"{target_modules!r} select no layer of {type(model).__name__}"
            )
        return _get_peft_model(
            model, where=where, target_modules=names, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            bias=bias, layers_to_transform=None, layers_pattern=None,
            use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state, use_rslora=use_rslora,
            modules_to_save=modules_to_save, init_lora_weights=init_lora_weights, loftq_config=loftq_config,
            kwargs=kwargs,
        )  # fmt: skip
