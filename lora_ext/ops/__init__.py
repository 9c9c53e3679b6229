"""The op library: one registry (``_library``) for every op family, one validation
contract (``checks``), the pure-PyTorch kernels (``reference``) and the public
typed functions (``functional``).

Importing this package loads the compiled library (``_loader``) and registers
the dense (``dense``), DoRA (``dora``) and NF4 (``nf4``) op families with the dispatcher.
"""

from . import dense, dora, nf4  # noqa: F401  (register the op families)
from ._library import fallback_dispatch_keys
from ._loader import build_info, extension_loaded
from .dora import dora_linear, dora_weight_norm, weight_sq_norm
from .functional import *  # noqa: F403  (the public functions, functional.__all__)
from .functional import __all__ as _functional_all

__all__ = [
    *_functional_all,
    "build_info",
    "dora_linear",
    "dora_weight_norm",
    "extension_loaded",
    "fallback_dispatch_keys",
    "weight_sq_norm",
]
