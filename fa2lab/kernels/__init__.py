"""Triton kernels for FA2: forward, backward and split-K decode.

Imported lazily (only when the "triton" backend runs) so that `import fa2lab` needs no triton. On a
machine without CUDA the kernels run under Triton's interpreter when TRITON_INTERPRET=1 is set
before this package is imported: that is how CI tests them on the CPU.
"""
