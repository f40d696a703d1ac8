"""Python host cost of fa2lab.attention(backend='triton') on this CPU, the kernel replaced by a no-op:
validation, variants, the backend choice and the autograd.Function, i.e. what a call costs before the
kernel launch (the launch itself and the Hopper checks need a GPU: experiments/host_cost_prefill_gpu.py).
B=1, Hq=16, Hkv=8, N=1024, D=128, bf16, transformers' (B, N, H, D) layout; best of 7 x 2000 calls.
Run: TRITON_INTERPRET=1 PYTHONPATH=. python experiments/host_cost_public_call_cpu.py"""
import time, torch
import fa2lab
import fa2lab.kernels.attention as KA
q = torch.randn(1, 16, 1024, 128, dtype=torch.bfloat16)
k = torch.randn(1, 8, 1024, 128, dtype=torch.bfloat16)
v = torch.randn(1, 8, 1024, 128, dtype=torch.bfloat16)
qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
out = torch.empty_like(qt); lse = torch.empty(1, 16, 1024)
KA._fwd_impl = lambda q, k, v, varlen, variants=None: ((lambda *a, **kw: (out, lse)), True)
def t(fn, n=2000):
    for _ in range(50): fn()
    best = 1e9
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6
with torch.no_grad():
    print(f"public call, no-op kernel: {t(lambda: fa2lab.attention(qt, kt, vt, causal=True, backend='triton')):.1f} us")
    print(f"Function.apply, no-op kernel: {t(lambda: KA._TritonAttention.apply(qt, kt, vt, 0.1, -1, 0)):.1f} us")
