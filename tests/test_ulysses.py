"""Ulysses (head-parallel) attention: the plan (single process) and the all-to-all attention on
gloo with 2 and 4 processes, against single-process `fa2lab.attention` on the gathered sequence
(float64: to 1e-12) and, in bf16, against float64 next to PyTorch's same-dtype error (2x / 3x).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import finite_lse, max_err, raised

import fa2lab
from fa2lab.distributed import plan_ring, plan_ulysses, ulysses_attention, zigzag_shard
from fa2lab.reference import attention_ref


def test_plan_splits_heads_and_counts_bytes():
    plan = plan_ulysses(4, 1024, heads_q=32, heads_kv=8)
    assert [plan.heads_of(r)["q_heads"] for r in range(4)] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert plan.heads_of(3)["kv_heads"] == (6, 8)  # query heads 24..31 read K/V heads 6, 7 (G = 4)
    rows = plan.comm_volume(batch=1, head_dim=128, itemsize=2)
    q_bytes, kv_bytes = 32 * 1024 * 128 * 2, 8 * 1024 * 128 * 2
    assert rows[0]["bytes_sent"] == 3 * (q_bytes + 2 * kv_bytes) // 4  # (W-1)/W of q, k, v
    assert rows[1]["bytes_sent"] == 3 * q_bytes // 4
    assert [r["phase"] for r in rows] == ["forward", "forward", "backward", "backward"]


def test_plan_refuses_more_ranks_than_kv_heads():
    with pytest.raises(ValueError, match=r"Hq=32, Hkv=4, W=8.*at most Hkv=4"):
        plan_ulysses(8, 64, heads_q=32, heads_kv=4)
    with pytest.raises(ValueError, match="Hq % W"):
        plan_ulysses(4, 64, heads_q=6, heads_kv=2)


def test_ring_and_ulysses_volume_per_step():
    """The ring sends one K/V shard per step (W-1 steps forward); Ulysses a fixed (W-1)/W of
    q, k, v and out whatever W: per rank, Ulysses sends less once W grows (GQA makes K/V small)."""
    w, n, hq, hkv, d = 8, 4096, 32, 8, 128
    ring = plan_ring(w, n, causal=True).comm_volume(batch=1, heads_q=hq, heads_kv=hkv, head_dim=d, itemsize=2,
                                                     grad_itemsize=4, backward=False)
    assert len(ring) == w - 1 and all(r["bytes_sent"] == 2 * hkv * n * d * 2 for r in ring)
    uly = plan_ulysses(w, n, heads_q=hq, heads_kv=hkv).comm_volume(batch=1, head_dim=d, backward=False)
    assert sum(r["bytes_sent"] for r in uly) == int(7 / 8 * (2 * hq + 2 * hkv) * n * d * 2)


def _compare(rank, world, *, b=1, hq=4, hkv=2, n=8, nk=None, d=16, dv=None, causal=False, window=(-1, -1),
             dtype=torch.float64, layout="contiguous", seed=0):
    nk, dv = nk or n, dv or d
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(*s, generator=g, dtype=torch.float64) for s in
                   ((b, hq, world * n, d), (b, hkv, world * nk, d), (b, hkv, world * nk, dv), (b, hq, world * n, dv)))
    dlse = torch.randn(b, hq, world * n, generator=g, dtype=torch.float64)
    if layout == "zigzag":
        local = lambda x: zigzag_shard(x, rank, world).contiguous()  # noqa: E731
    else:
        local = lambda x: x[:, :, rank * x.shape[2] // world:(rank + 1) * x.shape[2] // world].contiguous()  # noqa: E731
    mask = dict(causal=causal, window_size=window)

    def run(fn, leaves_in, do_, dlse_, dt, **kw):
        leaves = [t.to(dt).requires_grad_() for t in leaves_in]
        out, lse = fn(*leaves, return_lse=True, **mask, **kw)
        loss = (out.double() * do_).sum() + (finite_lse(lse.double()) * dlse_).sum()
        return (out, lse, *torch.autograd.grad(loss, leaves))

    mine = run(ulysses_attention, [local(t) for t in (q, k, v)], local(do), local(dlse), dtype, layout=layout)
    truth = run(fa2lab.attention, [q, k, v], do, dlse, torch.float64)
    truth = [local(t) for t in truth[:1]] + [local(finite_lse(truth[1]))] + [local(t) for t in truth[2:]]
    names = ("out", "lse", "dq", "dk", "dv")
    errs = {nm: max_err(a if nm != "lse" else finite_lse(a), t) for nm, a, t in zip(names, mine, truth)}
    if dtype != torch.float64:
        naive = lambda *a, **kw: attention_ref(*a, upcast=False, **kw)  # noqa: E731
        torch_res = run(naive, [q, k, v], do, dlse, dtype)
        torch_res = [local(torch_res[0]), None] + [local(t) for t in torch_res[2:]]
        errs.update({f"torch_{nm}": max_err(a, t) for nm, a, t in zip(names, torch_res, truth) if a is not None})
    return errs


CASES = {
    2: {
        "full": lambda r, w: _compare(r, w, n=12),
        "causal": lambda r, w: _compare(r, w, n=12, causal=True),
        "gqa_causal_dv": lambda r, w: _compare(r, w, b=2, hq=6, hkv=2, n=10, d=40, dv=24, causal=True),
        "window_nq_ne_nk": lambda r, w: _compare(r, w, n=6, nk=10, window=(5, 3)),
        "zigzag_causal": lambda r, w: _compare(r, w, n=12, causal=True, layout="zigzag"),
        "bf16_gqa_causal": lambda r, w: _compare(r, w, hq=8, hkv=2, n=64, d=32, causal=True, dtype=torch.bfloat16),
        "too_few_heads": lambda r, w: raised(lambda: ulysses_attention(
            torch.randn(1, 4, 8, 8), torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8))),
    },
    4: {
        "full": lambda r, w: _compare(r, w, hq=8, hkv=4, n=6),
        "causal_gqa": lambda r, w: _compare(r, w, hq=8, hkv=4, n=8, d=24, causal=True),
        "zigzag_causal": lambda r, w: _compare(r, w, hq=4, hkv=4, n=8, causal=True, layout="zigzag"),
        "bf16_causal": lambda r, w: _compare(r, w, hq=8, hkv=4, n=32, d=32, causal=True, dtype=torch.bfloat16),
    },
}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    results = {}
    for name, case in CASES[world].items():
        try:
            results[name] = case(rank, world)
        except Exception:  # noqa: BLE001 - reported to the test process
            results[name] = {"crashed": traceback.format_exc()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _launch(world, tmp_path, deadline_s=90):
    mp.set_forkserver_preload(["torch", "torch.distributed", "fa2lab.distributed", __name__])
    ctx = mp.get_context("forkserver")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "init"), str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():  # only our own children, by handle
            p.kill()
            p.join()
    return [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else {} for r in range(world)]


@pytest.fixture(scope="module")
def uly2(tmp_path_factory):
    return _launch(2, tmp_path_factory.mktemp("uly2"))


@pytest.fixture(scope="module")
def uly4(tmp_path_factory):
    return _launch(4, tmp_path_factory.mktemp("uly4"))


def _assert_exact(results, name):
    for r, res in enumerate(results):
        errs = res[name]
        assert "crashed" not in errs, f"{name}, rank {r}:\n{errs.get('crashed')}"
        assert errs["out"] < 1e-12 and errs["lse"] < 1e-12, (name, r, errs)
        assert max(errs["dq"], errs["dk"], errs["dv"]) < 1e-11, (name, r, errs)


def _assert_within_torch_error(results, name):
    floor = torch.finfo(torch.bfloat16).eps / 4
    for r, res in enumerate(results):
        e = res[name]
        assert "crashed" not in e, e.get("crashed")
        assert e["out"] <= 2 * e["torch_out"] + floor, e
        for g in ("dq", "dk", "dv"):
            assert e[g] <= 3 * e[f"torch_{g}"] + floor, (g, e)


@pytest.mark.parametrize("name", ["full", "causal", "gqa_causal_dv", "window_nq_ne_nk", "zigzag_causal"])
def test_ulysses_2_ranks_equals_single_process(uly2, name):
    _assert_exact(uly2, name)


def test_ulysses_2_ranks_bf16_within_torch_error(uly2):
    _assert_within_torch_error(uly2, "bf16_gqa_causal")


def test_ulysses_refuses_fewer_kv_heads_than_ranks_on_every_rank(uly2):
    for res in uly2:
        e = res["too_few_heads"]
        assert e["raised"] == "ValueError" and "Hkv=1, W=2" in e["message"], e


@pytest.mark.parametrize("name", ["full", "causal_gqa", "zigzag_causal"])
def test_ulysses_4_ranks_equals_single_process(uly4, name):
    _assert_exact(uly4, name)


def test_ulysses_4_ranks_bf16_within_torch_error(uly4):
    _assert_within_torch_error(uly4, "bf16_causal")
