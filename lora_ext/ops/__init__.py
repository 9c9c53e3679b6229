"""The op library: one registry (``_library``) for every op family, one validation
contract (``checks``), the pure-PyTorch kernels (``reference``) and the public
typed functions (``functional``).

Importing this package loads the compiled library (``_loader``) and registers
the dense (``dense``), exact merge (``exact_merge``), mixed-adapter (``mixed``) and NF4 (``nf4``)
op families with the dispatcher.
"""

from . import dense, exact_merge, mixed, nf4  # noqa: F401  (register the op families)
from ._library import fallback_dispatch_keys
from ._loader import build_info, extension_loaded
from .functional import *  # noqa: F403  (the public functions, functional.__all__)
from .functional import __all__ as _functional_all
from .mixed import lora_linear_mixed

__all__ = [*_functional_all, "build_info", "extension_loaded", "fallback_dispatch_keys", "lora_linear_mixed"]
