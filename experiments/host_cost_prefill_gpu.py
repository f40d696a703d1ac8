"""Host time per prefill attention call on a GPU (B=1, Hq=16, Hkv=8, N=1024, D=128, causal, bf16, no grad),
transformers' (B, N, H, D) layout: wall time of 300 back-to-back calls / 300 (the kernel is ~12 us, so the loop
is host-bound), best of 5; then where the time goes (cProfile, top functions by own time) for the Triton
forward and the public call. Run: PYTHONPATH=. python experiments/host_cost_prefill_gpu.py"""
import cProfile, io, os, pstats, time, torch
import torch.nn.functional as F
import fa2lab
from fa2lab.kernels.attention import kernel_forward
from fa2lab.kernels.hopper_config import FWD
from fa2lab.kernels.hopper_fwd import hopper_fwd
from fa2lab.kernels.gluon_fwd import gluon_fwd
from fa2lab.models.functional import padded_attention

q = torch.randn(1, 16, 1024, 128, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(1, 8, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # transformers' layout
s = 128 ** -0.5
cases = {
    "sdpa (transformers layout)": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True),
    "fa2lab.models padded_attention (hf path)": lambda: padded_attention(qt, kt, vt, None, causal=True),
    "fa2lab.attention triton": lambda: fa2lab.attention(qt, kt, vt, causal=True, backend="triton"),
    "kernel_forward": lambda: kernel_forward(qt, kt, vt, scale=s, left=-1, right=0),
    "hopper_fwd": lambda: hopper_fwd(qt, kt, vt, scale=s, left=-1, right=0),
    "hopper_fwd, device descriptors": lambda: hopper_fwd(qt, kt, vt, scale=s, left=-1, right=0,
                                                         config=dict(FWD[128][1], HOST_DESC=False)),
    "gluon_fwd": lambda: gluon_fwd(qt, kt, vt, scale=s, left=-1, right=0),
    "fa2lab.attention triton, Gluon forward": "gluon",
}
with torch.no_grad():
    for name, fn in cases.items():
        if fn == "gluon":
            os.environ["FA2LAB_HOPPER_FWD"] = "gluon"
            fn = cases["fa2lab.attention triton"]
        try:
            for _ in range(20): fn()
            torch.cuda.synchronize()
            best = 1e9
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(300): fn()
                host = (time.perf_counter() - t) / 300
                torch.cuda.synchronize()
                best = min(best, host)
            print(f"{name:<42} {best * 1e6:7.1f} us per call (host)")
        except Exception as e:
            print(f"{name:<42} {type(e).__name__}: {str(e)[:200]}")

os.environ.pop("FA2LAB_HOPPER_FWD", None)
with torch.no_grad():
    for name in ("hopper_fwd", "fa2lab.attention triton"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200): cases[name]()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
        print(f"--- {name}: 200 calls, by own time")
        text = buf.getvalue()
        print("\n".join(l for l in text[text.index("ncalls"):].splitlines() if l.strip()))
