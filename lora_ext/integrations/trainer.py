"""A model injected by lora_ext saves and resumes like a PEFT model in ``transformers.Trainer``.

How Trainer decides (transformers 5.x):

- saving (``save_model()`` and every checkpoint): ``Trainer._save`` calls
  ``model.save_pretrained(output_dir, state_dict=..., is_main_process=...)`` on a
  ``PreTrainedModel``. :func:`install` gives the injected model its own
  ``save_pretrained`` (an instance attribute, nothing global): it writes the
  adapters only, in PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``; adapters other than ``"default"`` in a
  sub-folder named after them, as ``PeftModel.save_pretrained``), loadable by
  ``PeftModel.from_pretrained`` and :func:`lora_ext.load_adapter`.
- resuming (``train(resume_from_checkpoint=...)``) and ``load_best_model_at_end``:
  ``Trainer._load_from_checkpoint`` / ``_load_best_model`` read adapter
  checkpoints only for ``peft.PeftModel`` instances (an ``isinstance`` check the
  model cannot answer), and otherwise look for full weights. These two methods
  are the one thing wrapped on the ``Trainer`` class, the first time an adapter
  is injected into a transformers model; the wrappers act only when the model
  was injected by lora_ext *and* the checkpoint holds ``adapter_config.json``
  (then the saved factors are copied into the existing adapter parameters,
  :func:`lora_ext.model.io.restore_adapter`), and call Trainer's own code for
  every other model and checkpoint.

:func:`uninstall` (run by ``unload``/``merge_and_unload``/deleting the last
adapter) restores the model's own ``save_pretrained``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import nn

__all__ = ["install", "is_transformers_model", "uninstall"]

_SAVER_ATTR = "save_pretrained"
_WRAPPED_FLAG = "_lora_ext_wrapped"

# save_pretrained keywords that are harmless at these values; any other value would be ignored, so it is refused.
_NEUTRAL_KWARGS: dict[str, Any] = {
    "push_to_hub": False,
    "safe_serialization": True,
    "save_peft_format": True,
    "variant": None,
    "token": None,
    "save_embedding_layers": "auto",
    "max_shard_size": None,
}


def is_transformers_model(module: nn.Module) -> bool:
    """``module`` is a ``transformers.PreTrainedModel`` (checked without importing transformers)."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(module).__mro__
    )


class _AdapterSaver:
    """``model.save_pretrained`` of an injected model: adapters only, PEFT's layout.

    Holds the model strongly (not a bound method), so ``copy.deepcopy(model)``
    gives the copy a saver of the copy.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        selected_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        from ..model.inject import _state
        from ..model.io import _adapter_state_dict, _write_adapter

        for key, value in kwargs.items():
            if key not in _NEUTRAL_KWARGS or (value != _NEUTRAL_KWARGS[key] and key != "max_shard_size"):
                raise TypeError(
                    f"lora_ext: save_pretrained of a model with lora_ext adapters writes the adapters in PEFT's "
                    f"format and does not support {key}={value!r}"
                )
        if os.path.isfile(save_directory):
            raise ValueError(f"lora_ext: save_pretrained needs a directory, {str(save_directory)!r} is a file")
        root = self.model
        state = _state(root)
        names = list(state.configs) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in state.configs]
        if unknown:
            raise ValueError(f"lora_ext: unknown adapters {unknown}; the model has adapters {list(state.configs)}")
        if not is_main_process:
            return
        for name in names:
            config = state.configs[name]
            tensors = _adapter_state_dict(root, name, config)
            if state_dict is not None:  # e.g. gathered from FSDP/DeepSpeed shards by Trainer: its values win
                tensors = _values_from(root, name, config, tensors, state_dict)
            path = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            _write_adapter(root, path, config, tensors)


def _values_from(root: nn.Module, name: str, config: Any, tensors: dict, state_dict: dict) -> dict:
    """The adapter tensors, taken from ``state_dict`` (keys of ``root.state_dict()``) where it has them."""
    from ..model.io import _adapter_tensors

    key_of = {id(t): k for k, t in root.state_dict(keep_vars=True).items()}
    out = dict(tensors)
    for peft_key, live in _adapter_tensors(root, name, config).items():
        module_key = key_of.get(id(live))
        if module_key is not None and module_key in state_dict:
            out[peft_key] = state_dict[module_key].detach().to("cpu").contiguous()
    return out


def install(model: nn.Module) -> None:
    """Give an injected transformers model its adapter-only ``save_pretrained``; wrap Trainer's loaders once."""
    if not is_transformers_model(model):
        return
    setattr(model, _SAVER_ATTR, _AdapterSaver(model))
    _wrap_trainer()


def uninstall(model: nn.Module) -> None:
    """Restore the model's own ``save_pretrained``."""
    if isinstance(vars(model).get(_SAVER_ATTR), _AdapterSaver):
        delattr(model, _SAVER_ATTR)


def _injected_root(model: Any) -> nn.Module | None:
    from ..model.inject import _STATE_ATTR

    seen = 0
    while isinstance(model, nn.Module) and seen < 8:  # DDP / accelerate / torch.compile wrappers
        if getattr(model, _STATE_ATTR, None) is not None and isinstance(vars(model).get(_SAVER_ATTR), _AdapterSaver):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        seen += 1
    return None


def _restore_all(root: nn.Module, checkpoint: str) -> None:
    from ..model.inject import _state
    from ..model.io import restore_adapter

    for name in _state(root).configs:
        path = checkpoint if name == "default" else os.path.join(checkpoint, name)
        restore_adapter(root, path, name)


def _is_adapter_checkpoint(checkpoint: str | None) -> bool:
    return checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))


def _wrap_trainer() -> None:
    try:
        import transformers
    except Exception:  # noqa: BLE001 - no (working) transformers: nothing to wrap
        return
    trainer_cls = transformers.Trainer
    original_load = trainer_cls._load_from_checkpoint
    if getattr(original_load, _WRAPPED_FLAG, False):
        return
    original_best = trainer_cls._load_best_model

    @functools.wraps(original_load)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        root = _injected_root(model if model is not None else self.model)
        if root is not None and _is_adapter_checkpoint(resume_from_checkpoint):
            return _restore_all(root, resume_from_checkpoint)
        return original_load(self, resume_from_checkpoint, model)

    @functools.wraps(original_best)
    def _load_best_model(self):
        root = _injected_root(self.model)
        if root is not None and _is_adapter_checkpoint(self.state.best_model_checkpoint):
            return _restore_all(root, self.state.best_model_checkpoint)
        return original_best(self)

    setattr(_load_from_checkpoint, _WRAPPED_FLAG, True)
    setattr(_load_best_model, _WRAPPED_FLAG, True)
    trainer_cls._load_from_checkpoint = _load_from_checkpoint
    trainer_cls._load_best_model = _load_best_model
