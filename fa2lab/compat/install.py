"""`install()`: let code that does `import flash_attn` run on fa2lab, without editing it."""

from __future__ import annotations

import importlib.util
import logging
import sys

log = logging.getLogger("fa2lab")
_NAMES = ("flash_attn", "flash_attn.flash_attn_interface")


def _ours():
    import fa2lab.compat.flash_attn as package
    import fa2lab.compat.flash_attn.flash_attn_interface as interface

    return package, interface


def install() -> None:
    """Make `import flash_attn` and `import flash_attn.flash_attn_interface` resolve to
    `fa2lab.compat.flash_attn` in this process (opt-in; logged once on the "fa2lab" logger).

    Refused with a RuntimeError when the real flash-attn is importable or already imported: its
    CUDA kernels are what that code was written for, and shadowing them would be a surprise.
    Other flash_attn submodules (bert_padding, layers, ...) are not provided."""
    package, interface = _ours()
    present = sys.modules.get("flash_attn")
    if present is package:
        return
    if present is not None:
        raise RuntimeError(f"flash_attn is already imported from {getattr(present, '__file__', present)!r}; "
                           f"fa2lab.compat.install() does not replace a loaded flash-attn. Call it before "
                           f"anything imports flash_attn, or use that flash-attn directly")
    spec = importlib.util.find_spec("flash_attn")
    if spec is not None:
        where = spec.origin or list(spec.submodule_search_locations or [])
        raise RuntimeError(f"the real flash-attn is installed ({where}); fa2lab.compat.install() refuses to shadow "
                           f"it. Use it directly, import fa2lab.compat.flash_attn explicitly, or "
                           f"`pip uninstall flash-attn` to run this code on fa2lab")
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = interface
    log.info("fa2lab: `import flash_attn` now resolves to fa2lab.compat.flash_attn (flash-attn %s API on fa2lab)",
             package.__version__)


def uninstall() -> None:
    """Undo `install()`: `import flash_attn` finds whatever is installed again."""
    package, interface = _ours()
    for name, module in zip(_NAMES, (package, interface)):
        if sys.modules.get(name) is module:
            del sys.modules[name]
