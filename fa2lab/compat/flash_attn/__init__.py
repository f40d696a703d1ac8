"""flash-attn 2.8's Python API on fa2lab: `from fa2lab.compat.flash_attn import flash_attn_func`.

After `fa2lab.compat.install()`, `import flash_attn` and `import flash_attn.flash_attn_interface`
resolve here, for code that cannot be edited. See `flash_attn_interface` for what differs.
"""

from fa2lab.compat.flash_attn.flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

# The flash-attn release whose API this reproduces (checked against its flash_attn_interface.py
# and tests/test_flash_attn.py at v2.8.3; the public API is unchanged up to 2.8.4).
__version__ = "2.8.3"

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
