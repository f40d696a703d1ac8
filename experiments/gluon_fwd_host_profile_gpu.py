"""cProfile of 2000 back-to-back `gluon_fwd` calls (B=1, Hq=16, Hkv=8, N=1024, D=128, causal, bf16, transformers'
layout) on a GPU: where the wrapper's host time goes once the launch is direct (kernels/launch.py), and
whether it is (the KernelLaunch's remembered signatures). Run: PYTHONPATH=. python experiments/gluon_fwd_host_profile_gpu.py"""
import cProfile, pstats, time
import torch
from fa2lab.kernels import gluon_fwd as G

q = torch.randn(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k, v = (torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
call = lambda: G.gluon_fwd(q, k, v, scale=128 ** -0.5, left=-1, right=0)  # noqa: E731
for _ in range(50):
    call()
torch.cuda.synchronize()
print("bound signatures:", {ws: [b is not None for b in l._bound.values()] for ws, l in G._LAUNCH.items()})
t0 = time.perf_counter()
for _ in range(2000):
    call()
print(f"gluon_fwd host {(time.perf_counter() - t0) / 2000 * 1e6:.1f} us per call (unprofiled)")
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(2000):
    call()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(16)
