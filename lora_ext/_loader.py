"""Loads the compiled library (``lora_ext._C``); never makes ``import lora_ext`` fail.

Importing ``_C`` runs its static initialisers, which register the op schemas
(TORCH_LIBRARY) and the CPU/CUDA kernels with the PyTorch dispatcher. When the
library is missing, was built against another torch, or is disabled with
``LORA_EXT_DISABLE_EXTENSION=1``, the registry (:mod:`lora_ext._ops`) defines
the same schemas from Python and serves every device with the pure-PyTorch
implementation.

A library built against another torch is refused *before* it is imported: its
C++ ABI would not match, and importing it could register kernels that crash or
compute garbage. The build embeds ``LORA_EXT_BUILT_AGAINST_TORCH=<version>;``
(csrc/bindings.cpp); the loader reads that marker from the file and compares it
with the running ``torch.__version__``.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import re
import warnings
from typing import Any

import torch

_C: Any = None
_load_error: str | None = None
_library_path: str | None = None
_built_against: str | None = None

DISABLED_BY_ENV = os.environ.get("LORA_EXT_DISABLE_EXTENSION", "").strip().lower() not in ("", "0", "false", "no")
_MARKER = b"LORA_EXT_BUILT_AGAINST_TORCH="
_VERSION = re.compile(rb"([^;\x00]{1,64});")


def built_against_torch(path: str) -> str | None:
    """The torch version the compiled library at ``path`` was built against (None if it carries no marker)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        at = mm.find(_MARKER)
        if at < 0:
            return None
        found = _VERSION.match(mm[at + len(_MARKER) : at + len(_MARKER) + 65])
    return found.group(1).decode("ascii", "replace") if found else None


def _warn(message: str) -> None:
    warnings.warn(
        f"lora_ext: {message}; every op runs on the pure-PyTorch fallback. "
        "Rebuild with `pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=3,
    )


def _load() -> None:
    global _C, _load_error, _library_path, _built_against
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None or not spec.origin:
        _load_error = f"ImportError: no compiled library ({__package__}/_C*.so) next to the package"
        _warn(f"the compiled extension could not be loaded ({_load_error})")
        return
    _library_path = spec.origin
    try:
        _built_against = built_against_torch(spec.origin)
    except (OSError, ValueError) as exc:
        _load_error = f"{type(exc).__name__}: cannot read {spec.origin}: {exc}"
        _warn(f"the compiled extension could not be loaded ({_load_error})")
        return
    if _built_against != torch.__version__:
        _load_error = (
            f"{spec.origin} was built against torch {_built_against or '(unknown: no version marker)'} "
            f"but torch {torch.__version__} is running"
        )
        _warn(f"the compiled extension was not loaded: {_load_error}")
        return
    try:
        from . import _C as compiled  # type: ignore[attr-defined]
    except (ImportError, OSError) as exc:  # undefined symbol, missing CUDA runtime, ...
        _load_error = f"{type(exc).__name__}: {exc}"
        _warn(f"the compiled extension could not be loaded ({_load_error})")
        return
    _C = compiled


if DISABLED_BY_ENV:
    _load_error = "disabled by LORA_EXT_DISABLE_EXTENSION"
else:
    _load()


def extension_loaded() -> bool:
    """Whether the compiled C++/CUDA library is loaded (False means the pure-PyTorch fallback)."""
    return _C is not None


def build_info() -> dict[str, Any]:
    """How the loaded library was built.

    Returns:
        dict with ``extension_loaded`` (bool), ``cuda`` (CUDA kernels compiled),
        ``cuda_archs`` (e.g. ``"8.0;9.0+PTX"``), ``cuda_version`` (toolkit it was
        built with, or None), ``torch_version`` (the torch release it was
        compiled against), ``built_against_torch`` (the full version string,
        e.g. ``"2.14.1+cu130"``, read from the library file before loading it),
        ``runtime_torch_version``, ``library_path`` (the ``_C`` file found, or
        None) and ``load_error`` (why the fallback is in use, or None).
    """
    info: dict[str, Any]
    if _C is not None:
        info = dict(_C.build_info())
    else:
        info = {"cuda": False, "cuda_archs": "", "cuda_version": None, "torch_version": None}
    info["extension_loaded"] = _C is not None
    info["built_against_torch"] = _built_against
    info["runtime_torch_version"] = torch.__version__
    info["library_path"] = _library_path
    info["load_error"] = _load_error
    return info
