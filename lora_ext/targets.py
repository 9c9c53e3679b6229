"""Target matching: which modules of a model a LoRA config (or ``quantize_model``) selects.

PEFT's rules, in one place:

- ``target_modules`` as a list: a module is selected when its full name equals
  an entry or ends with ``"." + entry``; as a string: a regex that must match the
  full name (``re.fullmatch``); ``"all-linear"``: every linear layer except the
  output head (and ``nn.MultiheadAttention.out_proj``, which reads its weight
  directly); "linear" is ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2).
- ``exclude_modules``: checked first, with the same list/regex rules; an
  excluded module is never adapted (PEFT's ``check_target_module_exists``).
- ``layers_to_transform`` / ``layers_pattern``: the layer index is the first
  ``.<name>.<int>.`` segment of the name, or the one after a ``layers_pattern``.
- ``modules_to_save``: a plain suffix match of the full name.
- ``rank_pattern`` / ``alpha_pattern`` keys: a regex over a dot-separated suffix.

Nothing here knows the layer classes: the callers pass ``kind_of`` (the table of
:mod:`lora_ext.nn.dispatch`), so that quantization and injection share the rules
without importing each other.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

ALL_LINEAR = "all-linear"


def suffix_match(name: str, entry: str) -> bool:
    """PEFT's list rule: ``name`` is ``entry`` or ends with ``"." + entry``."""
    return name == entry or name.endswith("." + entry)


def within_any(name: str, entries: Iterable[str]) -> bool:
    """``name`` is one of the modules selected by ``entries`` (suffix rule) or lies inside one of them."""
    dotted = f".{name}."
    return any(suffix_match(name, e) or name.startswith(e + ".") or f".{e}." in dotted for e in entries)


def pattern_matches(pattern: str, module_name: str) -> bool:
    """PEFT's ``get_pattern_key``: the pattern must match a dot-separated suffix of the name."""
    return re.match(rf"(.*\.)?({pattern})$", module_name) is not None


def layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index of module ``key``: the first ``.<name>.<int>.`` segment, or the one after a pattern."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def layer_selected(config: Any, key: str) -> bool:
    """``config.layers_to_transform`` admits module ``key`` (always, when it is unset)."""
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    idx = layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def is_excluded(config: Any, key: str) -> bool:
    """Module ``key`` is excluded by ``config.exclude_modules`` (a regex string or a list of names)."""
    ex = getattr(config, "exclude_modules", None)
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, key) is not None
    return key in ex or any(key.endswith("." + e) for e in ex)


def in_modules_to_save(config: Any, key: str) -> bool:
    """Module ``key`` lies in (or is) one of ``config.modules_to_save``."""
    return bool(config.modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.modules_to_save)


def output_head_name(root: nn.Module, candidates: list[tuple[str, nn.Module]]) -> str | None:
    """Name of the model's output head (``get_output_embeddings()``) among ``candidates``, or None."""
    get = getattr(root, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        head = get()
    except Exception:  # noqa: BLE001 - a model without a head may raise anything here
        return None
    if head is None:
        return None
    for name, module in candidates:
        if module is head or getattr(module, "base_layer", None) is head:
            return name
    return None


KindOf = Callable[[nn.Module], Any]  # module -> its row of lora_ext.nn.dispatch.LAYER_TABLE, or None


def resolve_targets(
    root: nn.Module, candidates: list[tuple[str, nn.Module]], config: Any, strict: bool, kind_of: KindOf
) -> tuple[list[tuple[str, nn.Module]], Any]:
    """Modules matched by ``config.target_modules`` (type-checked) and the resolved target_modules.

    ``candidates`` are the model's modules outside LoRA layers, ``kind_of`` says
    what a module is (None: not adaptable).
    """
    tm = config.target_modules
    mha_children = {
        f"{n}.out_proj" if n else "out_proj" for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)
    }
    all_linear = isinstance(tm, str) and tm.lower() == ALL_LINEAR
    if all_linear:
        head = output_head_name(root, candidates)
        tm = sorted(
            n
            for n, m in candidates
            if (kind := kind_of(m)) is not None and kind.linear and n != head and n not in mha_children
        )
        if not tm:
            raise ValueError(
                "lora_ext: target_modules='all-linear' but the model has no linear layer (nn.Linear or "
                "transformers Conv1D) to adapt"
            )

    matched: list[tuple[str, nn.Module]] = []
    entry_hits: dict[str, int] = {t: 0 for t in tm} if isinstance(tm, list) else {}
    excluded: list[str] = []  # every module exclude_modules names (PEFT's count, targeted or not)
    for key, module in candidates:
        # An excluded module still counts as a hit of its target_modules entry (the entry is not a typo).
        skip = is_excluded(config, key)
        if skip:
            excluded.append(key)
        if in_modules_to_save(config, key):
            continue
        if isinstance(tm, str):
            found = re.fullmatch(tm, key) is not None
        elif key in tm:
            entry_hits[key] += 1
            found = True
            if all_linear and config.layers_to_transform is not None:
                found = layer_selected(config, key)
        else:
            hits = [t for t in tm if key.endswith("." + t)]
            for t in hits:
                entry_hits[t] += 1
            found = bool(hits) and layer_selected(config, key)
        if found and not skip:
            matched.append((key, module))

    unmatched = [t for t, c in entry_hits.items() if c == 0]
    if strict and unmatched and not all_linear:
        raise ValueError(
            f"lora_ext: target_modules entries {unmatched} match no module of the model "
            f"(module names look like {[n for n, _ in candidates[:6]]} ...)"
        )
    if not matched and excluded:
        raise ValueError(
            f"lora_ext: target_modules={config.target_modules!r} with exclude_modules={config.exclude_modules!r} "
            f"leaves no module to adapt (excluded: {excluded[:6]})"
        )
    if getattr(config, "exclude_modules", None) and not excluded:
        warnings.warn(
            f"lora_ext: exclude_modules={config.exclude_modules!r} matches no module of the model; nothing was "
            "excluded",
            UserWarning,
            stacklevel=4,
        )
    if not matched:
        raise ValueError(
            f"lora_ext: target_modules={config.target_modules!r} (layers_to_transform="
            f"{config.layers_to_transform!r}) matches no module of the model"
        )
    for key, module in matched:
        kind = kind_of(module)
        if kind is not None and key in mha_children:
            raise ValueError(
                f"lora_ext: target {key!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                "directly; LoRA on it would be ignored"
            )
        if kind is None or not kind.adaptable(module):
            raise ValueError(
                f"lora_ext: target {key!r} is a {type(module).__name__}; LoRA layers exist for nn.Linear, "
                "nn.Embedding, transformers Conv1D and nn.Conv1d/2d/3d (with floating-point weights)"
            )
    return matched, tm


def resolve_modules_to_save(
    candidates: list[tuple[str, nn.Module]], config: Any, targets: set[str], tolerated: Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Modules selected by ``config.modules_to_save`` (PEFT's plain suffix match).

    An entry that matches nothing is tolerated, as PEFT tolerates it; one the user
    wrote (not in ``tolerated``: the entries a task type adds, or all of them when
    loading a file) gets one warning, so a typo is seen but a config PEFT accepts
    is accepted here too.
    """
    if not config.modules_to_save:
        return []
    found: list[tuple[str, nn.Module]] = []
    hits = {m: 0 for m in config.modules_to_save}
    for key, module in candidates:
        ends = [m for m in config.modules_to_save if key.endswith(m)]
        if not ends:
            continue
        if any(key.startswith(f"{f}.") for f, _ in found):
            continue  # inside a module already selected
        for m in ends:
            hits[m] += 1
        if key in targets:
            raise ValueError(f"lora_ext: {key!r} is both a LoRA target and in modules_to_save")
        found.append((key, module))
    tolerated = set(tolerated)
    missing = [m for m, c in hits.items() if c == 0 and m not in tolerated]
    if missing:
        warnings.warn(
            f"lora_ext: modules_to_save entries {missing} match no module of the model; they are ignored, "
            "as PEFT ignores them (check the names)",
            UserWarning,
            stacklevel=4,
        )
    return found
