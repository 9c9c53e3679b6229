"""The layer table: which LoRA layer wraps which base layer, and the adapter tensors it owns.

Injection (lora_ext/model/inject.py), saving and loading (lora_ext/model/io.py)
and target matching (lora_ext/targets.py) read this table instead of testing
layer types themselves, as PEFT's dispatchers do: a new base layer type is one
more row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..quant.linear import LinearNF4
from .bnb import LoraLinear4bit, check_linear4bit, is_bnb_linear4bit
from .conv import Conv1D, LoraConv1D, LoraConv1d, LoraConv2d, LoraConv3d, check_conv_rank
from .dora import DORA_MAGNITUDE_KEY
from .layers import LoraEmbedding, LoraLayer, LoraLinear, LoraLinearNF4


@dataclass(frozen=True)
class LayerKind:
    """One row of the table."""

    name: str  # "linear" | "embedding" | "conv": the family of the adapter tensors
    base_type: type[nn.Module]  # the frozen layer type that gets wrapped (isinstance)
    lora_class: type[LoraLayer]  # the LoRA layer that wraps it
    factor_shapes: Callable[[nn.Module, int], tuple[tuple[int, ...], tuple[int, ...]]]  # (base, r) -> shapes
    linear: bool  # selected by target_modules="all-linear" (nn.Linear and Conv1D, as PEFT)
    float_weight: bool = True  # the base weight must be floating point (not for NF4 codes)
    check_rank: Callable[[nn.Module, int], None] | None = None  # (base, r) -> None, raises ValueError
    match: Callable[[nn.Module], bool] | None = None  # replaces isinstance(module, base_type) (lazy imports)
    check: Callable[[nn.Module], None] | None = None  # raises a clear error for a matched layer that cannot take LoRA

    def validate(self, module: nn.Module, r: int) -> None:
        """Raise ``ValueError`` if ``module`` cannot take an adapter of rank ``r`` (before anything changes)."""
        if self.check_rank is not None:
            self.check_rank(module.base_layer if isinstance(module, LoraLayer) else module, r)

    def matches(self, module: nn.Module) -> bool:
        """``module`` is a base layer of this row."""
        return self.match(module) if self.match is not None else isinstance(module, self.base_type)

    @property
    def factor_keys(self) -> tuple[str, ...]:
        """PEFT's state-dict suffixes of the adapter tensors, after ``"<path>."``."""
        return self.lora_class.factor_keys

    def adaptable(self, module: nn.Module) -> bool:
        """``module`` can take LoRA (an existing LoRA layer always can)."""
        if isinstance(module, LoraLayer):
            return True
        if self.check is not None:
            self.check(module)  # before anything is mutated
        if not self.float_weight:
            return True
        return module.weight.is_floating_point()

    def shapes(self, module: nn.Module, r: int) -> dict[str, tuple[int, ...]]:
        """Expected shapes of the adapter tensors of rank ``r``, by PEFT key suffix."""
        base = module.base_layer if isinstance(module, LoraLayer) else module
        return dict(zip(self.factor_keys, self.factor_shapes(base, r)))


def _linear_shapes(base: nn.Module, r: int):
    return (r, base.in_features), (base.out_features, r)


def _embedding_shapes(base: nn.Module, r: int):
    return (r, base.num_embeddings), (base.embedding_dim, r)


def _conv1d_transposed_shapes(base: nn.Module, r: int):  # transformers' Conv1D: weight [nx, nf] = [in, out]
    return (r, base.nx), (base.nf, r)


def _conv_shapes(base: nn.Module, r: int):  # A: base kernel, B: 1x1 grouped
    ones = (1,) * len(base.kernel_size)
    return (r, base.in_channels, *base.kernel_size), (base.out_channels, r // base.groups, *ones)


def _conv_rank(base: nn.Module, r: int) -> None:
    check_conv_rank(base.groups, r)


#: Rows are tried in order; the first whose base type (or LoRA class) matches wins.
LAYER_TABLE: tuple[LayerKind, ...] = (
    LayerKind("linear", LinearNF4, LoraLinearNF4, _linear_shapes, linear=True, float_weight=False),
    # bitsandbytes' Linear4bit subclasses nn.Linear (uint8 weight): its row comes first
    LayerKind(
        "linear",
        nn.Linear,
        LoraLinear4bit,
        _linear_shapes,
        linear=True,
        float_weight=False,
        match=is_bnb_linear4bit,
        check=check_linear4bit,
    ),  # fmt: skip
    LayerKind("linear", Conv1D, LoraConv1D, _conv1d_transposed_shapes, linear=True),
    LayerKind("linear", nn.Linear, LoraLinear, _linear_shapes, linear=True),
    LayerKind("embedding", nn.Embedding, LoraEmbedding, _embedding_shapes, linear=False),
    LayerKind("conv", nn.Conv1d, LoraConv1d, _conv_shapes, linear=False, check_rank=_conv_rank),
    LayerKind("conv", nn.Conv2d, LoraConv2d, _conv_shapes, linear=False, check_rank=_conv_rank),
    LayerKind("conv", nn.Conv3d, LoraConv3d, _conv_shapes, linear=False, check_rank=_conv_rank),
)

#: Every adapter-tensor suffix of the table (for splitting a state dict into adapters and the rest),
#: DoRA's magnitude vector (lora_ext/nn/dora.py) included.
FACTOR_KEYS: tuple[str, ...] = tuple(
    dict.fromkeys([*(k for row in LAYER_TABLE for k in row.factor_keys), DORA_MAGNITUDE_KEY])
)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The table row of a base layer or of a LoRA layer; None when the module cannot take LoRA."""
    if isinstance(module, LoraLayer):
        for row in LAYER_TABLE:
            if type(module) is row.lora_class:
                return row
        for row in LAYER_TABLE:  # a subclass of one of ours
            if isinstance(module, row.lora_class):
                return row
        return None
    for row in LAYER_TABLE:
        if row.matches(module):
            return row
    return None


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA layer for base layer ``module`` (no adapter yet), or ``module`` itself if it already is one."""
    if isinstance(module, LoraLayer):
        return module
    row = kind_of(module)
    if row is None:
        raise TypeError(f"lora_ext: no LoRA layer for a {type(module).__name__}")
    return row.lora_class(module)
