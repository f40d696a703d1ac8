"""Host time of fa2lab.backends.choose on this CPU: a remembered decision against one computed each time
(backends._choose), explicit backend and auto, at Qwen3-0.6B's layer shape; best of 15 x 5000 calls.
Run: TRITON_INTERPRET=1 PYTHONPATH=. python experiments/choose_host_cost_cpu.py"""
import time, torch, fa2lab.backends as B
q = torch.randn(1, 16, 1024, 128, dtype=torch.bfloat16)
k = torch.randn(1, 8, 1024, 128, dtype=torch.bfloat16)
case = B.Case.of(q, k, k, True, (-1, -1), False)
def t(fn, n=5000):
    best = 1e9
    for _ in range(15):
        t0 = time.perf_counter()
        for _ in range(n): fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6
for _ in range(2):
    print("memo choose %.2f us" % t(lambda: B.choose("dense", [case], "triton")),
          "uncached _choose %.2f us" % t(lambda: B._choose("dense", [case], "triton")),
          "auto memo %.2f" % t(lambda: B.choose("dense", [case])), "auto uncached %.2f" % t(lambda: B._choose("dense", [case], "auto")))
