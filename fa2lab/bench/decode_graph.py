"""Per-token latency of a DecodeSession step on CUDA, with and without a CUDA graph.

    python -m fa2lab.bench.decode_graph
"""

from __future__ import annotations

import time

import torch

from fa2lab.kvcache import DecodeSession


def per_token_us(cuda_graph: bool, batch=1, heads_q=32, heads_kv=8, head_dim=128, prefill=8192, steps=200) -> float:
    s = DecodeSession(batch, heads_q, heads_kv, prefill + steps + 16, head_dim, dtype=torch.bfloat16, device="cuda",
                      cuda_graph=cuda_graph, backend="triton").init()
    s.cache.k.normal_()
    s.cache.v.normal_()
    s.cache.lengths.fill_(prefill)
    s._host_len = prefill
    q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, heads_kv, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    for t in range(steps + 10):
        if t == 10:  # after warm-up (compilation, graph capture)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        s.load_qkv(q, k, k)
        s.decode()
        s.get_output()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    for prefill in (1024, 8192, 32768):
        eager = per_token_us(False, prefill=prefill)
        graph = per_token_us(True, prefill=prefill)
        print(f"decode step B=1 Hq=32 Hkv=8 D=128 L~{prefill}: eager {eager:7.1f} us/token, "
              f"CUDA graph {graph:7.1f} us/token ({eager / graph:.1f}x)")


if __name__ == "__main__":
    main()
