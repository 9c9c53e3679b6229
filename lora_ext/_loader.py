"""Loads the compiled library (``lora_ext._C``); never makes ``import lora_ext`` fail.

Importing ``_C`` runs its static initialisers, which register the op schemas
(TORCH_LIBRARY) and the CPU/CUDA kernels with the PyTorch dispatcher. When the
library is missing, was built against another torch, or is disabled with
``LORA_EXT_DISABLE_EXTENSION=1``, :mod:`lora_ext._ops` defines the same schemas
from Python and serves every device with the pure-PyTorch implementation.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Any

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

_C: Any = None
_load_error: str | None = None

DISABLED_BY_ENV = os.environ.get("LORA_EXT_DISABLE_EXTENSION", "").strip().lower() not in ("", "0", "false", "no")

if DISABLED_BY_ENV:
    _load_error = "disabled by LORA_EXT_DISABLE_EXTENSION"
else:
    try:
        if importlib.util.find_spec(f"{__package__}._C") is None:
            raise ImportError(f"no compiled library ({__package__}/_C*.so) next to the package")
        from . import _C  # type: ignore[attr-defined,no-redef]  # noqa: F401
    except (ImportError, OSError) as exc:  # missing .so, undefined symbol, wrong torch ABI
        _C = None
        _load_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            "lora_ext: the compiled extension could not be loaded "
            f"({_load_error}); every op runs on the pure-PyTorch fallback. "
            "Rebuild with `pip install --no-build-isolation -e .` against the installed torch.",
            RuntimeWarning,
            stacklevel=2,
        )


def extension_loaded() -> bool:
    """Whether the compiled C++/CUDA library is loaded (False means the pure-PyTorch fallback)."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """How the loaded library was built.

    Returns:
        dict with ``extension_loaded`` (bool), ``cuda`` (CUDA kernels compiled),
        ``cuda_archs`` (e.g. ``"8.0;9.0+PTX"``), ``cuda_version`` (toolkit it was
        built with, or None), ``torch_version`` (the torch it was compiled
        against), ``runtime_torch_version`` and ``load_error`` (why the
        fallback is in use, or None).
    """
    info: dict[str, Any]
    if _C is not None:
        info = dict(_C.build_info())
    else:
        info = {"cuda": False, "cuda_archs": "", "cuda_version": None, "torch_version": None}
    info["extension_loaded"] = _C is not None
    info["runtime_torch_version"] = torch.__version__
    info["load_error"] = _load_error
    return info
