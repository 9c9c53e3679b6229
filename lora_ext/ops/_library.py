"""One registry for every op family.

Each op is one :class:`OpDef`: its schema (the same string ``csrc/registration.cpp``
declares), its pure-PyTorch kernel (the fallback, and the tests' oracle), its
fake kernel (``torch.compile``, ``opcheck``) and, for differentiable ops, its
autograd formula. :func:`register` is the one mechanism that puts them into the
dispatcher:

- the schema is defined from Python only when the compiled library did not
  define it (no library, a library built against another torch, or
  ``LORA_EXT_DISABLE_EXTENSION=1``);
- the pure-PyTorch kernel serves every dispatch key of :data:`FALLBACK_KEYS`
  that has no compiled kernel (CPU and CUDA when the library is missing, MPS,
  XPU, ... always);
- the fake kernel and autograd are registered for every op (autograd from Python
  only when the compiled library has no autograd kernel for it: csrc/autograd.cpp
  registers lora_linear's in C++, the same formula without a Python round trip).

``tests/test_dispatcher.py`` checks that each Python schema equals the compiled one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _loader  # noqa: F401  (loads the compiled library first, so its schemas and kernels win)

NAMESPACE = "lora_ext"

# Dispatch keys that get the pure-PyTorch kernel when no compiled one is registered.
FALLBACK_KEYS = ("CPU", "CUDA", "MPS", "XPU", "PrivateUse1")


@dataclass(frozen=True)
class OpDef:
    """Everything the dispatcher needs for one op, side by side."""

    name: str
    schema: str  # "(Tensor x, ...) -> Tensor", as in csrc/registration.cpp
    reference: Callable  # pure-PyTorch kernel: fallback and oracle
    fake: Callable  # shapes/dtypes only, for torch.compile and opcheck
    backward: Callable | None = None  # torch.library.register_autograd's backward
    setup_context: Callable | None = None

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"


OPS: dict[str, OpDef] = {}
_FALLBACK_REGISTERED: dict[str, list[str]] = {}
_lib = torch.library.Library(NAMESPACE, "FRAGMENT")  # noqa: TOR901


def _schema_defined(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def register(*defs: OpDef) -> None:
    """Register each op's schema (if not compiled), fallback kernel, fake kernel and autograd."""
    for op in defs:
        if op.name in OPS:
            raise RuntimeError(f"lora_ext: op {op.name} registered twice")
        OPS[op.name] = op
        if not _schema_defined(op.qualname):
            _lib.define(op.name + op.schema)
        keys = [k for k in FALLBACK_KEYS if not torch._C._dispatch_has_kernel_for_dispatch_key(op.qualname, k)]
        for key in keys:
            _lib.impl(op.name, op.reference, key)
        _FALLBACK_REGISTERED[op.name] = keys
        torch.library.register_fake(op.qualname, op.fake, lib=_lib)
        if op.backward is not None and not _has_compiled_autograd(op.qualname):
            torch.library.register_autograd(op.qualname, op.backward, setup_context=op.setup_context, lib=_lib)


def _has_compiled_autograd(qualname: str) -> bool:
    # csrc/autograd.cpp registers the same formula in C++ (no Python round trip per call)
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def fallback_dispatch_keys(name: str) -> list[str]:
    """Dispatch keys on which op ``name`` runs the pure-PyTorch fallback (for tests and diagnostics)."""
    return list(_FALLBACK_REGISTERED.get(name, ()))


def schemas() -> dict[str, str]:
    """``{op name: schema}`` of every registered op (the Python mirror of csrc/registration.cpp)."""
    return {name: op.schema for name, op in OPS.items()}
