"""Sparse decode / prefill kernels vs dense attention on one GPU.

Run on the GPU machine: `python3 benchmarks/bench_sparse_attention.py --out benchmarks/results/x.json`.
Llama-3.1-8B attention shapes (32 query / 8 KV heads, d128, bf16) and MHA (32 / 32); fixed contexts of
32K, 128K, 512K keys; decode with 1/8 and 100% of the key blocks kept; prefill of 1K user tokens with 1/8
kept. Synthetic selections: the fixed-region blocks plus random clustered blocks up to the budget,
sorted, rotated every iteration so repeated runs do not hit in L2.

Timing is device-side: `n` chained iterations inside one jit (`lax.fori_loop`, each iteration's query
depends on the previous output), wall time / n, median of several runs, minus the same loop with the
kernel removed. Each kernel output is checked against its jnp reference (and the 100% runs against
cuDNN) before timing. Prints a table and writes JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.timing import (  # noqa: E402
    Budget,
    copy_and_read_bandwidth,
    device_time_stats,
    median_time,
    rel_err,
    torch_time,
)
from pallas_kernels.common import cdiv, random_block_selection, valid_blocks  # noqa: E402
from pallas_kernels.merge import chunked_attention_lse, dense_attention_lse, merge_attention  # noqa: E402
from pallas_kernels.sparse_decode import all_keys_attention, sparse_decode, sparse_decode_ref  # noqa: E402
from pallas_kernels.sparse_prefill import sparse_prefill, sparse_prefill_ref  # noqa: E402

D = 128
DTYPE = jnp.bfloat16
ITEM = 2
N_FIXED = 1024  # sinks + window; a multiple of 64 so every position is a real key (dense == 100% kept)
BLOCK_K = 16
SHAPES = {"gqa": (32, 8), "mha": (32, 32)}  # (query heads, KV heads)
T_PREFILL = 1024


def _median_time(fn, reps: int) -> float:
    return median_time(fn, reps)


def copy_bandwidth() -> tuple[float, float]:
    return copy_and_read_bandwidth()


def device_time(step, args, est_s: float, **kw) -> dict:
    return device_time_stats(step, args, est_s, **kw)


def budget_selection(rng: np.random.Generator, lead: tuple[int, ...], n_keys: int, keep: float,
                     rotations: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`rotations` selections `[R, *lead, M]`: fixed-region blocks + random clustered blocks, `keep` kept."""
    cand = valid_blocks(N_FIXED, N_FIXED, n_keys - N_FIXED, BLOCK_K)
    n_fixed_blocks = cdiv(N_FIXED, BLOCK_K)
    count = max(n_fixed_blocks + 1, int(round(keep * len(cand))))
    if count >= len(cand):
        ids = np.broadcast_to(cand, (rotations, *lead, len(cand))).astype(np.int32)
        return np.ascontiguousarray(ids), np.full((rotations, *lead), len(cand), np.int32), len(cand)
    pool = cand[n_fixed_blocks:]
    rows = rotations * int(np.prod(lead))
    ids = np.empty((rows, count), np.int32)
    fixed = np.arange(n_fixed_blocks, dtype=np.int32)
    for r0 in range(0, rows, 64):
        r1 = min(rows, r0 + 64)
        pick = np.argpartition(rng.random((r1 - r0, len(pool))), count - n_fixed_blocks, axis=1)
        chosen = pool[pick[:, : count - n_fixed_blocks]]
        head = np.broadcast_to(fixed, (r1 - r0, n_fixed_blocks))
        ids[r0:r1] = np.concatenate([head, np.sort(chosen, 1)], 1)
    ids = ids.reshape(rotations, *lead, count)
    return ids, np.full((rotations, *lead), count, np.int32), count


def layout(n_keys: int) -> dict:
    return dict(n_fixed=N_FIXED, fixed_pad=N_FIXED, n_clustered=n_keys - N_FIXED)


# ----------------------------------------------------------------------------------------------------
# correctness on the GPU (compiled kernels vs references), small random shapes


def gpu_checks(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    cases = [(1, 64, jnp.bfloat16), (3, 128, jnp.bfloat16), (4, 128, jnp.float32), (8, 64, jnp.float32),
             (4, 128, jnp.bfloat16)]
    for G, d, dt in cases:
        B, H, N, n_fixed, n_clustered = 2, 2, 2048, 100, 1800
        fixed_pad = 128
        q = jnp.asarray(rng.standard_normal((B, H, G, d)), dt)
        k = jnp.asarray(rng.standard_normal((H, N, d)), dt)
        v = jnp.asarray(rng.standard_normal((H, N, d)), dt)
        cand = valid_blocks(n_fixed, fixed_pad, n_clustered, 16)
        M = 60
        ids, cnt = random_block_selection(rng, (B, H), cand, rng.integers(1, M + 1, (B, H)), M)
        kw = dict(n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered)
        tol = 2e-2 if dt == jnp.bfloat16 else 1e-4
        for P, S in [(8, None), (4, 3)]:
            o, lse = sparse_decode(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), blocks_per_step=P,
                                   num_splits=S, **kw)
            o_r, lse_r = sparse_decode_ref(q, k, v, jnp.asarray(ids), jnp.asarray(cnt), **kw)
            e, el = rel_err(o, o_r), float(np.abs(np.asarray(lse) - np.asarray(lse_r)).max())
            out.append(dict(kind="decode", G=G, D=d, dtype=str(jnp.dtype(dt)), P=P, S=S, rel_err=e,
                            lse_err=el, ok=bool(e < tol and el < 1e-3)))
        T, block_q = 70, 16
        nQ = cdiv(T, block_q)
        qp = jnp.asarray(rng.standard_normal((B, H, T, G, d)), dt)
        ids, cnt = random_block_selection(rng, (B, H, nQ), cand, rng.integers(1, M + 1, (B, H, nQ)), M)
        for P, rows in [(4, None), (8, 16)]:
            if rows is not None and rows > block_q * max(G, 1):
                continue
            o, lse = sparse_prefill(qp, k, v, jnp.asarray(ids), jnp.asarray(cnt), block_q=block_q,
                                    blocks_per_step=P, block_rows=rows, **kw)
            o_r, lse_r = sparse_prefill_ref(qp, k, v, jnp.asarray(ids), jnp.asarray(cnt), block_q=block_q,
                                            **kw)
            e, el = rel_err(o, o_r), float(np.abs(np.asarray(lse) - np.asarray(lse_r)).max())
            out.append(dict(kind="prefill", G=G, D=d, dtype=str(jnp.dtype(dt)), P=P, rows=rows,
                            rel_err=e, lse_err=el, ok=bool(e < tol and el < 1e-3)))
    # huge logits, single block
    q = jnp.asarray(rng.standard_normal((1, 2, 4, 128)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 1024, 128)) * 1e3, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((2, 1024, 128)), jnp.bfloat16)
    ids = jnp.asarray([[[5, 5, 5, 5], [0, 3, 9, 60]]], jnp.int32)
    cnt = jnp.asarray([[1, 4]], jnp.int32)
    kw = dict(n_fixed=64, fixed_pad=64, n_clustered=960)
    o, lse = sparse_decode(q, k, v, ids, cnt, **kw)
    o_r, lse_r = sparse_decode_ref(q, k, v, ids, cnt, **kw)
    finite = bool(np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(lse)).all())
    e = rel_err(o, o_r)
    out.append(dict(kind="decode_huge_logits", rel_err=e, finite=finite, ok=bool(finite and e < 2e-2)))
    return out


# ----------------------------------------------------------------------------------------------------
# timed cases


def run_dense(rows: list, case: dict, q_BTND, k_HND, v_HND, est_s: float, xla_ok: bool, torch_ok: bool,
              ref_out=None) -> dict:
    """Times cuDNN / XLA (jax.nn.dot_product_attention) and torch SDPA; returns {name: seconds}."""
    times = {}
    Hq, Hk = q_BTND.shape[2], k_HND.shape[0]
    k_BSKD, v_BSKD = jnp.transpose(k_HND, (1, 0, 2))[None], jnp.transpose(v_HND, (1, 0, 2))[None]
    for name in ("cudnn", "xla"):
        if name == "xla" and not xla_ok:
            rows.append({**case, "impl": name, "skipped": "logits do not fit"})
            continue
        try:
            f = jax.jit(lambda q, k, v, name=name: jax.nn.dot_product_attention(q, k, v, implementation=name))
            o = jax.block_until_ready(f(q_BTND, k_BSKD, v_BSKD))
            err = None if ref_out is None else rel_err(o, ref_out)
            t = device_time(lambda i, q, k, v, f=f: f(q, k, v), (q_BTND, k_BSKD, v_BSKD), est_s)
            times[name] = t["s"]
            rows.append({**case, "impl": name, **t, "rel_err_vs_ref": err})
        except Exception as ex:  # a baseline that cannot run is reported, not fatal
            rows.append({**case, "impl": name, "error": repr(ex)[:400]})
        print(_fmt(rows[-1]), flush=True)
    del k_BSKD, v_BSKD
    if torch_ok:
        try:
            import torch
            import torch.nn.functional as F

            q_BHTD = jnp.transpose(q_BTND, (0, 2, 1, 3))
            qt, kt, vt = (torch.from_dlpack(x) for x in (q_BHTD, k_HND[None], v_HND[None]))
            gqa = Hq != Hk
            t = torch_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=gqa), est_s)
            times["torch_sdpa"] = t
            rows.append({**case, "impl": "torch_sdpa", "s": t})
            del qt, kt, vt
        except Exception as ex:
            rows.append({**case, "impl": "torch_sdpa", "error": repr(ex)[:400]})
        print(_fmt(rows[-1]), flush=True)
    return times


def make_inputs(name: str, n_keys: int, T: int | None):
    """KV `[Hk, N, D]` and queries (`[1, Hk, G, D]` for decode, `[1, Hk, T, G, D]` for prefill)."""
    Hq, Hk = SHAPES[name]
    key = jax.random.PRNGKey(n_keys + Hk)
    k = jax.random.normal(key, (Hk, n_keys, D), DTYPE)
    v = jax.random.normal(jax.random.fold_in(key, 1), (Hk, n_keys, D), DTYPE)
    shape = (1, Hk, Hq // Hk, D) if T is None else (1, Hk, T, Hq // Hk, D)
    q = jax.random.normal(jax.random.fold_in(key, 2), shape, DTYPE)
    return q, k, v


def decode_dense(rows: list, name: str, n_keys: int, q, k, v, copy_bw: float, read_bw: float,
                 torch_ok: bool) -> float | None:
    """Dense decode baselines over all keys (== 100% kept with this layout); returns the best time."""
    Hq, Hk = SHAPES[name]
    ids_np, cnt_np, _ = budget_selection(np.random.default_rng(0), (1, Hk), n_keys, 1.0, 1)
    ref, _ = sparse_decode_ref(q, k, v, jnp.asarray(ids_np[0]), jnp.asarray(cnt_np[0]), **layout(n_keys))
    dense_bytes = Hk * n_keys * D * 2 * ITEM
    case = dict(op="decode", shape=name, n_keys=n_keys, keep="dense", bytes=dense_bytes)
    times = run_dense(rows, case, q.reshape(1, 1, Hq, D), k, v, dense_bytes / copy_bw, True, torch_ok,
                      ref.reshape(1, 1, Hq, D))
    for r in rows:
        if r.get("op") == "decode" and r.get("n_keys") == n_keys and r.get("shape") == name and "s" in r \
                and r.get("keep") == "dense":
            r["GBps"] = dense_bytes / r["s"] / 1e9
            r["roofline_frac"] = dense_bytes / r["s"] / copy_bw
            r["read_roofline_frac"] = dense_bytes / r["s"] / read_bw
    return min(times.values()) if times else None


def decode_case(rows: list, name: str, n_keys: int, keep: float, variants: list[dict], copy_bw: float,
                read_bw: float, rng: np.random.Generator, q, k, v, best: float | None) -> None:
    Hq, Hk = SHAPES[name]
    B, R = 1, 4
    ids_np, cnt_np, count = budget_selection(rng, (B, Hk), n_keys, keep, R)
    ids_R, cnt_R = jnp.asarray(ids_np), jnp.asarray(cnt_np)
    lay = layout(n_keys)
    kv_bytes = B * Hk * count * BLOCK_K * D * 2 * ITEM
    case = dict(op="decode", shape=name, n_keys=n_keys, keep=keep, blocks=count, bytes=kv_bytes)
    for var in variants:
        kw = dict(var)
        bk = kw.pop("block_k", BLOCK_K)
        label = ",".join(f"{a}={b}" for a, b in var.items()) or "default"
        try:
            if bk != BLOCK_K:  # coarser selection granularity at the same budget
                ids_v = ids_R[..., :: bk // BLOCK_K] // (bk // BLOCK_K)
                cnt_v = jnp.full_like(cnt_R, ids_v.shape[-1])
            else:
                ids_v, cnt_v = ids_R, cnt_R

            def f(q, k, v, i, c, kw=kw, bk=bk):
                return sparse_decode(q, k, v, i, c, block_k=bk, **lay, **kw)

            o, lse = jax.jit(f)(q, k, v, ids_v[0], cnt_v[0])
            Hc = min(Hk, 2)
            o_r, lse_r = sparse_decode_ref(q[:, :Hc], k[:Hc], v[:Hc], ids_v[0][:, :Hc], cnt_v[0][:, :Hc],
                                           block_k=bk, **lay)
            err = rel_err(o[:, :Hc], o_r)
            lerr = float(np.abs(np.asarray(lse[:, :Hc]) - np.asarray(lse_r)).max())
            t = device_time(lambda i, q, k, v, ids, cnt, f=f: f(q, k, v, ids[i % R], cnt[i % R]),
                            (q, k, v, ids_v, cnt_v), kv_bytes / copy_bw,
                            base_step=lambda i, q, k, v, ids, cnt: (q, ids[i % R], cnt[i % R]))
            row = {**case, "impl": "sparse_decode", "variant": label, **t, "rel_err_vs_ref": err,
                   "lse_err": lerr, "GBps": kv_bytes / t["s"] / 1e9,
                   "roofline_frac": kv_bytes / t["s"] / copy_bw,
                   "read_roofline_frac": kv_bytes / t["s"] / read_bw}
            if best:
                row["speedup_vs_best_dense"] = best / t["s"]
            rows.append(row)
        except Exception as ex:
            rows.append({**case, "impl": "sparse_decode", "variant": label, "error": repr(ex)[:600],
                         "trace": traceback.format_exc()[-1500:]})
        print(_fmt(rows[-1]), flush=True)


def prefill_dense(rows: list, name: str, n_keys: int, q, k, v, torch_ok: bool) -> float | None:
    """Dense prefill baselines (user tokens over every fixed-context key); returns the best time."""
    Hq, Hk = SHAPES[name]
    B, T = q.shape[0], q.shape[2]
    flops = 4 * B * Hq * T * n_keys * D
    q_BTND = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, T, Hq, D)
    xla_ok = B * Hq * T * n_keys * 4 * 3 < 30e9
    case = dict(op="prefill", shape=name, n_keys=n_keys, keep="dense", T=T, flops=flops)
    times = run_dense(rows, case, q_BTND, k, v, flops / 4e14, xla_ok, torch_ok)
    for r in rows:
        if r.get("op") == "prefill" and r.get("n_keys") == n_keys and r.get("shape") == name and "s" in r \
                and r.get("keep") == "dense":
            r["TFLOPs"] = flops / r["s"] / 1e12
    return min(times.values()) if times else None


def prefill_case(rows: list, name: str, n_keys: int, keep: float, variants: list[dict], copy_bw: float,
                 rng: np.random.Generator, q, k, v, best: float | None) -> None:
    Hq, Hk = SHAPES[name]
    B, T = q.shape[0], q.shape[2]
    lay = layout(n_keys)
    case = dict(op="prefill", shape=name, n_keys=n_keys, keep=keep, T=T)
    sel_cache = {}
    for var in variants:
        kw = dict(var)
        block_q = kw.pop("block_q", 64)
        label = ",".join(f"{a}={b}" for a, b in var.items()) or "default"
        nQ = cdiv(T, block_q)
        if block_q not in sel_cache:
            sel_cache[block_q] = budget_selection(rng, (B, Hk, nQ), n_keys, keep, 2)
        ids_np, cnt_np, count = sel_cache[block_q]
        ids_R, cnt_R = jnp.asarray(ids_np), jnp.asarray(cnt_np)
        flops = 4 * B * Hq * T * count * BLOCK_K * D
        req_bytes = B * Hk * nQ * count * BLOCK_K * D * 2 * ITEM  # once per query block (tiles hit L2)
        row0 = {**case, "impl": "sparse_prefill", "variant": label, "blocks": count, "flops": flops,
                "bytes": req_bytes}
        try:
            def f(q, k, v, i, c, kw=kw, bq=block_q):
                return sparse_prefill(q, k, v, i, c, block_q=bq, **lay, **kw)

            o, lse = jax.jit(f)(q, k, v, ids_R[0], cnt_R[0])
            errs = []  # reference on one head, first and last query blocks
            for qb in (0, nQ - 1):
                t0, t1 = qb * block_q, min(T, (qb + 1) * block_q)
                o_r, _ = sparse_prefill_ref(q[:, :1, t0:t1], k[:1], v[:1], ids_R[0][:, :1, qb:qb + 1],
                                            cnt_R[0][:, :1, qb:qb + 1], block_q=block_q, **lay)
                errs.append(rel_err(o[:, :1, t0:t1], o_r))
            t = device_time(lambda i, q, k, v, ids, cnt, f=f: f(q, k, v, ids[i % 2], cnt[i % 2]),
                            (q, k, v, ids_R, cnt_R), max(flops / 4e14, req_bytes / copy_bw),
                            base_step=lambda i, q, k, v, ids, cnt: (q, ids[i % 2], cnt[i % 2]))
            row = {**row0, **t, "rel_err_vs_ref": max(errs), "TFLOPs": flops / t["s"] / 1e12,
                   "GBps": req_bytes / t["s"] / 1e9, "roofline_frac": req_bytes / t["s"] / copy_bw}
            if best:
                row["speedup_vs_best_dense"] = best / t["s"]
            rows.append(row)
        except Exception as ex:
            rows.append({**row0, "error": repr(ex)[:600], "trace": traceback.format_exc()[-1500:]})
        print(_fmt(rows[-1]), flush=True)


def exact_tail_case(rows: list, name: str, n_keys: int, q, k, v, read_bw: float, tail: int = 32) -> None:
    """The exact-question pass of `ContextAttention(exact_tail=tail)`: the last `tail` user queries over every
    context key, on the kernel path (`all_keys_attention`: the decode kernel with every block selected, what the
    GPU runs) and as XLA key chunks (`chunked_attention_lse`, the jnp path), against the roofline of one read of
    K and V."""
    Hq, Hk = SHAPES[name]
    q_t = q[:, :, -tail:]
    B, _, _, G, _ = q_t.shape
    nbytes = 2 * Hk * n_keys * D * ITEM
    every = lambda s0, s1: jnp.ones((1, 1, 1, s1 - s0), bool)  # noqa: E731
    lay = dict(n_fixed=n_keys, fixed_pad=n_keys, n_clustered=0)  # every key attended

    def kernel(q, k, v):
        o, lse = all_keys_attention(q.reshape(B, Hk, tail * G, D), k, v, **lay)
        return o.reshape(q.shape), lse

    impls = {"all_keys_attention": kernel,
             "chunked_attention_lse": lambda q, k, v: chunked_attention_lse(q, k[None], v[None], every)}
    for impl, fn in impls.items():
        row0 = dict(op="exact_tail", shape=name, n_keys=n_keys, T=tail, impl=impl, bytes=nbytes,
                    flops=4 * Hq * tail * n_keys * D)
        try:
            f = jax.jit(fn)
            o, _ = f(q_t, k, v)
            o_r, _ = dense_attention_lse(q_t[:, :1], k[None, :1], v[None, :1])
            t = device_time(lambda i, q, k, v, f=f: f(q, k, v), (q_t, k, v), nbytes / read_bw)
            row = {**row0, **t, "rel_err_vs_ref": rel_err(o[:, :1], o_r), "GBps": nbytes / t["s"] / 1e9,
                   "roofline_frac": nbytes / t["s"] / read_bw}
            sparse = [r for r in rows if r.get("op") == "prefill" and r.get("impl") == "sparse_prefill"
                      and r.get("n_keys") == n_keys and r.get("shape") == name and "s" in r]
            if sparse:
                row["vs_sparse_prefill"] = t["s"] / min(r["s"] for r in sparse)
            rows.append(row)
        except Exception as ex:
            rows.append({**row0, "error": repr(ex)[:600], "trace": traceback.format_exc()[-1500:]})
        print(_fmt(rows[-1]), flush=True)


def merge_case(rows: list, copy_bw: float) -> None:
    """The jnp LSE merge at prefill size vs the bytes roofline (decides whether a kernel could help).

    The merged result is carried into the next iteration, so every output is materialised.
    """
    shape = (1, 8, T_PREFILL, 4)
    key = jax.random.PRNGKey(3)
    o1 = jax.random.normal(key, shape + (D,), DTYPE)
    o2 = jax.random.normal(jax.random.fold_in(key, 1), shape + (D,), DTYPE)
    l1 = jax.random.normal(jax.random.fold_in(key, 2), shape, jnp.float32)
    l2 = jax.random.normal(jax.random.fold_in(key, 3), shape, jnp.float32)
    nbytes = 3 * o1.size * ITEM + 3 * l1.size * 4
    n, unroll = 320, 16

    def make(with_merge: bool):
        def loop(o1, l1, o2, l2):
            def body(i, c):
                o, lse = c
                return merge_attention(o, lse, o2, l2) if with_merge else (o + o2, lse + l2)

            return lax.fori_loop(0, n, body, (o1, l1), unroll=unroll)

        return jax.jit(loop)

    res = {}
    for name, with_merge in (("merge", True), ("add", False)):
        f = make(with_merge)
        jax.block_until_ready(f(o1, l1, o2, l2))
        res[name] = _median_time(lambda f=f: f(o1, l1, o2, l2), 5) / n
    t = res["merge"]
    rows.append({"op": "merge", "shape": "gqa", "impl": "jnp_merge_attention", "bytes": nbytes, "s": t,
                 "plain_add_s": res["add"], "GBps": nbytes / t / 1e9, "roofline_frac": nbytes / t / copy_bw})
    print(_fmt(rows[-1]), flush=True)


def _fmt(r: dict) -> str:
    head = (f"{r.get('op', ''):8s} {r.get('shape', ''):4s} {r.get('n_keys', 0) // 1024:4d}K "
            f"keep={r.get('keep', '')!s:6.6s} {r.get('impl', ''):15s} {r.get('variant', ''):32s}")
    if "s" not in r:
        return f"{head} SKIP/ERROR {str(r.get('error', r.get('skipped')))[:300]}"
    extra = ""
    if "roofline_frac" in r:
        extra += f" {r['GBps']:7.0f} GB/s roof={r['roofline_frac']:.2f}"
    if "read_roofline_frac" in r:
        extra += f" read-roof={r['read_roofline_frac']:.2f}"
    if "TFLOPs" in r:
        extra += f" {r['TFLOPs']:6.1f} TFLOP/s"
    if "speedup_vs_best_dense" in r:
        extra += f" x{r['speedup_vs_best_dense']:.2f} vs dense"
    if "vs_sparse_prefill" in r:
        extra += f" = {r['vs_sparse_prefill']:.2f} x the sparse prefill"
    if r.get("rel_err_vs_ref") is not None:
        extra += f" err={r['rel_err_vs_ref']:.1e}"
    return f"{head} {r['s'] * 1e6:10.1f} us{extra}"


DECODE_DEFAULT = [{}]
PREFILL_DEFAULT = [{}]
SWEEPS = {  # tuning variants per shape: (decode 1/8, decode 100%, prefill 1/8)
    "gqa": (
        [{"blocks_per_step": 4}, {"blocks_per_step": 16}, {"num_splits": 16}, {"num_splits": 64},
         {"num_warps": 8}, {"num_stages": 3}, {"num_stages": 4}, {"block_k": 64, "blocks_per_step": 2}],
        [{"num_splits": 64}],
        [{"blocks_per_step": 8}, {"num_stages": 3, "blocks_per_step": 8}, {"num_warps": 8},
         {"block_rows": 256}, {"block_q": 32}, {"block_q": 128}, {"block_q": 128, "blocks_per_step": 8}],
    ),
    "mha": (
        [{"blocks_per_step": 16}, {"num_splits": 16}],
        [],
        [{"blocks_per_step": 8}, {"block_q": 128}, {"block_q": 128, "blocks_per_step": 8}],
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--contexts", default="131072,32768,524288", help="fixed-context lengths (keys)")
    ap.add_argument("--shapes", default="gqa,mha")
    ap.add_argument("--sweep", default="131072", help="contexts at which to time tuning variants ('' = none)")
    ap.add_argument("--sweep-shapes", default="gqa,mha")
    ap.add_argument("--no-check", action="store_true", help="skip the GPU correctness checks")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--prefill-tokens", type=int, default=T_PREFILL)
    ap.add_argument("--time-budget", type=float, default=330.0,
                    help="seconds; later sections are skipped (a 512K case can overrun it by ~60 s)")
    args = ap.parse_args()
    budget = Budget(args.time_budget)
    dev = jax.devices()[0]
    result: dict[str, Any] = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
                              "rows": [], "checks": []}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)

    torch_ok = False
    if not args.no_torch:
        try:
            import torch

            torch_ok = torch.cuda.is_available()
            result["torch"] = torch.__version__
        except ImportError:
            pass
    copy_bw, read_bw = copy_bandwidth()
    result["copy_bw_Bps"], result["read_bw_Bps"] = copy_bw, read_bw
    print(f"device {dev.device_kind}, jax {jax.__version__}, copy {copy_bw / 1e12:.2f} TB/s, "
          f"read {read_bw / 1e12:.2f} TB/s", flush=True)
    if not args.no_check:
        t0 = time.perf_counter()
        result["checks"] = gpu_checks()
        bad = [c for c in result["checks"] if not c["ok"]]
        print(f"GPU checks: {len(result['checks']) - len(bad)}/{len(result['checks'])} ok "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for c in bad:
            print("  FAILED", c, flush=True)
        save()
    rng = np.random.default_rng(0)
    rows = result["rows"]
    contexts = [int(c) for c in args.contexts.split(",") if c]
    sweep_at = {int(c) for c in args.sweep.split(",") if c}
    sweep_shapes = args.sweep_shapes.split(",")
    plan = []
    for n in contexts:  # each context's main rows, then its tuning sweeps
        plan += [(n, name, False) for name in args.shapes.split(",")]
        plan += [(n, name, True) for name in sweep_shapes if n in sweep_at]
    best: dict[tuple, float | None] = {}
    for n_keys, name, sweep in plan:
        Hq, Hk = SHAPES[name]
        if Hk * n_keys * D * 2 * ITEM * 3 > 60e9:
            rows.append({"op": "all", "shape": name, "n_keys": n_keys, "skipped": "does not fit"})
            continue
        if budget.left() < 25:
            rows.append({"op": "all", "shape": name, "n_keys": n_keys, "skipped": "time budget"})
            continue
        q, k, v = make_inputs(name, n_keys, None)
        if not sweep:
            best[("decode", name, n_keys)] = decode_dense(rows, name, n_keys, q, k, v, copy_bw, read_bw,
                                                          torch_ok)
        b = best.get(("decode", name, n_keys))
        sw_dec, sw_full, sw_pre = SWEEPS[name] if sweep else (DECODE_DEFAULT, DECODE_DEFAULT, PREFILL_DEFAULT)
        decode_case(rows, name, n_keys, 1 / 8, sw_dec, copy_bw, read_bw, rng, q, k, v, b)
        save()
        if budget.left() > 15:
            decode_case(rows, name, n_keys, 1.0, sw_full, copy_bw, read_bw, rng, q, k, v, b)
            save()
        if budget.left() > 15:
            q = make_inputs(name, n_keys, args.prefill_tokens)[0]
            if not sweep:
                best[("prefill", name, n_keys)] = prefill_dense(rows, name, n_keys, q, k, v, torch_ok)
            prefill_case(rows, name, n_keys, 1 / 8, sw_pre, copy_bw, rng, q, k, v,
                         best.get(("prefill", name, n_keys)))
            save()
        del q, k, v
    if budget.left() > 5:
        merge_case(rows, copy_bw)
    save()
    print("\n=== summary ===")
    for r in rows:
        print(_fmt(r))


if __name__ == "__main__":
    main()
