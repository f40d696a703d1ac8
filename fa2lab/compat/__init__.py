"""Other libraries' attention APIs on top of fa2lab.

    fa2lab.compat.flash_attn     flash-attn 2.8's Python API (flash_attn_func, ..., flash_attn_with_kvcache)
    install() / uninstall()      opt-in: `import flash_attn` resolves to it (refused if flash-attn is installed)
    use_backend(name)            context manager: the fa2lab backend those calls ask for (default "auto")
"""

from fa2lab.compat.flash_attn.options import use_backend
from fa2lab.compat.install import install, uninstall

__all__ = ["install", "uninstall", "use_backend"]
