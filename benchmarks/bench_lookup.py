"""Centroid lookup + block selection timings: flat vs hierarchical, decode and prefill, on the GPU.

Llama-3.1-8B attention shapes (8 KV heads x G=4 query heads, D=128, bf16 queries), 5% fine and 1% coarse
centroids, at 32K / 128K / 512K keys per head. Decode scores R=G rows per KV head; prefill scores 1K user
tokens in query blocks of 64 (B=16 selections of R=64*G rows). Each timing runs `--iters` dependent calls
inside one jit (device-side: no per-call dispatch), median of `--repeats`. Prints a table and writes JSON.

    PYTHONPATH=. python3 benchmarks/bench_lookup.py --out benchmarks/results/lookup_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.centroid_lookup import (
    centroid_scores,
    centroid_scores_ref,
    hierarchical_scores,
    hierarchical_scores_ref,
)
from pallas_kernels.selection import block_scores, select_threshold, select_topk

H, G, D = 8, 4, 128
BLOCK_K = 16
FIXED_PAD = 64  # sinks + window region (4 blocks of 16)


def make_index(n_keys: int, seed: int, centroid_dtype) -> dict:
    """A synthetic context index of one layer with realistic cluster structure (sizes, coarse runs)."""
    rng = np.random.default_rng(seed)
    C = max(16, int(round(0.05 * n_keys)))
    Cc = max(4, int(round(0.01 * n_keys)))
    # Fine clusters per coarse cluster: >= 1, mean C / Cc (~5), capped by construction of the multinomial.
    counts = 1 + rng.multinomial(C - Cc, np.ones(Cc) / Cc, size=H)  # [H, Cc]
    first = np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(counts, 1)[:, :-1]], axis=1)
    # Cluster sizes summing to the clustered keys of each head.
    n_clustered = n_keys - FIXED_PAD
    w = rng.gamma(2.0, 1.0, size=(H, C))
    sizes = np.maximum(1, np.floor(w / w.sum(1, keepdims=True) * (n_clustered - C)).astype(np.int64) + 1)
    sizes[:, -1] += n_clustered - sizes.sum(1)
    assert (sizes >= 1).all()
    starts = FIXED_PAD + np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(sizes, 1)[:, :-1]], axis=1)
    # Centroids: a shared direction per coarse cluster plus noise, so coarse scores carry signal.
    coarse = rng.normal(size=(H, Cc, D)).astype(np.float32)
    parent = np.repeat(np.arange(Cc)[None], H, 0)
    fine = np.empty((H, C, D), np.float32)
    for h in range(H):
        par = np.repeat(parent[h], counts[h])
        fine[h] = coarse[h, par] + 0.5 * rng.normal(size=(C, D)).astype(np.float32)
    log_sizes = np.log(sizes).astype(np.float32)
    coarse_logn = np.stack([np.logaddexp.reduceat(log_sizes[h], first[h]) for h in range(H)])
    radius = rng.uniform(0.5, 3.0, size=(H, C)).astype(np.float32)
    return dict(
        C=C, Cc=Cc, max_fine=int(counts.max()),
        centroids=jnp.asarray(fine, centroid_dtype), log_sizes=jnp.asarray(log_sizes),
        radius=jnp.asarray(radius), coarse_centroids=jnp.asarray(coarse, centroid_dtype),
        coarse_log_sizes=jnp.asarray(coarse_logn, jnp.float32),
        coarse_first=jnp.asarray(first, jnp.int32), coarse_count=jnp.asarray(counts, jnp.int32),
        cluster_start=jnp.asarray(starts, jnp.int32), cluster_size=jnp.asarray(sizes, jnp.int32),
        n_blocks=n_keys // BLOCK_K,
    )


def make_queries(n_sel: int, rows: int, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n_sel, H, rows, D)), jnp.bfloat16)


def _reduce(out) -> jax.Array:
    """A cheap full reduction of an output pytree (keeps every element live inside the timing loop)."""
    leaves = jax.tree_util.tree_leaves(out)
    tot = jnp.float32(0)
    for x in leaves:
        x = x.astype(jnp.float32)
        tot = tot + jnp.max(jnp.where(jnp.isfinite(x), x, 0.0))
    return tot


def device_time_us(fn: Callable, q: jax.Array, iters: int, repeats: int, unroll: int) -> float:
    """Median microseconds per call of `fn(q)`: `iters` data-dependent calls inside one jit, the loop body
    unrolled `unroll` times so the per-iteration cost of the device loop is amortised."""

    @jax.jit
    def loop(q0):
        def body(_, acc):
            qi = q0 + (acc * 1e-30).astype(q0.dtype)  # depends on the previous call: no hoisting
            return acc + _reduce(fn(qi)) * 0.0
        return jax.lax.fori_loop(0, iters, body, jnp.float32(0), unroll=unroll)

    loop(q).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(q).block_until_ready()
        ts.append((time.perf_counter() - t0) / iters * 1e6)
    return float(np.median(ts))


def variants(idx: dict, coarse_keep: int, budget: int, capacity: int, log_thr: float,
             tune: bool) -> dict[str, Callable]:
    """The functions timed, each q -> outputs."""
    fine = (idx["centroids"], idx["log_sizes"], idx["radius"])
    coarse = (idx["coarse_centroids"], idx["coarse_log_sizes"], jnp.zeros_like(idx["coarse_log_sizes"]))
    hier_args = (idx["coarse_centroids"], idx["coarse_log_sizes"], idx["coarse_first"], idx["coarse_count"],
                 *fine)
    hier_kw = dict(coarse_keep=coarse_keep, max_fine_per_coarse=idx["max_fine"])
    sel_kw = dict(n_blocks=idx["n_blocks"], block_k=BLOCK_K, fixed_blocks=FIXED_PAD // BLOCK_K)
    starts, sizes = idx["cluster_start"], idx["cluster_size"]

    def bscores(scores):
        return block_scores(scores, starts, sizes, **sel_kw)

    def topk(scores, impl="topk"):
        return select_topk(bscores(scores), budget, capacity, impl=impl)

    def thresh(scores, impl="topk"):
        return select_threshold(bscores(scores), log_thr, capacity, impl=impl)

    def fake_scores(q):  # cheap q-dependent scores: times the selection alone
        return jnp.zeros((q.shape[0], H, idx["C"]), jnp.float32) + q[:, :, :1, 0].astype(jnp.float32)

    v = {
        "flat": lambda q: centroid_scores(q, *fine),
        "flat_logits": lambda q: centroid_scores(q, *fine, method="logits"),
        "flat_recompute": lambda q: centroid_scores(q, *fine, method="recompute"),
        "flat_f32dot": lambda q: centroid_scores(q, *fine, dot_dtype="float32"),
        "flat_radius": lambda q: centroid_scores(q, *fine, score="radius"),
        "flat_xla_ref": lambda q: centroid_scores_ref(q, *fine),
        "coarse_only": lambda q: centroid_scores(q, *coarse),
        "hier": lambda q: hierarchical_scores(q, *hier_args, **hier_kw),
        "hier_xla_ref": lambda q: hierarchical_scores_ref(q, *hier_args, **hier_kw),
        "block_scores": lambda q: bscores(fake_scores(q)),
        "select_topk": lambda q: topk(fake_scores(q)),
        "select_topk_cutoff": lambda q: topk(fake_scores(q), "cutoff"),
        "select_threshold": lambda q: thresh(fake_scores(q)),
        "select_threshold_cutoff": lambda q: thresh(fake_scores(q), "cutoff"),
        "flat+topk": lambda q: topk(centroid_scores(q, *fine)),
        "hier+topk": lambda q: topk(hierarchical_scores(q, *hier_args, **hier_kw)),
        "overhead": lambda q: q[:, :, 0, :].astype(jnp.float32),
    }
    if tune:
        for bc in (32, 64, 128):
            for cpp in (1, 2, 4, 8):
                v[f"flat_bc{bc}_cpp{cpp}"] = functools.partial(
                    lambda q, bc, cpp: centroid_scores(q, *fine, block_c=bc, chunks_per_program=cpp),
                    bc=bc, cpp=cpp)
    return v


def check_accuracy(idx: dict, q: jax.Array, coarse_keep: int, budget: int, capacity: int) -> dict:
    """Kernels vs the jnp references on the device: max |diff| of finite scores, agreement of the -inf
    (unreached) pattern, and the overlap of the top-k block selections they lead to."""
    fine = (idx["centroids"], idx["log_sizes"], idx["radius"])
    hier_args = (idx["coarse_centroids"], idx["coarse_log_sizes"], idx["coarse_first"], idx["coarse_count"],
                 *fine)
    kw = dict(coarse_keep=coarse_keep, max_fine_per_coarse=idx["max_fine"])
    sel_kw = dict(n_blocks=idx["n_blocks"], block_k=BLOCK_K, fixed_blocks=FIXED_PAD // BLOCK_K)

    def blocks(scores):
        ids, count = select_topk(block_scores(scores, idx["cluster_start"], idx["cluster_size"], **sel_kw),
                                 budget, capacity)
        return np.asarray(ids), np.asarray(count)

    def overlap(a, b):
        (ia, ca), (ib, cb) = blocks(a), blocks(b)
        hits = [len(set(x[:m]) & set(y[:n])) / n for x, m, y, n in
                zip(ia.reshape(-1, capacity), ca.reshape(-1), ib.reshape(-1, capacity), cb.reshape(-1))]
        return float(np.mean(hits))

    res = {}
    ref = centroid_scores_ref(q, *fine)
    for name, dot in (("flat", None), ("flat_f32dot", "float32")):
        got = centroid_scores(q, *fine, dot_dtype=dot)
        res[f"{name}_max_abs_err"] = float(jnp.max(jnp.abs(got - ref)))
        res[f"{name}_topk_overlap"] = overlap(got, ref)
    got = hierarchical_scores(q, *hier_args, **kw)
    want = hierarchical_scores_ref(q, *hier_args, **kw)
    fin = jnp.isfinite(want)
    res["hier_same_reached"] = float(jnp.mean((jnp.isfinite(got) == fin).astype(jnp.float32)))
    res["hier_max_abs_err"] = float(jnp.max(jnp.where(fin & jnp.isfinite(got), jnp.abs(got - want), 0.0)))
    res["hier_reached_frac"] = float(jnp.mean(fin.astype(jnp.float32)))
    res["hier_vs_flat_topk_overlap"] = overlap(got, ref)
    return res


def write_json(path: Path, gpu: str, args: argparse.Namespace, results: list[dict]) -> None:
    out = dict(device=gpu, jax=jax.__version__, python=platform.python_version(),
               centroid_dtype=args.centroid_dtype, heads=H, group=G, head_dim=D, block_k=BLOCK_K,
               iters=args.iters, unroll=args.unroll, repeats=args.repeats, results=results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/lookup_<gpu>.json)")
    ap.add_argument("--keys", default="32768,131072,524288", help="keys per head, comma-separated")
    ap.add_argument("--iters", type=int, default=64)
    ap.add_argument("--unroll", type=int, default=16, help="loop body copies per device-loop iteration")
    ap.add_argument("--tune", action="store_true", help="also sweep block_c x chunks_per_program (flat)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--coarse-keep-frac", type=float, default=0.1)
    ap.add_argument("--budget-frac", type=float, default=0.1, help="top-k blocks as a fraction of blocks")
    ap.add_argument("--centroid-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variants", default="", help="comma-separated subset of variants (default: all)")
    ap.add_argument("--modes", default="decode,prefill")
    ap.add_argument("--no-check", action="store_true", help="skip the kernel-vs-reference accuracy check")
    args = ap.parse_args()

    dev = jax.devices()[0]
    gpu = dev.device_kind
    words = [w for w in gpu.split() if w.upper() not in ("NVIDIA", "TESLA")] or ["device"]
    slug = "".join(ch for ch in words[0].lower() if ch.isalnum())
    out_path = args.out or Path(__file__).parent / "results" / f"lookup_{slug}.json"
    cdt = jnp.float32 if args.centroid_dtype == "float32" else jnp.bfloat16
    wanted = [v for v in args.variants.split(",") if v]
    modes = {"decode": (1, G), "prefill": (1024 // 64, 64 * G)}
    results = []
    print(f"device: {gpu}  jax {jax.__version__}  centroids {args.centroid_dtype}")
    for n_keys in [int(k) for k in args.keys.split(",")]:
        idx = make_index(n_keys, seed=n_keys, centroid_dtype=cdt)
        coarse_keep = max(1, int(round(args.coarse_keep_frac * idx["Cc"])))
        budget = max(1, int(round(args.budget_frac * idx["n_blocks"])))
        capacity = min(idx["n_blocks"], int(math.ceil(1.25 * budget)))
        centroid_bytes = (idx["C"] * D * jnp.dtype(cdt).itemsize + idx["C"] * 8) * H
        for mode in [m for m in args.modes.split(",") if m]:
            n_sel, rows = modes[mode]
            q = make_queries(n_sel, rows, seed=1)
            acc = {} if args.no_check else check_accuracy(idx, q, coarse_keep, budget, capacity)
            if acc:
                print(f"{n_keys:>7} {mode:<8} accuracy {acc}", flush=True)
            log_thr = float(jnp.quantile(centroid_scores(q, idx["centroids"], idx["log_sizes"],
                                                         idx["radius"]), 0.9))
            for name, fn in variants(idx, coarse_keep, budget, capacity, log_thr, args.tune).items():
                if wanted and name not in wanted:
                    continue
                try:
                    us = device_time_us(fn, q, args.iters, args.repeats, args.unroll)
                    err = None
                except Exception as e:  # noqa: BLE001 (e.g. the XLA reference running out of memory)
                    us, err = float("nan"), f"{type(e).__name__}: {str(e)[:200]}"
                row = dict(keys=n_keys, mode=mode, variant=name, us=us, C=idx["C"], Cc=idx["Cc"],
                           coarse_keep=coarse_keep, rows=rows, n_sel=n_sel, budget_blocks=budget,
                           capacity=capacity, centroid_bytes=centroid_bytes, error=err, **acc)
                if name.startswith("flat") and not name.endswith("ref") and us == us:
                    row["centroid_GBps"] = centroid_bytes * n_sel / (us * 1e-6) / 1e9
                results.append(row)
                print(f"{n_keys:>7} {mode:<8} {name:<16} {us:10.1f} us"
                      + (f"  [{err}]" if err else ""), flush=True)
            write_json(out_path, gpu, args, results)  # after every config: a cut-off run keeps its rows
    # Summary table: rows = (keys, mode), columns = variants.
    names = list(dict.fromkeys(r["variant"] for r in results))
    print("\nus per call (device-side)")
    print(f"{'keys':>7} {'mode':<8} " + " ".join(f"{n:>14}" for n in names))
    for key in dict.fromkeys((r["keys"], r["mode"]) for r in results):
        vals = {r["variant"]: r["us"] for r in results if (r["keys"], r["mode"]) == key}
        print(f"{key[0]:>7} {key[1]:<8} " + " ".join(f"{vals.get(n, float('nan')):14.1f}" for n in names))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
