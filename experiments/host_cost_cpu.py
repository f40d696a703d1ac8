"""Host cost of one decode-step attention call through fa2lab.hf on a CPU: the Python layers above
the kernel launch (fa2lab.hf -> models.functional route -> planned decode_attention -> kernels.ops),
with the model path forced to planned split-K decode as on CUDA and the launch stubbed
(DecodeLaunch.__call__ returns a preallocated output), Qwen3-0.6B's decode shape (B=1, Hq=32,
Hkv=8, D=128, bf16), best of 5 x 5000 calls under inference_mode. For the figure in BENCHMARKS.md
(issue 16); `prof` as the first argument adds a cProfile table.

    TRITON_INTERPRET=1 .venv/bin/python experiments/host_cost_cpu.py [prof]
"""
import cProfile
import pstats
import sys
import time

import torch
import fa2lab.hf
from fa2lab.backends import Choice
from fa2lab.kernels import decode as dk
from fa2lab.models import functional


def fake_select(case, backend="auto", **kw):
    return Choice("triton", "stub: as on CUDA", op="decode")


functional.select_backend = fake_select
outs = {}



def stub(self, q, k, v, seqlens, block_table=None, return_lse=True, alibi_slopes=None, sinks=None):
    o = outs.get(self.out_shape)
    if o is None:
        o = outs[self.out_shape] = torch.empty(self.out_shape, dtype=self.dtype)
    return o, None


dk.DecodeLaunch.__call__ = stub



class Module(torch.nn.Module):
    is_causal, training = True, False
    num_key_value_groups = 4


m = Module()
q = torch.randn(1, 1, 32, 128, dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(1, 8, 256, 128, dtype=torch.bfloat16); v = torch.randn(1, 8, 256, 128, dtype=torch.bfloat16)
fa = fa2lab.hf.make_attention_forward("auto")
N = 5000


def bench(fn):
    for _ in range(200): fn()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(N): fn()
        best = min(best, (time.perf_counter() - t0) / N * 1e6)
    return best


with torch.inference_mode():
    f = lambda: fa(m, q, k, v, None, scaling=128 ** -0.5)
    print("fa2lab (kernel stubbed) %.1f us/call" % bench(f))
    # what the stubbed launch does not pay: torch.empty of the output
    print("torch.empty(out) %.1f us" % bench(lambda: torch.empty(1, 32, 1, 128, dtype=torch.bfloat16)))
    print("transpose+contiguous %.1f us" % bench(lambda: q.transpose(1, 2).contiguous()))
    if len(sys.argv) > 1:
        pr = cProfile.Profile(); pr.enable()
        for _ in range(N): f()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
