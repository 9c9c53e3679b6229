"""``add_weighted_adapter``: a new adapter from a weighted combination of existing ones (PEFT's method).

Same arguments, defaults and results as ``peft.LoraModel.add_weighted_adapter``
for the combination types ``"linear"``, ``"cat"`` and ``"svd"``; the others
(TIES, DARE, magnitude pruning) are refused by name. The new adapter has rank
``r_new`` and ``lora_alpha = r_new`` (scale 1), the config of the first source
adapter otherwise, and is added inactive (``set_adapter`` activates it).

Per adapted layer, with ``s_i`` the scale of source adapter ``i`` and ``w_i`` its weight:

    linear: A = Σ sign(w_i s_i) sqrt|w_i s_i| A_i,  B = Σ sqrt|w_i s_i| B_i      (equal ranks)
    cat:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],    B = [B_1, B_2, ...]         (r_new = Σ r_i)
    svd:    ΔW = Σ w_i s_i B_i A_i, truncated SVD ΔW ≈ (U S) Vh:  B = U S,  A = Vh   (r_new = svd_rank or max r_i)

Convolutions take ``ΔW`` as the ``[out, in·k]`` matrix (PEFT flattens ``nn.Conv2d`` only).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from numbers import Real

import torch
from torch import Tensor, nn

from .. import targets as _targets
from ..nn.conv import LoraConvNd
from ..nn.dispatch import kind_of
from ..nn.layers import LoraEmbedding, LoraLayer, ModulesToSaveWrapper
from .config import LoraConfig
from .inject import LoraState, _check_names, _inject, _state, _unwrap, _walk

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

#: The combination types implemented here.
COMBINATION_TYPES = ("svd", "linear", "cat")
# PEFT's others, which need its pruning/sign-election helpers.
_NOT_IMPLEMENTED = (
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter ``adapter_name`` combining ``adapters`` with ``weights`` (PEFT's ``add_weighted_adapter``).

    Args:
        adapters: names of existing adapters; weights: one real number each (negative subtracts).
        combination_type: ``"svd"`` (default), ``"linear"`` (all ranks equal) or ``"cat"``.
            With a single adapter the combination is ``"linear"``, as in PEFT.
        svd_rank: rank of the ``"svd"`` result (default: the largest source rank).
        svd_clamp: quantile in [0, 1] at which the SVD factors are clamped (None: no clamping).
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd`` (a driver only on CUDA).
        density, majority_sign_method: options of TIES/DARE/magnitude pruning, which are not
            implemented; a non-default value is refused rather than ignored.

    Raises:
        ValueError: unknown or duplicate names, mismatched lengths, an unsupported
            combination type, options that would be ignored, unequal ranks for
            ``"linear"``, an SVD rank larger than a layer allows, more than one
            source adapter with ``modules_to_save``, a grouped convolution with ``"cat"``/``"svd"``.
            The model is unchanged in every case.

    Differences from PEFT: an existing ``adapter_name`` raises (PEFT returns
    silently); with ``use_rslora`` the new adapter's scale is ``sqrt(r_new)``, as
    PEFT computes it (PEFT copies the flag together with ``lora_alpha = r_new``).
    """
    root = _unwrap(model)
    state = _state(root)
    combination_type, new_rank = _check_arguments(
        state, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
        svd_full_matrices, svd_driver, density, majority_sign_method,
    )  # fmt: skip
    _check_modules_to_save(root, adapters)
    first = state.configs[adapters[0]]
    new_config = dataclasses.replace(
        first,
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_combined_targets([state.configs[a] for a in adapters]),
        alpha_pattern={},
        rank_pattern={},
    )
    candidates = list(_walk(root))
    with warnings.catch_warnings():  # _inject below resolves the same targets again and warns once
        warnings.simplefilter("ignore")
        matched, _ = _targets.resolve_targets(root, candidates, new_config, False, kind_of)

    factors: dict[str, dict[str, Tensor]] = {}
    same_dtype_as_base = True
    with torch.no_grad():
        for name, layer in matched:
            present = [
                (a, float(w)) for a, w in zip(adapters, weights) if isinstance(layer, LoraLayer) and a in layer.r
            ]
            if not present:
                raise ValueError(
                    f"lora_ext: module {name!r} is targeted by the combined config but holds none of the adapters "
                    f"{list(adapters)}"
                )
            if combination_type != "linear" and isinstance(layer, LoraConvNd) and layer.base_layer.groups > 1:
                raise ValueError(
                    f"lora_ext: combination_type={combination_type!r} is not defined for the grouped convolution "
                    f"{name!r} (groups={layer.base_layer.groups}); use 'linear'"
                )
            if svd_driver is not None and layer.base_layer.weight.device.type != "cuda":
                raise ValueError(f"lora_ext: svd_driver={svd_driver!r} needs CUDA tensors; {name!r} is on the CPU")
            if combination_type == "linear":
                a_new, b_new = _linear(name, layer, present)
            elif combination_type == "cat":
                a_new, b_new = _cat(layer, present, new_rank)
            else:
                a_new, b_new = _svd(
                    name, layer, present, new_rank, svd_clamp, svd_full_matrices, svd_driver
                )  # fmt: skip
            key_a, key_b = layer.factor_keys
            factors[name] = {key_a: a_new, key_b: b_new}
            source = layer.adapter_tensors(present[0][0])[key_a]
            same_dtype_as_base &= source.dtype == layer.base_layer.weight.dtype

    # Everything is computed and checked: only now is the model changed.
    _inject(
        root,
        new_config,
        adapter_name,
        strict=False,
        autocast_adapter_dtype=not same_dtype_as_base,  # the new factors take the source factors' dtype
        weights=factors,
    )


# ---------------------------------------------------------------------- checks


def _check_arguments(
    state: LoraState,
    adapters,
    weights,
    adapter_name,
    combination_type,
    svd_rank,
    svd_clamp,
    svd_full_matrices,
    svd_driver,
    density,
    majority_sign_method,
) -> tuple[str, int]:
    """Validate the call; returns the effective combination type and the new rank."""
    configs = state.configs
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"lora_ext: adapters must be a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (list, tuple)):
        raise ValueError(f"lora_ext: weights must be a list of numbers (one per adapter), got {weights!r}")
    if len(weights) != len(adapters):
        raise ValueError(
            f"lora_ext: {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter"
        )  # fmt: skip
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
            raise ValueError(f"lora_ext: weights must be finite real numbers, got {w!r}")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"lora_ext: adapters lists a name twice: {list(adapters)}")
    _check_names(state, list(adapters))
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"lora_ext: adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    if adapter_name in configs:
        raise ValueError(f"lora_ext: the model already has an adapter named {adapter_name!r}")
    if combination_type in _NOT_IMPLEMENTED:
        raise ValueError(
            f"lora_ext: combination_type={combination_type!r} is not implemented; lora_ext implements "
            f"{list(COMBINATION_TYPES)} (combine in PEFT for TIES/DARE/magnitude pruning)"
        )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"lora_ext: combination_type must be one of {list(COMBINATION_TYPES)}, got {combination_type!r}"
        )  # fmt: skip
    if density is not None:
        raise ValueError(
            f"lora_ext: density={density!r} only applies to TIES/DARE/magnitude pruning, which are not implemented; "
            f"it would be ignored by combination_type={combination_type!r}"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"lora_ext: majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if majority_sign_method != "total":
        raise ValueError(
            "lora_ext: majority_sign_method only applies to TIES, which is not implemented; it would be ignored"
        )
    if len(adapters) == 1:
        combination_type = "linear"  # PEFT's rule: one adapter can only be scaled
    svd_options = {
        "svd_rank": (svd_rank, None),
        "svd_clamp": (svd_clamp, None),
        "svd_full_matrices": (svd_full_matrices, True),
        "svd_driver": (svd_driver, None),
    }
    if combination_type != "svd":
        given = [f"{k}={v!r}" for k, (v, default) in svd_options.items() if v is not default and v != default]
        if given:
            why = " (a single adapter is combined linearly)" if len(adapters) == 1 else ""
            raise ValueError(
                f"lora_ext: {', '.join(given)} only apply to combination_type='svd'{why}; they would be ignored"
            )
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"lora_ext: svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and (
        isinstance(svd_clamp, bool) or not isinstance(svd_clamp, Real) or not 0.0 <= svd_clamp <= 1.0
    ):
        raise ValueError(f"lora_ext: svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}")
    if not isinstance(svd_full_matrices, bool):
        raise ValueError(f"lora_ext: svd_full_matrices must be True or False, got {svd_full_matrices!r}")
    if svd_driver not in _SVD_DRIVERS:
        raise ValueError(f"lora_ext: svd_driver must be one of {list(_SVD_DRIVERS)}, got {svd_driver!r}")

    # PEFT sizes the new adapter from each config's largest rank (rank_pattern included).
    ranks = [max([configs[a].r, *configs[a].rank_pattern.values()]) for a in adapters]
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                f"lora_ext: combination_type='linear' needs adapters of one rank, got ranks "
                f"{dict(zip(adapters, ranks))}; use 'cat' or 'svd'"
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    kinds = {isinstance(configs[a].target_modules, str) for a in adapters}
    if len(kinds) > 1:
        raise ValueError(
            "lora_ext: the adapters' target_modules mix regex strings and name lists; PEFT cannot combine them either"
        )
    return combination_type, new_rank


def _check_modules_to_save(root: nn.Module, adapters) -> None:
    for name, module in root.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and sum(a in module.modules_to_save for a in adapters) > 1:
            raise ValueError(
                f"lora_ext: more than one of the adapters {list(adapters)} trains a copy of {name!r} "
                "(modules_to_save); such copies cannot be combined"
            )


def _combined_targets(configs: list[LoraConfig]) -> list[str] | str:
    """PEFT's rule: regexes joined by ``|``, name lists united."""
    if isinstance(configs[0].target_modules, str):
        return "|".join(f"({c.target_modules})" for c in configs)
    return sorted(set().union(*(c.target_modules for c in configs)))


# ----------------------------------------------------------------- combinations


def _source_factors(layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor]:
    """The (A, B) tensors of ``adapter`` as stored (PEFT's lora_A/lora_B or lora_embedding_A/B)."""
    a, b = layer.adapter_tensors(adapter).values()
    return a.detach(), b.detach()


def _weighted_sum(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """PEFT's task_arithmetic: ``Σ w_i t_i`` with the weights as a float32 tensor (its type promotion)."""
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights).to(stacked.device)
    return (stacked * w.view(-1, *([1] * (stacked.dim() - 1)))).sum(dim=0)


def _linear(name: str, layer: LoraLayer, present: list[tuple[str, float]]) -> tuple[Tensor, Tensor]:
    a_list, b_list, w_a, w_b = [], [], [], []
    for adapter, weight in present:
        a, b = _source_factors(layer, adapter)
        if a_list and (a.shape != a_list[0].shape or b.shape != b_list[0].shape):
            raise ValueError(
                f"lora_ext: combination_type='linear' needs one rank per layer; {name!r} has adapters of ranks "
                f"{[layer.r[x] for x, _ in present]}"
            )
        ws = weight * layer.scaling[adapter]
        sign = 1 if ws >= 0 else -1  # on one factor only, or the signs would cancel
        w_a.append(math.sqrt(abs(ws)) * sign)
        w_b.append(math.sqrt(abs(ws)))
        a_list.append(a)
        b_list.append(b)
    dtype = a_list[0].dtype
    return _weighted_sum(a_list, w_a).to(dtype), _weighted_sum(b_list, w_b).to(dtype)


def _cat(layer: LoraLayer, present: list[tuple[str, float]], new_rank: int) -> tuple[Tensor, Tensor]:
    a_list, b_list = [], []
    for adapter, weight in present:
        a, b = _source_factors(layer, adapter)
        a_list.append(a * weight * layer.scaling[adapter])
        b_list.append(b)
    a_cat, b_cat = torch.cat(a_list, dim=0), torch.cat(b_list, dim=1)
    # Ranks lowered by a rank_pattern leave the last rows of A / columns of B zero, as in PEFT.
    a_new = a_cat.new_zeros((new_rank, *a_cat.shape[1:]))
    b_new = b_cat.new_zeros((b_cat.shape[0], new_rank, *b_cat.shape[2:]))
    a_new[: a_cat.shape[0]] = a_cat
    b_new[:, : b_cat.shape[1]] = b_cat
    return a_new, b_new


def _delta_matrix(layer: LoraLayer, adapter: str) -> Tensor:
    """``s · B A`` as an ``[out, in]`` matrix (convolutions: ``[out, in·k]``), PEFT's get_delta_weight numerics."""
    a, b = _source_factors(layer, adapter)
    if isinstance(layer, LoraEmbedding):
        a_m, b_m = a, b  # lora_embedding_A [r, V], lora_embedding_B [D, r]: B A is [D, V]
    else:
        a_m, b_m = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    dtype = a_m.dtype
    cast = a_m.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)  # PEFT: no low-precision CPU GEMM
    if cast:
        a_m, b_m = a_m.float(), b_m.float()
    delta = (b_m @ a_m) * layer.scaling[adapter]
    return delta.to(dtype) if cast else delta


def _svd(
    name: str,
    layer: LoraLayer,
    present: list[tuple[str, float]],
    new_rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[Tensor, Tensor]:
    delta = _weighted_sum([_delta_matrix(layer, a) for a, _ in present], [w for _, w in present])
    if new_rank > min(delta.shape):
        raise ValueError(
            f"lora_ext: svd rank {new_rank} exceeds what {name!r} allows: its update is a "
            f"{list(delta.shape)} matrix (rank at most {min(delta.shape)}); pass a smaller svd_rank"
        )
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    u = u[:, :new_rank] @ torch.diag(s[:new_rank])
    vh = vh[:new_rank, :]
    if clamp is not None:
        hi = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), clamp)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    a_shape, b_shape = _source_factors(layer, present[0][0])
    return vh.reshape(new_rank, *a_shape.shape[1:]), u.reshape(b_shape.shape[0], new_rank, *b_shape.shape[2:])
