"""4-bit frozen bases (QLoRA): the NF4 format (``nf4``), bitsandbytes' checkpoint format
(``bnb_format``) and the base layer ``LinearNF4`` with ``quantize_model`` (``linear``).

Kept free of imports so that the op library can import :mod:`lora_ext.quant.nf4`
without pulling in the layers.
"""
