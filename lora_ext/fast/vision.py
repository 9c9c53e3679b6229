"""Which linears FastVisionModel's four switches select: by tower, block position and sub-block type.

1. Towers. A vision-language model's vision tower is the submodule built from
   ``config.vision_config``, its language model the one built from the text
   config (``config.get_text_config()``); these are object identities, not name
   patterns. A model without a vision config is one tower: a vision model (ViT,
   ``main_input_name == "pixel_values"``) or a language model.
2. Blocks. Inside a tower, the repeated layers: transformers'
   ``GradientCheckpointingLayer`` instances (every decoder/encoder layer of
   transformers 5), else the elements of the tower's ``nn.ModuleList``\\ s.
   Linears outside the blocks (patch embeddings, poolers, Qwen2-VL's merger,
   the projector between the towers, the output head) are never selected by
   the switches; ``target_modules`` / ``modules_to_save`` can add them.
3. Sub-blocks. Each child of a block that holds linears is the attention
   (its class name contains "Attention"/"Attn": CLIPAttention, LlamaAttention,
   ViTAttention, VisionAttention, ...) or else the MLP (LlamaMLP, CLIPMLP,
   ViTIntermediate + ViTOutput, ...). A block where the class names do not pick
   exactly one attention child takes its first child holding linears (the
   attention comes first in every pre-norm and post-norm block) as attention.
"""

from __future__ import annotations

from torch import nn

from ..nn.dispatch import kind_of

__all__ = ["select_linears", "towers"]


def _config_of(model: nn.Module, attr: str):
    config = getattr(model, "config", None)
    if config is None:
        return None
    if attr == "text":
        sub = getattr(config, "text_config", None)
        if sub is None and hasattr(config, "get_text_config"):
            text = config.get_text_config()
            sub = text if text is not config else None
        return sub
    return getattr(config, "vision_config", None)


def _is_vision_model(model: nn.Module) -> bool:
    return getattr(model, "main_input_name", None) == "pixel_values"


def towers(model: nn.Module) -> dict[str, list[str]]:
    """``{"vision": [module names], "language": [module names]}`` ("" is the whole model)."""
    vision_cfg, text_cfg = _config_of(model, "vision"), _config_of(model, "text")
    if vision_cfg is None:
        return {"vision": [""], "language": []} if _is_vision_model(model) else {"vision": [], "language": [""]}
    out: dict[str, list[str]] = {"vision": [], "language": []}
    for name, module in model.named_modules():
        if not name:
            continue
        cfg = getattr(module, "config", None)
        kind = "vision" if cfg is vision_cfg else "language" if (text_cfg is not None and cfg is text_cfg) else None
        if kind is None or any(name.startswith(t + ".") for t in out[kind]):
            continue
        out[kind].append(name)
    if not out["vision"]:
        raise ValueError(
            f"lora_ext: {type(model).__name__} has a vision_config but no submodule built from it; "
            "cannot locate its vision tower (pass target_modules instead of the switches)"
        )
    return out


def _blocks(tower: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover (transformers < 4.52)
        GradientCheckpointingLayer = ()  # noqa: N806
    found = [
        (n, m)
        for n, m in tower.named_modules()
        if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)
    ]
    if not found:
        for n, m in tower.named_modules():
            if isinstance(m, nn.ModuleList):
                found += [(f"{n}.{i}", child) for i, child in enumerate(m) if _has_linear(child)]
    # outermost blocks only
    names = [n for n, _ in found]
    found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o in names if o != n)]
    return [(f"{prefix}.{n}" if prefix else n, m) for n, m in found]


def _is_linear(module: nn.Module) -> bool:
    """An adaptable linear layer (nn.Linear, LinearNF4, or one already wrapped): the layer table's "linear" rows."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def _has_linear(module: nn.Module) -> bool:
    return any(_is_linear(m) for m in module.modules())


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Adaptable linears under ``module``, not descending into LoRA layers."""
    out: list[tuple[str, nn.Module]] = []

    def walk(m: nn.Module, prefix: str) -> None:
        for n, c in m.named_children():
            full = f"{prefix}.{n}" if prefix else n
            if _is_linear(c):
                out.append((full, c))
            else:
                walk(c, full)

    if _is_linear(module):
        return [("", module)]
    walk(module, "")
    return out


def _looks_like_attention(module: nn.Module) -> bool:
    cls = type(module).__name__.lower()
    return "attention" in cls or "attn" in cls


def _split_block(block: nn.Module) -> tuple[list[str], list[str]]:
    """(attention child names, MLP child names) of one block."""
    children = [(n, c) for n, c in block.named_children() if _has_linear(c)]
    attn = [n for n, c in children if _looks_like_attention(c)]
    if len(attn) != 1:
        attn = [children[0][0]] if children else []
    return attn, [n for n, _ in children if n not in attn]


def select_linears(
    model: nn.Module,
    *,
    vision: bool,
    language: bool,
    attention: bool,
    mlp: bool,
) -> list[str]:
    """Full names of the ``nn.Linear`` layers the switches select (see the module docstring)."""
    parts = towers(model)
    chosen: list[str] = []
    for kind, wanted in (("vision", vision), ("language", language)):
        if not wanted:
            continue
        for tower_name in parts[kind]:
            tower = model.get_submodule(tower_name) if tower_name else model
            for block_name, block in _blocks(tower, tower_name):
                attn_children, mlp_children = _split_block(block)
                for child in (attn_children if attention else []) + (mlp_children if mlp else []):
                    sub = block.get_submodule(child)
                    chosen += [f"{block_name}.{child}.{n}" if n else f"{block_name}.{child}" for n, m in _linears(sub)]
    return list(dict.fromkeys(chosen))
