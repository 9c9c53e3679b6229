"""The op library: one registry (``_library``) for every op family, one validation
contract (``checks``), the pure-PyTorch kernels (``reference``) and the public
typed functions (``functional``).

Importing this package loads the compiled library (``_loader``) and registers
the dense (``dense``), DoRA (``dora``), exact merge (``exact_merge``), mixed-adapter (``mixed``)
and NF4 (``nf4``) op families with the dispatcher.
"""

from . import dense, dora, exact_merge, mixed, nf4  # noqa: F401  (register the op families)
from ._library import fallback_dispatch_keys
from ._loader import build_info, extension_loaded
from .dora import dora_linear, dora_weight_norm, weight_sq_norm
from .functional import *  # noqa: F403  (the public functions, functional.__all__)
from .functional import __all__ as _functional_all
from .mixed import lora_linear_mixed

__all__ = [
    *_functional_all,
    "build_info",
    "dora_linear",
    "dora_weight_norm",
    "extension_loaded",
    "fallback_dispatch_keys",
    "lora_linear_mixed",
    "weight_sq_norm",
]
