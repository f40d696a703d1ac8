"""Cache memory per token against decode output error: fp16 static, sliding window, int8, low rank.

One decode step (Nq new queries per sequence) against a cache of L tokens, each cache type filled
with the same K/V, every output compared with float64 attention on the unrounded K/V.

The K/V are synthetic with a decaying spectrum (per head, singular values ~ decay^i on a random
orthonormal basis, plus a little isotropic noise), because on i.i.d. Gaussian K/V every direction
carries the same energy and a rank-r basis would keep only r/D of it whatever the method: low
rank is meaningful only where real caches are, on K/V that concentrate in a few directions. Keys
decay faster than values, as reported for real models (keys are the more compressible).
Errors on real model caches will differ; the memory columns do not depend on the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fa2lab.kvcache.lowrank import LowRankKVCache
from fa2lab.kvcache.quantized import QuantizedKVCache
from fa2lab.kvcache.static import StaticKVCache
from fa2lab.kvcache.window import SlidingWindowKVCache
from fa2lab.reference import attention_ref


@dataclass(frozen=True)
class TradeoffRow:
    cache: str
    setting: str  # bits per stored value, rank or window
    bytes_per_token: float  # per token of one sequence: all Hkv heads, K and V, scales included
    memory_vs_fp16: float  # memory_bytes / memory_bytes of an fp16 StaticKVCache of the same (B, Hkv, L, D)
    max_abs_err: float  # max |out - out_f64|
    rel_err: float  # ||out - out_f64||_F / ||out_f64||_F
    truth: str  # what out_f64 is: full causal attention, or the same window


def decaying_spectrum_tokens(batch: int, heads: int, n: int, dim: int, *, decay: float, noise: float = 1e-2,
                             seed: int = 0) -> torch.Tensor:
    """float64 (batch, heads, n, dim) tokens whose per-head singular values fall as decay^i, scaled so
    that an element has mean square ~1 (like unit-variance activations)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(heads, dim, dim, generator=g, dtype=torch.float64))[0]  # (H, D, D)
    sigma = decay ** torch.arange(dim, dtype=torch.float64)  # (D,)
    sigma *= (dim / (sigma ** 2).sum()).sqrt()  # sum sigma^2 = D: unit mean square per element
    z = torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64) * sigma  # (B, H, n, D)
    return z @ basis.mT + noise * torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)


def cache_tradeoffs(batch: int = 2, heads_q: int = 32, heads_kv: int = 8, head_dim: int = 128,
                    cache_len: int = 2048, nq: int = 1, *, ranks=(16, 32, 64, 128), window: int = 512,
                    calib_len: int = 256, decay_k: float = 0.95, decay_v: float = 0.97, q_std: float = 2.0,
                    dtype=torch.float16, seed: int = 0) -> list[TradeoffRow]:
    """One row per cache configuration. q ~ N(0, q_std^2): logits of std ~q_std, attention a little
    peaked, as in trained models. Low-rank bases are fitted on the first calib_len tokens (the
    "prompt") of every sequence (ranks <= head_dim); the window cache is judged against windowed
    float64 attention."""
    b, hq, hkv, d, n = batch, heads_q, heads_kv, head_dim, cache_len
    k64 = decaying_spectrum_tokens(b, hkv, n, d, decay=decay_k, seed=seed)  # (B, Hkv, L, D)
    v64 = decaying_spectrum_tokens(b, hkv, n, d, decay=decay_v, seed=seed + 1)  # (B, Hkv, L, D)
    g = torch.Generator().manual_seed(seed + 2)
    q64 = q_std * torch.randn(b, hq, nq, d, generator=g, dtype=torch.float64)  # (B, Hq, Nq, D)
    q, k, v = q64.to(dtype), k64.to(dtype), v64.to(dtype)
    truth_full = attention_ref(q64, k64, v64, causal=True)  # (B, Hq, Nq, D)
    truth_window = attention_ref(q64, k64, v64, causal=True, window_size=(window - 1, 0))

    fp16_bytes = StaticKVCache(b, hkv, n, d, dtype=torch.float16).memory_bytes()
    bits = torch.finfo(dtype).bits

    def row(cache, name, setting, truth, truth_name):
        cache.append(k, v)
        out = cache.attend(q).double()
        err = out - truth
        return TradeoffRow(name, setting, cache.bytes_per_token(), cache.memory_bytes() / fp16_bytes,
                           err.abs().max().item(), (err.norm() / truth.norm()).item(), truth_name)

    rows = [row(StaticKVCache(b, hkv, n, d, dtype=dtype), "static", f"{bits}-bit", truth_full, "full")]
    rows.append(row(SlidingWindowKVCache(b, hkv, window, d, max_new_tokens=nq, dtype=dtype), "window",
                    f"W={window}, {bits}-bit", truth_window, f"window {window}"))
    rows.append(row(QuantizedKVCache(b, hkv, n, d, dtype=dtype), "int8", "8-bit + fp32 scale", truth_full, "full"))
    for r in ranks:
        cache = LowRankKVCache(b, hkv, n, d, r, dtype=dtype)
        cache.fit(k[:, :, :calib_len], v[:, :, :calib_len])
        rows.append(row(cache, "lowrank", f"r={r}, {bits}-bit", truth_full, "full"))
    return rows


def format_table(rows: list[TradeoffRow]) -> str:
    head = f"{'cache':<8} {'setting':<20} {'bytes/token':>11} {'mem vs fp16':>11} {'max abs err':>11} " \
           f"{'rel err':>9}  truth"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.cache:<8} {r.setting:<20} {r.bytes_per_token:>11.0f} {r.memory_vs_fp16:>11.3f} "
                     f"{r.max_abs_err:>11.2e} {r.rel_err:>9.2e}  {r.truth}")
    return "\n".join(lines)


def main() -> None:
    cfg = dict(batch=2, heads_q=32, heads_kv=8, head_dim=128, cache_len=2048, nq=1)
    rows = cache_tradeoffs(**cfg)
    print("decode step, " + ", ".join(f"{k}={v}" for k, v in cfg.items()) + "; synthetic K/V with a decaying "
          "spectrum (K 0.95^i, V 0.97^i), fp16 compute")
    print("bytes/token = Hkv * 2 * per-head bytes (static: 2*D*2; int8: 2*(D+4); low rank: 2*r*2, bases extra); "
          "rel err = ||out - out_f64||_F / ||out_f64||_F")
    print(format_table(rows))


if __name__ == "__main__":
    main()
