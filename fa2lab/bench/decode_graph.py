"""Per-token latency of a DecodeSession step on CUDA, with and without a CUDA graph.

    python -m fa2lab.bench.decode_graph
"""

from __future__ import annotations

import torch

from fa2lab.kvcache import DecodeSession
from fa2lab.measure.timing import once, print_process_warning, time_call


def per_token_us(cuda_graph: bool, batch=1, heads_q=32, heads_kv=8, head_dim=128, prefill=8192, steps=200) -> float:
    s = DecodeSession(batch, heads_q, heads_kv, prefill + steps + 16, head_dim, dtype=torch.bfloat16, device="cuda",
                      cuda_graph=cuda_graph, backend="triton").init()
    s.cache.k.normal_()
    s.cache.v.normal_()
    s.cache.lengths.fill_(prefill)
    s._host_len = prefill
    q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads_kv, 1, head_dim, device="cuda", dtype=torch.bfloat16)

    def step():
        s.load_qkv(q, k, k)
        s.decode()
        s.get_output()

    for _ in range(10):  # warm-up (compilation, graph capture)
        step()

    def steps_run():
        for _ in range(steps):
            step()
    # The session's cache grows with each step: timed once, marked (not retried) when contended.
    t = time_call(steps_run, device="cuda", wall=True, warmup=0, min_repeats=1, max_repeats=1, policy=once(),
                  label=f"decode steps cuda_graph={cuda_graph} L~{prefill}")
    return t.median_s / steps * 1e6


def main() -> None:
    for prefill in (1024, 8192, 32768):
        eager = per_token_us(False, prefill=prefill)
        graph = per_token_us(True, prefill=prefill)
        print(f"decode step B=1 Hq=32 Hkv=8 D=128 L~{prefill}: eager {eager:7.1f} us/token, "
              f"CUDA graph {graph:7.1f} us/token ({eager / graph:.1f}x)")
    print_process_warning()


if __name__ == "__main__":
    main()
