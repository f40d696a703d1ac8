"""Host cost of the pieces of one Gluon forward call on a GPU (B=1, Hq=16, Hkv=8, N=1024, D=128, causal, bf16,
transformers' layout): what a cached launcher could save. Each line: host us per call, 2000 calls, median of
5 rounds (the GPU kernel is ~12 us; the loop is host-bound, synchronised between rounds only).

  gluon_fwd                       the whole wrapper (allocations, config, Triton's launch)
  kernel[grid](...)               Triton's JIT launch: bind + specialise + cache lookup + launch
  CompiledKernel.run(...)         the compiled kernel's launcher called directly (pre-bound arguments)
  torch.empty x2                  the out / lse allocations
  hopper_eligible, gluon_fwd_wanted, get_device_capability: the dispatch checks
Run: PYTHONPATH=. python experiments/launch_cost_gpu.py"""
import statistics, time
import torch
import triton
from fa2lab.kernels import gluon_fwd as G
from fa2lab.kernels.hopper_config import GLUON_FWD, gluon_fwd_wanted, hopper_eligible
from fa2lab.kernels.common import LOG2E

q = torch.randn(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k, v = (torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
out = torch.empty(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
lse = torch.empty(1, 16, 1024, device="cuda", dtype=torch.float32)
s = 128 ** -0.5
G.gluon_fwd(q, k, v, scale=s, left=-1, right=0)
cfg = dict(GLUON_FWD[128]); cfg.pop("WS")
cfg.update(CONSUMERS=2, CONSUMER_REGS=240, maxnreg=168)
st = lambda t: t.stride()[:3]  # noqa: E731
args = (q, k, v, out, lse, *st(q), *st(k), *st(v), *st(out), *lse.stride(), 16, 1024, 1024, 2, 128, 8,
        s * LOG2E, 0, 0)
const = dict(HEAD_DIM=128, HAS_LEFT=False, HAS_RIGHT=True, LONGEST_FIRST=True, **cfg)
grid = (8 * 16,)
kern = G._gluon_fwd_ws_kernel
compiled = kern[grid](*args, **const)
dev = torch.cuda.current_device()
binder = kern.device_caches[dev][4]
bound, _, _ = binder(*args, **const)
values = list(bound.values())
stream = torch.cuda.current_stream().cuda_stream
compiled._init_handles()


def direct():
    compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *values)


cases = {
    "gluon_fwd": lambda: G.gluon_fwd(q, k, v, scale=s, left=-1, right=0),
    "kernel[grid](...)": lambda: kern[grid](*args, **const),
    "CompiledKernel.run(...)": direct,
    "torch.empty x2": lambda: (torch.empty(1, 1024, 16, 128, device="cuda", dtype=torch.bfloat16),
                               torch.empty(1, 16, 1024, device="cuda", dtype=torch.float32)),
    "hopper_eligible": lambda: hopper_eligible(q, k, v),
    "gluon_fwd_wanted": lambda: gluon_fwd_wanted(q, k, v),
    "get_device_capability": lambda: torch.cuda.get_device_capability(q.device),
    "torch.cuda.current_stream": lambda: torch.cuda.current_stream().cuda_stream,
}
res = {n: [] for n in cases}
with torch.no_grad():
    for _ in range(5):
        for name, fn in cases.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(2000):
                fn()
            res[name].append((time.perf_counter() - t0) / 2000 * 1e6)
            torch.cuda.synchronize()
torch.testing.assert_close(G.gluon_fwd(q, k, v, scale=s, left=-1, right=0)[0], out)  # direct launch wrote the same
for name in cases:
    print(f"{name:<28} {statistics.median(res[name]):7.1f} us per call (host; rounds {min(res[name]):.1f}-"
          f"{max(res[name]):.1f})")
