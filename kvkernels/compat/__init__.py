"""Drop-in signatures of other attention libraries, running on kvkernels.

    kvkernels.compat.flash_attn   flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
                                  (FlashAttention 2's inference API)
"""

from . import flash_attn

__all__ = ["flash_attn"]
