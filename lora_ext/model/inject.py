"""Model-level API: inject LoRA into any ``nn.Module``, manage adapters, merge and unload.

The model stays a plain ``nn.Module`` (any training loop, the Hugging Face
Trainer included). Matching children (lora_ext/targets.py) are replaced in
place by the LoRA layer the table of lora_ext/nn/dispatch.py names for their
type; the per-model adapter registry lives in one attribute,
``model._lora_ext_state``.

Every public function validates everything before it mutates anything, so a
bad call raises and leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import targets as _targets
from ..integrations import trainer as _trainer
from ..nn.conv import resolve_fan_in_fan_out
from ..nn.dispatch import kind_of, wrap
from ..nn.dora import DORA_MAGNITUDE_KEY, as_dora
from ..nn.layers import LoraLayer, ModulesToSaveWrapper
from ..quant.linear import LinearNF4
from .config import LoraConfig
from .mixed import MixedBatchHooks

__all__ = [
    "active_adapter",
    "active_adapters",
    "delete_adapter",
    "disable_adapters",
    "inject_adapter",
    "lora_layers",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]

_STATE_ATTR = "_lora_ext_state"


@dataclass
class LoraState:
    """The adapters injected into a model: their configs and which are active."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: tuple[str, ...] = ()
    hook: Any = None  # the adapter_names hooks (lora_ext/model/mixed.py; removed by unload)


@dataclass
class _Target:
    name: str  # full module name
    module: nn.Module  # nn.Linear / nn.Embedding, or an existing LoRA layer
    r: int
    alpha: float
    use_dora: bool = False

    @property
    def kind(self) -> str:
        return kind_of(self.module).name

    def factor_shapes(self) -> dict[str, tuple[int, int]]:
        """Expected shapes of the adapter tensors, by PEFT key suffix."""
        shapes = kind_of(self.module).shapes(self.module, self.r)
        if self.use_dora:
            shapes[DORA_MAGNITUDE_KEY] = (shapes["lora_B.weight"][0],)
        return shapes


# ----------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module under torch.compile / DDP wrappers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lora_ext: expected an nn.Module, got {type(model).__name__}")
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _state(model: nn.Module, required: bool = True) -> LoraState | None:
    state = getattr(model, _STATE_ATTR, None)
    if state is None and required:
        raise ValueError("lora_ext: this model has no LoRA adapters (call lora_ext.inject_adapter first)")
    return state


def _check_names(state: LoraState, names: list[str]) -> None:
    for n in names:
        if n not in state.configs:
            raise ValueError(f"lora_ext: unknown adapter {n!r}; the model has adapters {list(state.configs)}")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(name, layer)`` for every LoRA layer of the model."""
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _wrappers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            yield name, module


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _walk(module: nn.Module, prefix: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that does not descend into LoRA layers or modules_to_save wrappers."""
    seen = set() if seen is None else seen
    for child_name, child in module.named_children():
        if id(child) in seen:
            continue
        seen.add(id(child))
        full = f"{prefix}.{child_name}" if prefix else child_name
        yield full, child
        if not isinstance(child, (LoraLayer, ModulesToSaveWrapper)):
            yield from _walk(child, full, seen)


def _adapter_dtype(base: nn.Module, autocast_adapter_dtype: bool) -> torch.dtype:
    dtype = base.weight.dtype
    # As PEFT's get_peft_model(autocast_adapter_dtype=True): low-precision bases get fp32 adapters.
    if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _as_lora_config(config: Any) -> LoraConfig:
    # a peft.LoraConfig is converted; its task_type adds PEFT's per-task modules_to_save
    return LoraConfig.from_peft(config).with_task_modules()


# ------------------------------------------------------------------------ inject


def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    *,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to the modules matched by ``config``; returns ``model``.

    The first call freezes every parameter of the model and activates the
    adapter; later calls with another name add an adapter to the same (and any
    newly matched) layers, inactive until :func:`set_adapter` (as PEFT).

    Args:
        model: any ``nn.Module`` (a torch.compile or DDP wrapper is looked through).
        config: a :class:`LoraConfig` (a ``peft.LoraConfig`` is converted).
        adapter_name: a new name without ``"."``.
        autocast_adapter_dtype: fp16/bf16 base layers get fp32 adapter factors
            (PEFT's default); False keeps the base dtype.

    Raises:
        ValueError: unknown or unmatched targets, unsupported module types,
            a bad rank/alpha, or a duplicate adapter name. The model is unchanged.
    """
    return _inject(model, config, adapter_name, strict=True, autocast_adapter_dtype=autocast_adapter_dtype)


def _inject(
    model: nn.Module,
    config: Any,
    adapter_name: str,
    *,
    strict: bool,
    autocast_adapter_dtype: bool = True,
    weights: dict[str, dict[str, Tensor]] | None = None,
    module_weights: dict[str, dict[str, Tensor]] | None = None,
) -> nn.Module:
    """Validate everything, then mutate. ``weights``: exact factors by module name (from a file)."""
    root = _unwrap(model)
    config = _as_lora_config(config)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"lora_ext: adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    state = _state(root, required=False)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"lora_ext: the model already has an adapter named {adapter_name!r}")
    if state is not None and any(layer.disabled for _, layer in lora_layers(root)):
        raise ValueError("lora_ext: cannot add an adapter inside disable_adapters()")

    candidates = list(_walk(root))
    matched, resolved_tm = _targets.resolve_targets(root, candidates, config, strict, kind_of)
    targets = []
    for name, module in matched:
        r, alpha = config.rank_and_alpha(name)
        kind_of(module).validate(module, r)
        targets.append(_Target(name, module, r, alpha, config.use_dora))
    if config.use_dora:
        _check_dora_targets(targets)
    # PEFT never refuses a modules_to_save entry that matches nothing, nor do we; the user's own
    # entries of inject_adapter get a warning (a typo is seen), those a task type adds and a
    # file's (load_adapter, whose tensors are checked instead) none.
    tolerated = config.task_modules_to_save() if strict else (config.modules_to_save or [])
    mts = _targets.resolve_modules_to_save(candidates, config, {t.name for t in targets}, tolerated)
    bases = [t.module.base_layer if isinstance(t.module, LoraLayer) else t.module for t in targets]
    fan_in_fan_out = resolve_fan_in_fan_out(config.fan_in_fan_out, bases)
    if weights is not None:
        _check_weights(targets, weights)
    if module_weights is not None:
        _check_module_weights(mts, module_weights)

    # ---- nothing above mutated the model; from here on only memory errors can stop us
    first = state is None
    if first:
        for p in root.parameters():
            p.requires_grad_(False)
        state = LoraState()
    active = state.active if not first else (adapter_name,)
    for t in targets:
        layer = t.module
        if not isinstance(layer, LoraLayer):
            layer = wrap(layer)
            layer.train(t.module.training)  # a model in eval mode stays in eval mode (no dropout)
            layer.set_active(active)
            _set_child(root, t.name, layer)
        if config.use_dora:
            layer = as_dora(layer)
        layer.add_adapter(
            adapter_name,
            t.r,
            t.alpha,
            lora_dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
            dtype=_adapter_dtype(layer.base_layer, autocast_adapter_dtype),
            weights=None if weights is None else weights[t.name],
            **({"use_dora": True} if config.use_dora else {}),
        )
    for name, module in mts:
        wrapper = module
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(module)
            wrapper.train(module.training)
            wrapper.set_active(active)
            _set_child(root, name, wrapper)
        wrapper.add_adapter(adapter_name)
        if module_weights is not None:
            wrapper.modules_to_save[adapter_name].load_state_dict(module_weights[name])

    stored = dataclasses.replace(config, target_modules=resolved_tm, fan_in_fan_out=fan_in_fan_out)
    state.configs[adapter_name] = stored
    if first:
        setattr(root, _STATE_ATTR, state)
        state.active = (adapter_name,)
        state.hook = MixedBatchHooks(root)
        _trainer.install(root)  # a transformers model: adapter-only save_pretrained (Trainer checkpoints)
    _apply_active(root, state.active)
    if adapter_name in state.active:
        _apply_bias_option(root, config, adapter_name)
    return model


def _check_dora_targets(targets: list[_Target]) -> None:
    """use_dora: every target must be (or wrap) a plain nn.Linear (lora_ext/nn/dora.py)."""
    from ..nn.layers import LoraLinear

    for t in targets:
        if kind_of(t.module).lora_class is not LoraLinear:
            raise ValueError(
                f"lora_ext: use_dora=True is implemented for nn.Linear layers only; {t.name!r} is a "
                f"{type(t.module).__name__} (leave it out of target_modules, or use a plain LoRA adapter)"
            )


def _check_weights(targets: list[_Target], weights: dict[str, dict[str, Tensor]]) -> None:
    planned = {t.name for t in targets}
    missing = sorted(planned - set(weights))
    extra = sorted(set(weights) - planned)
    if extra:
        raise ValueError(
            f"lora_ext: the adapter file has weights for modules the config does not target or the model lacks: {extra[:8]}"
        )
    if missing:
        raise ValueError(f"lora_ext: the adapter file has no weights for targeted modules {missing[:8]}")
    for t in targets:
        expected = t.factor_shapes()
        got = weights[t.name]
        if set(got) != set(expected):
            raise ValueError(
                f"lora_ext: module {t.name!r} ({t.kind}) needs tensors {sorted(expected)}, the file has {sorted(got)}"
            )
        for suffix, shape in expected.items():
            if tuple(got[suffix].shape) != shape:
                raise ValueError(
                    f"lora_ext: shape mismatch for {t.name}.{suffix}: the file has {list(got[suffix].shape)}, "
                    f"the model needs {list(shape)} (r={t.r})"
                )


def _check_module_weights(mts: list[tuple[str, nn.Module]], module_weights: dict[str, dict[str, Tensor]]) -> None:
    names = {n for n, _ in mts}
    extra = sorted(set(module_weights) - names)
    missing = sorted(names - set(module_weights))
    if extra or missing:
        raise ValueError(
            f"lora_ext: modules_to_save weights do not match the model: missing {missing}, unexpected {extra}"
        )
    for name, module in mts:
        ref = (module.original_module if isinstance(module, ModulesToSaveWrapper) else module).state_dict()
        got = module_weights[name]
        if set(got) != set(ref):
            raise ValueError(f"lora_ext: modules_to_save {name!r} needs keys {sorted(ref)}, the file has {sorted(got)}")
        for k, v in got.items():
            if tuple(v.shape) != tuple(ref[k].shape):
                raise ValueError(
                    f"lora_ext: shape mismatch for {name}.{k}: the file has {list(v.shape)}, the model needs {list(ref[k].shape)}"
                )


def _apply_active(root: nn.Module, active: tuple[str, ...]) -> None:
    for _, module in _wrappers(root):
        module.set_active(active)


def _apply_bias_option(root: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    if config.bias == "all":
        for n, p in root.named_parameters():
            if "bias" in n and ".lora_" not in n and ".original_module." not in n:
                p.requires_grad_(True)
    elif config.bias == "lora_only":
        for _, layer in lora_layers(root):
            bias = getattr(layer.base_layer, "bias", None)
            if adapter_name in layer.adapters and isinstance(bias, Tensor):
                bias.requires_grad_(True)


# ------------------------------------------------------------------- adapters


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` (or several names, summed) the active adapter(s).

    Only active adapters' parameters train. On a merged model the merged
    adapters are unmerged first (with a warning), as PEFT does; merge again with
    :func:`merge_adapter`.
    """
    root = _unwrap(model)
    state = _state(root)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    if not names:
        raise ValueError("lora_ext: set_adapter needs at least one adapter name")
    _check_names(state, names)
    if any(layer.disabled for _, layer in lora_layers(root)):
        raise ValueError("lora_ext: cannot switch adapters inside disable_adapters()")
    if tuple(names) == state.active:
        return
    if any(layer.merged for _, layer in lora_layers(root)):
        warnings.warn(
            f"lora_ext: switching from merged adapter(s) {list(state.active)} to {names}: unmerging first",
            stacklevel=2,
        )
        for _, layer in lora_layers(root):
            layer.unmerge()
    state.active = tuple(names)
    _apply_active(root, state.active)


def active_adapter(model: nn.Module) -> str | list[str]:
    """The active adapter's name (a list when several are active)."""
    state = _state(_unwrap(model))
    return state.active[0] if len(state.active) == 1 else list(state.active)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters' names (empty list for a model without adapters)."""
    state = _state(_unwrap(model), required=False)
    return [] if state is None else list(state.active)


def adapter_config(model: nn.Module, adapter_name: str = "default") -> LoraConfig:
    """The (resolved) config of adapter ``adapter_name``."""
    state = _state(_unwrap(model))
    _check_names(state, [adapter_name])
    return state.configs[adapter_name]


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove adapter ``adapter_name``; layers left without adapters become plain layers again.

    If it was active, the first remaining adapter becomes active (as PEFT). If it
    was merged, it is unmerged first.
    """
    root = _unwrap(model)
    state = _state(root)
    _check_names(state, [adapter_name])
    if any(layer.disabled for _, layer in lora_layers(root)):
        raise ValueError("lora_ext: cannot delete an adapter inside disable_adapters()")
    wrappers = list(_wrappers(root))
    for _, module in wrappers:
        if isinstance(module, LoraLayer) and adapter_name in module.merged_adapters:
            module.unmerge()
    for name, module in wrappers:
        if adapter_name not in module.adapters:
            continue
        module.delete_adapter(adapter_name)
        if not module.adapters:
            base = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            _set_child(root, name, base)
    del state.configs[adapter_name]
    if not state.configs:
        _drop_state(root)
        return
    if adapter_name in state.active:
        remaining = tuple(a for a in state.active if a != adapter_name)
        state.active = remaining or (next(iter(state.configs)),)
    _apply_active(root, state.active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes the base model only.

    A merged model is unmerged on entry and merged again on exit (so its
    weights go through one unmerge/merge cycle).
    """
    root = _unwrap(model)
    _state(root)
    wrappers = [m for _, m in _wrappers(root)]
    if any(getattr(m, "_disable_adapters", False) for m in wrappers):
        raise ValueError("lora_ext: disable_adapters() is already active on this model")
    merged = {
        id(m): (list(m.merged_adapters), bool(m._merge_records))
        for m in wrappers
        if isinstance(m, LoraLayer) and m.merged
    }
    for m in wrappers:
        if isinstance(m, LoraLayer):
            m.unmerge()
    for m in wrappers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m in wrappers:
            m._disable_adapters = False
        for m in wrappers:
            if id(m) in merged:
                names, exact = merged[id(m)]
                m.merge(adapter_names=names, exact=exact)


# ------------------------------------------------------------------------ merge


def _check_tied(layers: list[tuple[str, LoraLayer]]) -> None:
    owners: dict[int, str] = {}
    for name, layer in layers:
        key = layer.base_layer.weight.data_ptr()
        if key in owners:
            raise ValueError(
                f"lora_ext: {owners[key]!r} and {name!r} share one base weight (tied weights); merging both "
                "would add two deltas to it. Untie the weights or target only one of them."
            )
        owners[key] = name


def merge_adapter(model: nn.Module, safe_merge: bool = False, exact: bool = True) -> None:
    """Merge the active adapter(s) into the base weights: ``W += s · B A``, fp32 accumulation, one rounding.

    ``exact`` (the default; fp32/fp16/bf16 weights): each layer keeps a record of the elements
    that ``W' − s·BA`` would not restore, so :func:`unmerge_adapter` gives the weights back bit
    for bit after any number of cycles (``memory_report(model)["merge_record_bytes"]``);
    ``exact=False`` keeps no record. Merging an already merged model warns and does nothing. With
    ``safe_merge=True`` every merged weight is computed and checked first;
    if any is non-finite, ``ValueError`` names the layer and no weight changes.
    """
    root = _unwrap(model)
    _state(root)
    layers = [(n, layer) for n, layer in lora_layers(root) if layer.active_adapters]
    if any(layer.disabled for _, layer in layers):
        raise ValueError("lora_ext: cannot merge inside disable_adapters()")
    if any(layer.merged for _, layer in layers):
        warnings.warn("lora_ext: the model is already merged; nothing to do", stacklevel=2)
        return
    _check_tied(layers)
    for name, layer in layers:  # a layer that cannot merge at all refuses before any layer changes
        layer.check_mergeable(name)
    if safe_merge:
        with torch.no_grad():
            for name, layer in layers:
                if not torch.isfinite(layer.merged_weight()).all():
                    raise ValueError(
                        f"lora_ext: merging adapter(s) {layer.active_adapters} into {name!r} gives non-finite "
                        "weights; nothing was merged"
                    )
    for _, layer in layers:
        layer.merge(exact=exact)


def unmerge_adapter(model: nn.Module) -> None:
    """Subtract the merged adapters from the base weights (warns if nothing is merged)."""
    root = _unwrap(model)
    _state(root)
    layers = [layer for _, layer in lora_layers(root) if layer.merged]
    if not layers:
        warnings.warn("lora_ext: the model is not merged; nothing to do", stacklevel=2)
        return
    for layer in layers:
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapter(s) and put plain ``nn.Linear``/``nn.Embedding`` back; returns ``model``.

    modules_to_save wrappers are replaced by the active adapter's trained copy.
    """
    root = _unwrap(model)
    _state(root)
    if not any(layer.merged for _, layer in lora_layers(root)):
        merge_adapter(root, safe_merge=safe_merge, exact=False)  # nothing will be unmerged
    return _unload(root, model)


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters without merging (unmerging first if merged); returns ``model``."""
    root = _unwrap(model)
    _state(root)
    for _, layer in lora_layers(root):
        layer.unmerge()
    return _unload(root, model)


def _unload(root: nn.Module, model: nn.Module) -> nn.Module:
    for name, module in list(_wrappers(root)):
        if isinstance(module, LoraLayer):
            _set_child(root, name, module.base_layer)
        else:
            _set_child(root, name, module.active_module())
    _drop_state(root)
    return model


def _drop_state(root: nn.Module) -> None:
    state = getattr(root, _STATE_ATTR)
    if state.hook is not None:
        state.hook.remove()
    _trainer.uninstall(root)
    delattr(root, _STATE_ATTR)


# ------------------------------------------------------------------ statistics


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once).

    A 4-bit weight (LinearNF4's packed codes, two per byte) counts two parameters per byte, as PEFT counts
    bitsandbytes' ``Params4bit``.
    """
    root = _unwrap(model)
    packed = {id(m.weight) for m in root.modules() if isinstance(m, LinearNF4)}
    trainable = total = 0
    for p in root.parameters():
        n = p.numel() * (2 if id(p) in packed else 1)
        if type(p).__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte (PEFT's count)
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: … || all params: … || trainable%: …`` (PEFT's format)."""
    trainable, total = trainable_parameters(model)
    pct = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
