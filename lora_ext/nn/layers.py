"""LoRA modules that wrap an existing layer: LoraLinear, LoraLinearNF4, LoraEmbedding, ModulesToSaveWrapper.

The parameter layout mirrors PEFT's ``peft.tuners.lora`` layers exactly, so a
model's ``state_dict`` keys are the ones PEFT would produce:

    <path>.base_layer.weight / .bias          the frozen wrapped layer
    <path>.lora_A.<adapter>.weight   [r, K]   (Linear)
    <path>.lora_B.<adapter>.weight   [N, r]   (Linear)
    <path>.lora_embedding_A.<adapter> [r, num_embeddings]   (Embedding)
    <path>.lora_embedding_B.<adapter> [embedding_dim, r]    (Embedding)
    <path>.original_module.* / <path>.modules_to_save.<adapter>.*   (ModulesToSaveWrapper)

State that decides which computation runs (active adapters, merged,
disabled) lives in plain Python attributes: torch.compile guards on them, so
switching an adapter or merging recompiles instead of reusing a stale graph.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops.exact_merge import MergeRecord
from ..quant.linear import LinearNF4
from ..quant.nf4 import NF4Weight, dequantize_nf4
from . import exact_merge, mixed

__all__ = ["LoraEmbedding", "LoraLayer", "LoraLinear", "LoraLinearNF4", "ModulesToSaveWrapper", "lora_linear_multi"]


# ------------------------------------------------------------------ functional core


def _any_autocast() -> bool:
    """Whether autocast is on for any device type (one cheap call where torch has it)."""
    probe = getattr(torch._C, "_is_any_autocast_enabled", None)
    if probe is not None:
        return probe()
    return any(torch.is_autocast_enabled(d) for d in ("cpu", "cuda"))


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def lora_linear_multi(
    x: Tensor,
    weight: Tensor | NF4Weight,
    bias: Tensor | None,
    adapters: list[tuple[Tensor, Tensor, float, float]],
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """``x Wᵀ + bias + Σ_i s_i · (drop_i(x) A_iᵀ) B_iᵀ`` with the first adapter fused.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``, or an :class:`~lora_ext.NF4Weight` (4-bit base); bias: ``[N]`` or None.
        adapters: non-empty list of ``(A [r_i, K], B [N, r_i], scale_i, dropout_p_i)``;
            pass ``dropout_p = 0`` outside training.
        compute_dtype: the dtype outside autocast, x is cast to it (an NF4 base needs it); by default
            x must already have ``weight.dtype`` (a TypeError otherwise, as ``nn.Linear`` raises).

    Returns:
        ``[..., N]`` in the compute dtype: the autocast dtype when autocast is on
        for x's device, else ``compute_dtype``.

    The fused op wants one dtype; when x or the adapter factors differ from the
    compute dtype they are cast to it (a differentiable cast, so fp32 adapter
    parameters still get fp32 gradients). Casting the small factors instead of
    the weight keeps the big GEMM in the model's dtype; the op accumulates in
    fp32 and rounds once, which is at least as accurate as PEFT's two roundings.
    """
    amp = ops.autocast_dtype_for(x)
    dtype = amp if amp is not None else (compute_dtype or weight.dtype)
    if compute_dtype is None:
        check_input_dtype(x, dtype)
    # The fallback kernels run plain torch ops; under autocast those would be
    # re-cast to low precision, breaking the fp32-accumulation contract.
    guard = torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext()
    with guard:
        xc, b = _cast(x, dtype), _cast(bias, dtype)
        w = weight if isinstance(weight, NF4Weight) else _cast(weight, dtype)
        a0, b0, s0, p0 = adapters[0]
        y = ops.lora_linear(xc, w, _cast(a0, dtype), _cast(b0, dtype), s0, b, p0)
        for a_i, b_i, s_i, p_i in adapters[1:]:
            xd = F.dropout(xc, p_i, training=True) if p_i > 0 else xc
            y = y + F.linear(F.linear(xd, _cast(a_i, dtype)), _cast(b_i, dtype)) * s_i
    return y


def check_input_dtype(x: Tensor, weight_dtype: torch.dtype) -> None:
    """nn.Linear's (and PEFT's) rule: outside autocast, x must have the weight's dtype (no silent conversion)."""
    if x.dtype != weight_dtype and ops.autocast_dtype_for(x) is None:
        raise TypeError(
            f"lora_ext: input x has dtype {x.dtype} but the layer's weight is {weight_dtype}; "
            "cast the input (or the model), or run under torch.autocast"
        )


def base_layer_is_hooked(base: nn.Module) -> bool:
    """True when calling ``base(x)`` does more than its ``forward``: hooks, or a forward
    replaced on the instance (accelerate's offload/device-map hooks). The fused path
    would skip those, so such layers run ``base(x)`` plus an unfused LoRA branch."""
    return bool(base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base))


def add_lora_unfused(y: Tensor, x: Tensor, adapters: list[tuple[Tensor, Tensor, float, float]]) -> Tensor:
    """``y + Σ s_i · (drop_i(x) A_iᵀ) B_iᵀ`` in plain PyTorch (PEFT's formula), in y's dtype."""
    out = y
    for a, b, s, p in adapters:
        xc = x.to(a.dtype)
        xd = F.dropout(xc, p, training=True) if p > 0 else xc
        out = out + (F.linear(F.linear(xd, a), b) * s).to(y.dtype)
    return out


# ---------------------------------------------------------------------- base class


class LoraLayer(nn.Module):
    """Common state of the LoRA wrappers: per-adapter hyper-parameters and the active/merged/disabled flags."""

    # Names of the attributes that hold per-adapter trainable parameters (PEFT's names).
    adapter_layer_names: tuple[str, ...] = ()
    base_type: type[nn.Module] = nn.Module  # what the subclass wraps
    # Mixed-adapter batches (lora_ext/nn/mixed.py): whether the layer routes rows to adapters, and
    # the per-row adapter names the model-level hook sets for one forward (None otherwise).
    supports_mixed_batch = False
    _mixed_adapter_names: list[str] | None = None
    base_name = "a module"

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str | None = None,
        r: int = 8,
        lora_alpha: float = 8,
        **adapter_kwargs: Any,
    ) -> None:
        """Wrap ``base_layer`` (frozen); with ``adapter_name``, add that adapter and activate it."""
        if not isinstance(base_layer, self.base_type):
            raise TypeError(f"lora_ext: {type(self).__name__} wraps {self.base_name}, got {type(base_layer).__name__}")
        self._check_base(base_layer)
        super().__init__()
        self.base_layer = base_layer
        # LoRA trains the factors only; the wrapped layer is frozen (bias="all"/"lora_only" re-enables biases).
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout_p: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self._active_adapters: tuple[str, ...] = ()
        self._disable_adapters: bool = False
        self.merged_adapters: list[str] = []
        self._merge_records: dict[str, MergeRecord] = {}  # exact merges: adapter name -> record
        self._init_containers(base_layer)
        if adapter_name is not None:
            self.add_adapter(adapter_name, r, lora_alpha, **adapter_kwargs)
            self.set_active((adapter_name,))

    def _check_base(self, base_layer: nn.Module) -> None:
        """Refuse a base layer of the right type that still cannot take LoRA (hook)."""

    container_type: type[nn.Module] = nn.ModuleDict  # what holds one adapter's tensors per name
    feature_attrs = ("in_features", "out_features")  # base layer attributes giving (in, out)

    def _init_containers(self, base_layer: nn.Module) -> None:
        """Set in_features/out_features and create the (empty) per-adapter containers."""
        self.in_features, self.out_features = (getattr(base_layer, a) for a in self.feature_attrs)
        for attr in self.adapter_layer_names:
            setattr(self, attr, self.container_type())

    # ---- state

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(self.r)

    @property
    def active_adapters(self) -> list[str]:
        return [a for a in self._active_adapters if a in self.r]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disabled(self) -> bool:
        return self._disable_adapters

    @property
    def weight(self) -> Tensor:
        """The wrapped layer's weight (code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    def set_active(self, names: tuple[str, ...]) -> None:
        """Activate ``names`` (those this layer holds); adapter params train iff active."""
        self._active_adapters = tuple(names)
        for name in self.adapters:
            for p in self._adapter_params(name):
                p.requires_grad_(name in names)

    def _adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        raise NotImplementedError

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        *,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
        dtype: torch.dtype | None = None,
        weights: dict[str, Tensor] | None = None,
    ) -> None:
        """Add adapter ``name`` (inactive until :meth:`set_active`).

        Args:
            r, lora_alpha: rank and alpha; scale = ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
            init_lora_weights: True (PEFT default init), ``"gaussian"``, or False
                (random factors, B not zero).
            dtype: dtype of the new factors; default the base weight's dtype.
            weights: exact factor values (PEFT key suffixes, e.g. ``{"lora_A.weight": A}``);
                skips the random init.
        """
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"lora_ext: adapter name must be a non-empty string without '.', got {name!r}")
        if name in self.r:
            raise ValueError(f"lora_ext: this layer already has an adapter named {name!r}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"lora_ext: rank r must be a positive integer, got {r!r}")
        if not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha) or lora_alpha <= 0:
            raise ValueError(f"lora_ext: lora_alpha must be a positive finite number, got {lora_alpha!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_ext: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        base_w = self.base_layer.weight
        self._create_factors(name, r, init_lora_weights, base_w.device, self._factor_dtype(dtype), weights)
        self.r[name] = r
        self.lora_alpha[name] = float(lora_alpha)
        self.use_rslora[name] = bool(use_rslora)
        self.scaling[name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout_p[name] = float(lora_dropout)
        for p in self._adapter_params(name):
            p.requires_grad_(name in self._active_adapters)

    def _factor_dtype(self, requested: torch.dtype | None) -> torch.dtype:
        """dtype of new adapter factors: the requested one, else the base weight's (hook)."""
        return requested or self.base_layer.weight.dtype

    def _create_factors(self, name, r, init, device, dtype, weights) -> None:
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (unmerge it first if it is merged)."""
        if name not in self.r:
            raise ValueError(f"lora_ext: this layer has no adapter {name!r}; it has {self.adapters}")
        if name in self.merged_adapters:
            self.unmerge()
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p, self.use_rslora):
            d.pop(name, None)
        self._active_adapters = tuple(a for a in self._active_adapters if a != name)

    # ---- merging

    def delta_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(A', B')`` with ``weight += scale · B' A'`` merging adapter ``name``."""
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors under PEFT's state-dict key suffixes (what adapter files hold)."""
        raise NotImplementedError

    def _unmerged_weight(self) -> Tensor:
        """The base weight without any adapter (hook: an NF4 base dequantizes it)."""
        return self.base_layer.weight.detach()

    def merged_weight(self, names: list[str] | None = None) -> Tensor:
        """Out of place: the base weight with adapters ``names`` (default: active) added."""
        w = self._unmerged_weight()
        for name in names if names is not None else self.active_adapters:
            w = _merged(w, *self.delta_factors(name), self.scaling[name])
        return w

    def check_mergeable(self, name: str | None = None) -> None:
        """Raise ``ValueError`` if this layer's adapters cannot be merged into its base (hook)."""

    #: How :meth:`unmerge` gives the base weight back: "record" (an exact merge keeps a
    #: MergeRecord; fp32/fp16/bf16 weights), "restore" (the merge swaps in a new layer and
    #: unmerge puts the original back: 4-bit bases) or None (unmerge is the inverse formula,
    #: exact only to rounding: conv and DoRA layers, as in PEFT).
    exact_unmerge: str | None = "record"

    def supports_exact_merge(self) -> bool:
        """True when :meth:`unmerge` after ``merge(exact=True)`` restores the base bit for bit."""
        if self.exact_unmerge == "restore":
            return True
        return self.exact_unmerge == "record" and exact_merge.supports(self.base_layer.weight)

    def merge(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None, exact: bool | None = None
    ) -> None:
        """Add the active (or given) adapters into the base weight, fp32 accumulation, one rounding.

        ``exact``: None (default) is exact wherever this layer supports it
        (:meth:`supports_exact_merge`): a :class:`~lora_ext.MergeRecord` per adapter lets
        :meth:`unmerge` restore the weight bit for bit (lora_ext/nn/exact_merge.py). True
        requires it (``ValueError`` where the layer cannot), False keeps no record.

        Raises:
            ValueError: with ``safe_merge``, if the merged weight would be
                non-finite; with ``exact=True`` on a layer that cannot unmerge exactly.
                The weight is left unchanged.
        """
        if exact is None:
            exact = self.supports_exact_merge()
        elif exact and not self.supports_exact_merge():
            raise ValueError(f"lora_ext: {self._exact_refusal()}; merge with exact=None or exact=False")
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters)]
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        self._merge_names(names, safe_merge, exact)
        self.merged_adapters.extend(names)

    def _exact_refusal(self) -> str:
        kind = type(self).__name__
        if self.exact_unmerge is None:
            return f"a {kind} cannot merge exactly (its unmerge is the inverse formula, exact only to rounding)"
        return f"a {kind} with a {self.base_layer.weight.dtype} weight cannot merge exactly (fp32/fp16/bf16 only)"

    def _merge_names(self, names: list[str], safe_merge: bool, exact: bool = False) -> None:
        """Merge adapters ``names`` into the base (hook: an NF4 base swaps in a dequantized nn.Linear)."""
        weight = self.base_layer.weight
        if exact and exact_merge.supports(weight):
            self._merge_records.update(exact_merge.merge_names(self, weight, names, safe_merge))
            return
        with torch.no_grad():
            if safe_merge:
                new = self.merged_weight(names)
                if not torch.isfinite(new).all():
                    raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
                weight.copy_(new)
            else:
                for name in names:
                    _merge_into(weight, *self.delta_factors(name), self.scaling[name])

    def unmerge(self) -> None:
        """Subtract the merged adapters, last merged first (the exact inverse formula)."""
        self._unmerge_all()
        self.merged_adapters.clear()

    def _unmerge_all(self) -> None:
        """Undo every merge (hook: an NF4 base puts its 4-bit layer back)."""
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in reversed(self.merged_adapters):
                record = self._merge_records.pop(name, None)
                if record is not None:
                    exact_merge.unmerge_name(self, weight, name, record)
                else:
                    _merge_into(weight, *self.delta_factors(name), -self.scaling[name])

    def merge_record_bytes(self) -> int:
        """Bytes held by this layer's exact-merge records (0 when not merged exactly)."""
        return sum(r.nbytes for r in self._merge_records.values())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        exact_merge.save_records(self, destination, prefix)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        exact_merge.load_records(self, state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _repr_state(self) -> str:
        names = self.adapters
        if len(names) == 1:
            n = names[0]
            hp = f"r={self.r[n]}, alpha={self.lora_alpha[n]:g}, dropout={self.lora_dropout_p[n]:g}"
        else:
            hp = ", ".join(
                f"{n}: (r={self.r[n]}, alpha={self.lora_alpha[n]:g}, dropout={self.lora_dropout_p[n]:g})" for n in names
            )
            hp = "adapters={" + hp + "}"
        active = self.active_adapters
        act = active[0] if len(active) == 1 else active
        return f"{hp}, active_adapter={act!r}, merged={self.merged}, disabled={self.disabled}"

    def extra_repr(self) -> str:
        return self._repr_state()


def _merged(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``W + scale · B A`` in W's dtype, fp32 accumulation, rounded once."""
    if a.dtype == weight.dtype:
        return ops.merged_weight(weight, a.detach(), b.detach(), scale)
    # Adapter factors in another dtype (fp32 factors on a bf16 base): accumulate
    # in fp32 from the unrounded factors, round to W's dtype once.
    return ops.merged_weight(weight.float(), a.detach().float(), b.detach().float(), scale).to(weight.dtype)


def _merge_into(weight: Tensor, a: Tensor, b: Tensor, scale: float) -> None:
    if a.dtype == weight.dtype:
        ops.merge_(weight.data, a.detach(), b.detach(), scale)
    else:
        weight.data.copy_(_merged(weight.data, a, b, scale))


# ------------------------------------------------------------------------- Linear


class LoraLinear(LoraLayer):
    """LoRA around an ``nn.Linear``: ``y = base(x) + Σ_active s · dropout(x) Aᵀ Bᵀ``.

    Shapes: x ``[..., in_features]`` → ``[..., out_features]``; per adapter
    ``lora_A[name].weight [r, in_features]``, ``lora_B[name].weight [out_features, r]``.

    One active adapter, not merged, not disabled: a single fused
    :func:`lora_ext.lora_linear` call (base GEMM, bias and LoRA branch
    together). Merged or disabled: the base layer alone. Several active
    adapters: the first fused, the others added (independent dropout masks, as PEFT).
    Dropout is applied in training mode only.
    """

    adapter_layer_names = ("lora_A", "lora_B")
    factor_keys = ("lora_A.weight", "lora_B.weight")  # PEFT's state-dict suffixes of (A, B)
    base_type = nn.Linear
    base_name = "an nn.Linear"

    def _check_base(self, base_layer: nn.Module) -> None:
        if not base_layer.weight.is_floating_point():
            raise TypeError(f"lora_ext: LoraLinear needs a floating-point weight, got {base_layer.weight.dtype}")

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def _adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.lora_A[name].parameters()
        yield from self.lora_B[name].parameters()

    def _create_factors(self, name, r, init, device, dtype, weights) -> None:
        if weights is not None:
            a = _frozen_empty_linear(self.in_features, r, device, dtype)
            b = _frozen_empty_linear(r, self.out_features, device, dtype)
            _copy_checked(a.weight, weights["lora_A.weight"], "lora_A.weight")
            _copy_checked(b.weight, weights["lora_B.weight"], "lora_B.weight")
        else:
            # Same construction and RNG consumption order as PEFT, so a given
            # torch.manual_seed gives PEFT's initial factors.
            a = nn.Linear(self.in_features, r, bias=False)
            b = nn.Linear(r, self.out_features, bias=False)
            if init is True:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.zeros_(b.weight)
            elif isinstance(init, str) and init.lower() == "gaussian":
                nn.init.normal_(a.weight, std=1 / r)
                nn.init.zeros_(b.weight)
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        self.lora_A[name] = a
        self.lora_B[name] = b

    def delta_factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s factors under PEFT's key suffixes."""
        return dict(zip(self.factor_keys, (self.lora_A[name].weight, self.lora_B[name].weight)))

    supports_mixed_batch = True

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if type(self) is LoraLinear and not (args or kwargs):
            y = self._forward_one_adapter(x)
            if y is not None:
                return y
        self._check_input(x)
        if self._mixed_adapter_names is not None:
            return mixed.linear_forward(self, x, self._mixed_adapter_names, *args, **kwargs)
        if self._disable_adapters or self.merged_adapters or args or kwargs:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._active_adapters if a in self.r]
        if not active:
            return self.base_layer(x)
        adapters = [
            (
                self.lora_A[n].weight,
                self.lora_B[n].weight,
                self.scaling[n],
                self.lora_dropout_p[n] if self.training else 0.0,
            )
            for n in active
        ]
        base = self.base_layer
        if base_layer_is_hooked(base):
            return add_lora_unfused(base(x), x, adapters)
        return self._fused_forward(x, adapters)

    def _forward_one_adapter(self, x: Tensor) -> Tensor | None:
        """The common call with the least Python per call, or None when it does not apply.

        Applies to one active adapter, nothing merged, disabled or mixed, an ``nn.Linear`` base
        without hooks, x ``[..., in_features]`` in the dtype of the weight and of both factors, a
        float scale, no autocast and no torch.compile tracing: then x, the weights and the adapter
        are what :func:`lora_linear_multi` would pass, so the op (which validates in C++ with the
        messages of lora_ext/ops/checks.py) is called directly. Everything else, errors included,
        takes the general path. The dropout seed is drawn as :func:`lora_ext.lora_linear` draws it.
        """
        active = self._active_adapters
        if (
            len(active) != 1
            or self._disable_adapters
            or self.merged_adapters
            or self._mixed_adapter_names is not None
            or _any_autocast()
            or torch.compiler.is_compiling()
            or not isinstance(x, Tensor)
            or x.dim() == 0
        ):
            return None
        name = active[0]
        scale = self.scaling.get(name)
        base = self.base_layer
        if type(scale) is not float or base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
            return None
        w = base.weight
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        k = x.shape[-1]
        if x.dtype != w.dtype or a.dtype != w.dtype or b.dtype != w.dtype or k != w.shape[1]:
            return None
        p = self.lora_dropout_p[name] if self.training else 0.0
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=x.device) if p > 0.0 else None
        if x.dim() == 2:
            return torch.ops.lora_ext.lora_linear(x, w, base.bias, a, b, scale, p, seed, 0)
        y = torch.ops.lora_ext.lora_linear(x.reshape(-1, k), w, base.bias, a, b, scale, p, seed, 0)
        return y.view(*x.shape[:-1], w.shape[0])

    def _check_input(self, x: Tensor) -> None:
        """The same TypeError on every path (fused, merged, disabled, hooked base) for a wrong input dtype (hook)."""
        check_input_dtype(x, self.base_layer.weight.dtype)

    def _fused_forward(self, x: Tensor, adapters: list[tuple[Tensor, Tensor, float, float]]) -> Tensor:
        """Base layer and adapters in one fused call (hook: an NF4 base dequantizes inside the op)."""
        return lora_linear_multi(x, self.base_layer.weight, self.base_layer.bias, adapters)


class LoraLinearNF4(LoraLinear):
    """LoRA around a :class:`~lora_ext.LinearNF4`: ``y = x Wᵀ + bias + Σ s · dropout(x) Aᵀ Bᵀ`` with W in NF4.

    Same adapter layout, state-dict keys and adapter API as :class:`LoraLinear`
    (``base_layer.weight`` holds bitsandbytes' packed codes, ``base_layer.weight.*``
    its quant state, as PEFT over bitsandbytes). The first active adapter runs
    fused with the dequantization (:func:`lora_ext.lora_linear_nf4`); x is cast
    to the base's ``compute_dtype`` as bitsandbytes' ``Linear4bit`` does, and the
    output comes back in x's dtype.

    ``merge()`` cannot add into 4-bit losslessly: it swaps ``base_layer`` for an
    ``nn.Linear`` holding the dequantized-and-merged weight in the layer's original
    dtype (``quant_dtype``, the dtype the weight had before quantization: an fp32
    model whose NF4 layers compute in bf16 gets fp32 layers back), so
    ``merge_and_unload`` returns plain ``nn.Linear`` layers that run in the
    model's dtype; ``unmerge()`` puts the original NF4 layer back unchanged.
    """

    exact_unmerge = "restore"  # unmerge puts the original 4-bit layer back

    base_type = LinearNF4
    base_name = "a LinearNF4"

    def __init__(self, base_layer: LinearNF4, *args: Any, **kwargs: Any) -> None:
        self._nf4_layer: LinearNF4 | None = None  # the NF4 layer while merged
        super().__init__(base_layer, *args, **kwargs)

    def _check_base(self, base_layer: nn.Module) -> None:
        pass  # uint8 codes by design

    def _check_input(self, x: Tensor) -> None:
        # bitsandbytes' rule: a floating x is cast to the compute dtype; anything else is refused
        if not x.is_floating_point():
            raise TypeError(f"lora_ext: input x has dtype {x.dtype}; a LoRA NF4 layer needs a floating-point input")

    @property
    def _quantized(self) -> LinearNF4:
        return self._nf4_layer or self.base_layer

    def _factor_dtype(self, requested: torch.dtype | None) -> torch.dtype:
        # The base "weight" holds uint8 codes: a dtype derived from it (or none) means the
        # compute dtype, else the dtype the weight had before quantization.
        if requested is not None and requested.is_floating_point:
            return requested
        return self._quantized.compute_dtype or self._quantized.quant_dtype

    def add_adapter(self, name: str, r: int, lora_alpha: float, **kwargs: Any) -> None:
        if self._nf4_layer is not None:
            raise RuntimeError("lora_ext: unmerge before adding an adapter to a merged NF4 layer")
        super().add_adapter(name, r, lora_alpha, **kwargs)

    def _fused_forward(self, x: Tensor, adapters: list[tuple[Tensor, Tensor, float, float]]) -> Tensor:
        base = self.base_layer
        y = lora_linear_multi(x, base.nf4, base.bias, adapters, compute_dtype=base.compute_dtype or x.dtype)
        return y if ops.autocast_dtype_for(x) is not None else y.to(x.dtype)

    def _unmerged_weight(self) -> Tensor:
        # the original dtype, not the compute dtype: the merged layer runs among the model's other layers
        nf4 = self._quantized
        return dequantize_nf4(nf4.nf4, nf4.quant_dtype)

    def _merge_names(self, names: list[str], safe_merge: bool, exact: bool = False) -> None:
        with torch.no_grad():
            w = self.merged_weight(self.merged_adapters + names)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"lora_ext: merging adapter(s) {names} gives non-finite weights; left unchanged")
        nf4 = self._quantized
        merged = nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None, device="meta")
        merged.weight = nn.Parameter(w, requires_grad=False)
        if nf4.bias is not None:
            merged.bias = nn.Parameter(nf4.bias.detach().to(w.dtype), requires_grad=False)
        self._nf4_layer = nf4
        self.base_layer = merged

    def _unmerge_all(self) -> None:
        if self._nf4_layer is not None:
            self.base_layer = self._nf4_layer
            self._nf4_layer = None

    def requantize_merged(self, blocksize: int | None = None, double_quant: bool | None = None) -> LinearNF4:
        """A new LinearNF4 from the merged weight. Lossy: NF4 of W + sBA is not W + sBA (warns)."""
        if self._nf4_layer is None:
            raise RuntimeError("lora_ext: requantize_merged needs a merged layer (call merge() first)")
        warnings.warn(
            "lora_ext: requantizing a merged weight to NF4 adds a second 4-bit rounding error; the adapter's "
            "contribution is partly lost. Keep the adapter separate to stay exact.",
            UserWarning,
            stacklevel=2,
        )
        src = self._nf4_layer
        return LinearNF4.from_linear(
            self.base_layer, blocksize or src.blocksize, src.double_quant if double_quant is None else double_quant,
            src.compute_dtype,
        )  # fmt: skip


def _frozen_empty_linear(in_f: int, out_f: int, device, dtype) -> nn.Linear:
    # skip the random init (it is overwritten right away), which costs time on big layers
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(torch.empty(out_f, in_f, device=device, dtype=dtype))
    return lin


def _copy_checked(param: Tensor, value: Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"lora_ext: {name} has shape {list(value.shape)}, expected {list(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


# ---------------------------------------------------------------------- Embedding


class LoraEmbedding(LoraLayer):
    """LoRA around an ``nn.Embedding`` with PEFT's semantics.

    ``y = base(ids) + s · embedding(ids, Aᵀ) Bᵀ`` with ``lora_embedding_A[name]
    [r, num_embeddings]`` and ``lora_embedding_B[name] [embedding_dim, r]``; the
    lookup uses the base layer's padding_idx/max_norm/... options. As in PEFT
    there is no dropout on embeddings. The low-rank term is accumulated in fp32
    and added to the base output with one rounding.
    """

    adapter_layer_names = ("lora_embedding_A", "lora_embedding_B")
    factor_keys = ("lora_embedding_A", "lora_embedding_B")
    base_type = nn.Embedding
    base_name = "an nn.Embedding"
    container_type = nn.ParameterDict
    feature_attrs = ("num_embeddings", "embedding_dim")

    def _adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        yield self.lora_embedding_A[name]
        yield self.lora_embedding_B[name]

    def _create_factors(self, name, r, init, device, dtype, weights) -> None:
        if weights is not None:
            a = torch.empty(r, self.in_features, device=device, dtype=dtype)
            b = torch.empty(self.out_features, r, device=device, dtype=dtype)
            _copy_checked(a, weights["lora_embedding_A"], "lora_embedding_A")
            _copy_checked(b, weights["lora_embedding_B"], "lora_embedding_B")
        else:
            # PEFT: randn both, then (init) A zero and B normal; same RNG order.
            a = torch.randn(r, self.in_features)
            b = torch.randn(self.out_features, r)
            if init is not False:
                nn.init.zeros_(a)
                nn.init.normal_(b)
            a, b = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)

    def delta_factors(self, name: str) -> tuple[Tensor, Tensor]:
        # weight [V, D] += s · (B A)ᵀ = s · Aᵀ Bᵀ: the merge op's A' = Bᵀ [r, D], B' = Aᵀ [V, r]
        return self.lora_embedding_B[name].t().contiguous(), self.lora_embedding_A[name].t().contiguous()

    def adapter_tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s factors under PEFT's key suffixes."""
        return dict(zip(self.factor_keys, (self.lora_embedding_A[name], self.lora_embedding_B[name])))

    supports_mixed_batch = True

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._mixed_adapter_names is not None:
            return mixed.embedding_forward(self, x, self._mixed_adapter_names, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self._disable_adapters or self.merged_adapters:
            return result
        active = [a for a in self._active_adapters if a in self.r]
        if not active:
            return result
        base = self.base_layer
        embed_scale = getattr(base, "embed_scale", None)  # e.g. Gemma's scaled embeddings
        with torch.autocast(x.device.type, enabled=False):
            acc = result.float()
            for n in active:
                after_a = F.embedding(
                    x,
                    self.lora_embedding_A[n].t(),
                    padding_idx=base.padding_idx,
                    max_norm=base.max_norm,
                    norm_type=base.norm_type,
                    scale_grad_by_freq=base.scale_grad_by_freq,
                    sparse=base.sparse,
                )
                delta = (after_a.float() @ self.lora_embedding_B[n].float().t()) * self.scaling[n]
                if embed_scale is not None:
                    delta = delta * (embed_scale.float() if isinstance(embed_scale, Tensor) else embed_scale)
                acc = acc + delta
        return acc.to(result.dtype)


# ------------------------------------------------------------------ modules_to_save


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full for each adapter (PEFT's ``modules_to_save``).

    ``original_module`` stays frozen; ``modules_to_save[adapter]`` is a trainable
    copy used while that adapter is active and adapters are enabled.
    """

    _mixed_adapter_names: list[str] | None = None  # set for one forward by adapter_names (lora_ext/nn/mixed.py)

    @property
    def supports_mixed_batch(self) -> bool:
        return isinstance(self.original_module, mixed.ROW_WISE_MODULES)

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._active_adapters: tuple[str, ...] = ()
        self._disable_adapters = False

    @property
    def adapters(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str, copy_of: nn.Module | None = None) -> None:
        new = copy.deepcopy(self.original_module if copy_of is None else copy_of)
        for p in new.parameters():
            p.requires_grad_(name in self._active_adapters)
        self.modules_to_save[name] = new

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self._active_adapters = tuple(a for a in self._active_adapters if a != name)

    def set_active(self, names: tuple[str, ...]) -> None:
        self._active_adapters = tuple(names)
        for name, mod in self.modules_to_save.items():
            for p in mod.parameters():
                p.requires_grad_(name in names)

    def active_module(self) -> nn.Module:
        if not self._disable_adapters:
            for name in self._active_adapters:
                if name in self.modules_to_save:
                    return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._mixed_adapter_names is not None:
            if not args:
                raise ValueError("lora_ext: adapter_names needs the modules_to_save input as a positional argument")
            return mixed.modules_to_save_forward(self, args[0], self._mixed_adapter_names, *args[1:], **kwargs)
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # nn.Module.__getattr__ finds parameters/submodules; anything else (e.g. .weight,
        # .in_features) is forwarded to the module in use, as PEFT does.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module(), name)

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={list(self._active_adapters)}"
