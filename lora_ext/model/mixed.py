"""``model(..., adapter_names=[...])``: mixed-adapter batches at the model level (PEFT's API).

One name per batch row (``"__base__"``: the base model for that row). A forward
pre-hook on the model takes the keyword out of the call, validates it against
the model's adapters and every LoRA layer, then hands the names to the layers
for this one forward (lora_ext/nn/mixed.py); a forward hook that runs even when
the forward raises takes them back. Works in eval and in training (each
adapter's gradients come from its own rows only; PEFT refuses training).

Anything that cannot be honoured raises ValueError before the forward runs:
an unknown name, a name list whose length is not the batch size, merged
adapters, ``disable_adapters()``, gradient checkpointing in training (its
recomputation runs after the hook has taken the names back), and a layer type
without mixed support (named) that holds one of the requested adapters.
Layers that hold none of them compute the base output for every row.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..nn.layers import LoraLayer, ModulesToSaveWrapper
from ..nn.mixed import BASE_NAME, mixed_support

_STATE_ATTR = "_lora_ext_state"  # lora_ext/model/inject.py
_BATCH_KWARGS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "x")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for a in args[:1]:
        if isinstance(a, Tensor) and a.dim() > 0:
            return a.shape[0]
    for key in _BATCH_KWARGS:
        v = kwargs.get(key)
        if isinstance(v, Tensor) and v.dim() > 0:
            return v.shape[0]
    return None


class MixedBatchHooks:
    """The pre/post forward hooks of one model; ``remove()`` takes both off (unload)."""

    def __init__(self, root: nn.Module) -> None:
        self._touched: list[tuple[nn.Module, bool]] = []  # (module, whether we disabled it)
        self._pre = root.register_forward_pre_hook(self._before, with_kwargs=True)
        self._post = root.register_forward_hook(self._after, always_call=True)

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

    def _before(self, root: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if "adapter_names" not in kwargs:
            return None
        kwargs = dict(kwargs)
        names = kwargs.pop("adapter_names")
        if names is None:
            return args, kwargs
        plan = self._plan(root, names, args, kwargs)
        self._reset()
        for module, disable in plan:
            if disable:
                module._disable_adapters = True
            else:
                module._mixed_adapter_names = list(names)
            self._touched.append((module, disable))
        return args, kwargs

    def _after(self, root: nn.Module, args: Any, output: Any) -> None:
        self._reset()

    def _reset(self) -> None:
        for module, disable in self._touched:
            if disable:
                module._disable_adapters = False
            else:
                module._mixed_adapter_names = None
        self._touched = []

    def _plan(self, root: nn.Module, names: object, args: tuple, kwargs: dict) -> list[tuple[nn.Module, bool]]:
        """Validate everything; (module, disable) for each layer to switch for this forward."""
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"lora_ext: adapter_names must be a list of str (one per batch row), got {names!r}")
        state = getattr(root, _STATE_ATTR, None)
        configs = state.configs if state is not None else {}
        unknown = sorted({n for n in names if n != BASE_NAME and n not in configs})
        if unknown:
            raise ValueError(
                f"lora_ext: unknown adapter(s) {unknown} in adapter_names; the model has {list(configs)} "
                f"(and {BASE_NAME!r} for the base model)"
            )
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(names):
            raise ValueError(f"lora_ext: adapter_names has {len(names)} entries but the batch has {batch} rows")
        if root.training and getattr(root, "is_gradient_checkpointing", False):
            raise ValueError(
                "lora_ext: adapter_names in training with gradient checkpointing is not supported "
                "(the recomputed forward would not see the names)"
            )
        requested = set(names) - {BASE_NAME}
        plan = []
        for path, m in root.named_modules():
            if not isinstance(m, (LoraLayer, ModulesToSaveWrapper)):
                continue
            held = requested & set(m.adapters)
            if getattr(m, "_disable_adapters", False):
                raise ValueError("lora_ext: adapter_names cannot be honoured inside disable_adapters()")
            if isinstance(m, LoraLayer) and m.merged_adapters:
                raise ValueError(
                    f"lora_ext: adapter_names cannot be honoured while adapters are merged ({path}: "
                    f"{m.merged_adapters}); call lora_ext.unmerge_adapter(model) first"
                )
            magnitudes = getattr(m, "lora_magnitude_vector", None)
            if held and magnitudes is not None and len(magnitudes):
                # DoRA layers (lora_ext/nn/dora.py: a forward of their own) are not routed row by row.
                raise ValueError(
                    f"lora_ext: adapter_names is not supported on a layer with DoRA adapters ({path}, "
                    f"{type(m).__name__}: {sorted(magnitudes.keys())}), as in PEFT"
                )
            if mixed_support(m) and not (magnitudes is not None and len(magnitudes)):
                plan.append((m, False))
            elif held:
                raise ValueError(
                    f"lora_ext: {type(m).__name__} ({path}) has no mixed-adapter support, and adapter_names asks "
                    f"for its adapter(s) {sorted(held)}"
                )
            else:
                plan.append((m, True))  # none of the requested adapters here: base output for every row
        return plan
