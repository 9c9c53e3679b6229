"""Rank guidance: a starting rank from task and model size, and what a trained adapter actually used.

:func:`suggest_rank` is a rule of thumb (the table below); :func:`rank_report`
measures a trained adapter: the singular values of each layer's update
``s·B A``, computed from the small factors (two thin QR decompositions and the
SVD of an ``r×r`` matrix, never the ``N×K`` product), and the effective rank
that holds a given share of its energy. :func:`rank_pattern_from_report` turns
that into a ``rank_pattern`` for the next run.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

__all__ = ["rank_pattern_from_report", "rank_report", "suggest_lora_alpha", "suggest_rank"]

_SIZE_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_SEVEN_B = 7e9


def _parameter_count(model_size: Any) -> float:
    if isinstance(model_size, bool):
        raise TypeError(f"lora_ext: model_size must be a string such as '7B' or a parameter count, got {model_size!r}")
    if isinstance(model_size, (int, float)):
        if not math.isfinite(model_size) or model_size <= 0:
            raise ValueError(f"lora_ext: model_size must be a positive parameter count, got {model_size!r}")
        return float(model_size)
    if isinstance(model_size, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBT]?)\s*", model_size.upper())
        if m is None or float(m.group(1)) <= 0:
            raise ValueError(
                f"lora_ext: model_size {model_size!r} is not a size such as '1B', '7B', '70B', '350M' or a count"
            )
        return float(m.group(1)) * _SIZE_SUFFIX[m.group(2)]
    raise TypeError(f"lora_ext: model_size must be a string such as '7B' or a parameter count, got {model_size!r}")


def suggest_rank(task_complexity: str, model_size: str | int | float) -> int:
    """A starting LoRA rank.

    ========== =================== ==============
    task       below 7B parameters 7B and above
    ========== =================== ==============
    "simple"   8                   8
    "medium"   16                  32
    "complex"  64                  128
    other      16                  16
    ========== =================== ==============

    Args:
        task_complexity: ``"simple"`` (format/style, one narrow skill), ``"medium"`` (a domain or a task
            family), ``"complex"`` (new knowledge, reasoning, a new language); case-insensitive. Any other
            value gets the general default 16.
        model_size: ``"1B"``, ``"7B"``, ``"70B"``, ``"350M"``, ... or a parameter count.

    Pair it with ``lora_alpha = r`` (:func:`suggest_lora_alpha`), or ``2 r`` for stronger adaptation; then
    measure what the trained adapter used with :func:`rank_report`.
    """
    count = _parameter_count(model_size)
    task = task_complexity.strip().lower() if isinstance(task_complexity, str) else None
    large = count >= _SEVEN_B
    if task == "simple":
        return 8
    if task == "medium":
        return 32 if large else 16
    if task == "complex":
        return 128 if large else 64
    return 16


def suggest_lora_alpha(r: int, stronger: bool = False) -> int:
    """``lora_alpha = r`` (scale 1), or ``2 r`` (scale 2) for stronger adaptation."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"lora_ext: r (the rank) must be a positive integer, got {r!r}")
    return 2 * r if stronger else r


def _singular_values(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of ``scale · B A`` (B [N, r], A [r, K]) from the factors, float64, descending."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    _, rb = torch.linalg.qr(b64, mode="reduced")  # B = Qb Rb
    _, ra = torch.linalg.qr(a64.t(), mode="reduced")  # Aᵀ = Qa Ra
    core = scale * (rb @ ra.t())  # B A = Qb (Rb Raᵀ) Qaᵀ, with orthonormal Qb, Qa
    return torch.linalg.svdvals(core).cpu()


def _effective_rank(sv: torch.Tensor, energy: float) -> int:
    sq = sv.square()
    total = sq.sum().item()
    if total == 0.0:
        return 0
    cum = torch.cumsum(sq, 0) / total
    # A relative tolerance of a few ulps: energy=1.0 must not demand more than the sum itself.
    return int(torch.searchsorted(cum, torch.tensor([energy - 1e-12], dtype=cum.dtype)).item()) + 1


def rank_report(model: nn.Module, adapter_name: str | None = None, energy: float = 0.9) -> list[dict[str, Any]]:
    """One dict per adapted layer: how much of its rank the adapter uses.

    Args:
        model: a model with lora_ext adapters.
        adapter_name: default the active adapter.
        energy: share of the update's squared Frobenius norm the effective rank must hold, in (0, 1].

    Returns:
        dicts with ``name``, ``r``, ``scale``, ``d_in``, ``d_out``, ``singular_values`` (float64 tensor of
        ``s·BA``'s singular values, descending), ``effective_rank`` (smallest k whose top-k singular values hold
        ``energy`` of ``Σσ²``; 0 for a zero update), ``energy_captured`` (the share those k hold),
        ``params`` (``r·(d_in + d_out)``), ``params_at_effective_rank`` and ``params_saved`` (what a
        ``rank_pattern`` with the effective rank, at least 1, would save on that layer).
    """
    from .model.inject import _state, _unwrap, lora_layers

    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"lora_ext: energy must be a number in (0, 1], got {energy!r}")
    root = _unwrap(model)
    state = _state(root)
    if adapter_name is None:
        if len(state.active) != 1:
            raise ValueError(f"lora_ext: several adapters are active {list(state.active)}; pass adapter_name")
        adapter_name = state.active[0]
    if adapter_name not in state.configs:
        raise ValueError(f"lora_ext: unknown adapter {adapter_name!r}; the model has adapters {list(state.configs)}")
    out = []
    for name, layer in lora_layers(root):
        if adapter_name not in layer.adapters:
            continue
        a, b = layer.delta_factors(adapter_name)
        r = layer.r[adapter_name]
        scale = layer.scaling[adapter_name]
        sv = _singular_values(a, b, scale)
        k = _effective_rank(sv, float(energy))
        sq = sv.square()
        total = sq.sum().item()
        d_in, d_out = layer.in_features, layer.out_features  # an embedding: (num_embeddings, embedding_dim)
        per_rank = d_in + d_out
        kept = max(k, 1)
        out.append(
            {
                "name": name,
                "r": r,
                "scale": scale,
                "d_in": d_in,
                "d_out": d_out,
                "singular_values": sv,
                "effective_rank": k,
                "energy_captured": (sq[:k].sum().item() / total) if total else 0.0,
                "params": r * per_rank,
                "params_at_effective_rank": kept * per_rank,
                "params_saved": (r - kept) * per_rank,
            }
        )
    return out


def rank_pattern_from_report(report: list[dict[str, Any]], min_rank: int = 1) -> dict[str, int]:
    """``{module name: max(effective_rank, min_rank)}`` for the layers whose effective rank is below their r.

    Pass it as ``LoraConfig(rank_pattern=...)``: the keys are the full module names, regex-escaped (PEFT's
    rule matches them as suffixes);
    ``sum(row["params_saved"] for row in report)`` is what it saves with ``min_rank=1``.
    """
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank <= 0:
        raise ValueError(f"lora_ext: min_rank must be a positive integer, got {min_rank!r}")
    return {
        re.escape(row["name"]): max(row["effective_rank"], min_rank)
        for row in report
        if max(row["effective_rank"], min_rank) < row["r"]
    }
