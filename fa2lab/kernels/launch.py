"""Launching a compiled Triton or Gluon kernel again without Triton's per-call binding.

`kernel[grid](*args, **constexprs)` binds every argument to the signature, specialises each one
(dtype, 16-byte alignment, integer == 1 or divisible by 16), hashes the result and looks the
compiled kernel up, on every call: ~20-40 us of host time for a kernel of 30-60 arguments, which
is more than a 1k-token forward takes on an H200 and shows in every layer of an eager model.
After a first launch has compiled the kernel, `CompiledKernel[grid]` launches it directly, given
every parameter positionally (the compile-time constants last), as `JITFunction.run` does
(Triton >= 3.2). `KernelLaunch` remembers, per argument signature, that direct launcher:

    _launch = KernelLaunch(_my_kernel)
    _launch(grid, (q, k, v, out), (stride, n, scale), BLOCK_M=128, num_warps=4)

The signature is finer than Triton's specialisation, so a direct launch never runs a kernel
compiled for other arguments: the grid, every scalar's exact value and type, each tensor's dtype
and device, and the compile-time constants and options; only calls whose tensors are all 16-byte
aligned are remembered (Triton specialises pointers on that). A launcher that refuses the
arguments (another Triton's calling convention) does so before launching: that signature then
keeps Triton's own launch. Nothing binds while a CUDA graph is being captured, and the
interpreter (`TRITON_INTERPRET=1`) always takes Triton's launch. `KernelLaunch.ENABLED = False`
(or FA2LAB_DIRECT_LAUNCH=0 in the environment) turns direct launches off everywhere.
"""

from __future__ import annotations

import os

import torch

from fa2lab.kernels.common import interpreting


def capturing(device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device`."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def bind_compiled(kernel, compiled, grid, n_args: int, constexprs: dict):
    """(CompiledKernel[grid], trailing constants) for launching `compiled` (what `kernel[grid](...)`
    returned) directly with n_args leading arguments, or None where that is not possible (the
    interpreter, a Triton without compiled-kernel launchers, a constant not given by name)."""
    if interpreting() or not hasattr(compiled, "function") or not hasattr(compiled, "__getitem__"):
        return None
    names = kernel.arg_names[n_args:]
    if any(name not in constexprs for name in names):
        return None
    grid = (*grid, 1, 1)[:3]  # the compiled kernel's launcher reads all three grid dimensions
    return compiled[grid], [constexprs[name] for name in names]


class KernelLaunch:
    """`kernel[grid](*tensors, *scalars, **constexprs)`, launched directly after the first launch of
    each argument signature (the module docstring says when). tensors: the leading tensor
    arguments; scalars: the int / float arguments after them."""

    ENABLED = os.environ.get("FA2LAB_DIRECT_LAUNCH", "1") != "0"
    MEMORY = 256  # signatures remembered per kernel; all are forgotten past this many

    def __init__(self, kernel):
        self.kernel = kernel
        self._bound: dict = {}  # signature -> (runner, constants) | None (Triton's launch only)

    def __call__(self, grid, tensors: tuple, scalars: tuple, **constexprs):
        self.launch(grid, tensors, scalars, constexprs, None)

    def launch(self, grid, tensors: tuple, scalars: tuple, constexprs: dict, static):
        """As calling it; static: None, or a hashable value that the caller computed once and that
        determines grid, scalars (values and types) and constexprs (a plan of one call signature),
        so that only the tensors' part of the signature is built per call."""
        key = self._signature(grid, tensors, scalars, constexprs, static)
        if key is not None:
            bound = self._bound.get(key)
            if bound is not None:
                runner, constants = bound
                try:
                    runner(*tensors, *scalars, *constants)
                    return
                except TypeError:  # refused before launching: a calling convention of another Triton
                    self._bound[key] = None
        compiled = self.kernel[grid](*tensors, *scalars, **constexprs)
        if key is not None and key not in self._bound and not capturing(tensors[0].device):
            if len(self._bound) >= self.MEMORY:
                self._bound.clear()
            self._bound[key] = bind_compiled(self.kernel, compiled, grid, len(tensors) + len(scalars), constexprs)

    def _signature(self, grid, tensors, scalars, constexprs, static=None):
        if not self.ENABLED or interpreting():
            return None
        aligned = 0
        for t in tensors:
            aligned |= t.data_ptr()
        if aligned & 15:
            return None
        first = tensors[0]
        if static is not None:
            return (static, first.get_device(), tuple(t.dtype for t in tensors))
        return (grid, first.get_device(), tuple(t.dtype for t in tensors), scalars, tuple(map(type, scalars)),
                tuple(constexprs.items()))


__all__ = ["KernelLaunch", "bind_compiled", "capturing"]
