"""MInference sparse prefill (block-sparse and vertical-slash kernels) vs dense causal attention on one GPU.

Run on the GPU machine:
`python3 benchmarks/bench_minference.py --out benchmarks/results/minference_<gpu>.json`.
Causal prefill of one prompt with Llama-3.1-8B attention shapes (32 query / 8 KV heads, d128, bf16) at
4K, 8K, 16K, 32K, 128K and 256K tokens (the short lengths locate where sparse stops paying).

Dense baselines in the same run: cuDNN and XLA through `jax.nn.dot_product_attention`, jax's Pallas flash
kernel (`pallas.ops.gpu.attention.mha`, K/V repeated to 32 heads), torch SDPA when torch is importable,
and our block-sparse kernel with every causal block listed.

Sparse runs (all per KV head, the G=4 query heads of a group in one tile):
- controlled synthetic indexes with a stated budget: A-shape 1K sinks + 4K local; block-sparse with K
  random causal blocks per query block (+ sink and diagonal); vertical-slash with V verticals (30 sinks
  + random) and S slashes (a local band + random far offsets);
- the estimators' own indexes on q/k with planted structure (local, vertical-slash and block-clustered
  heads): vertical-slash at MInference's budgets, with and without a mass floor, and block-sparse top-K;
- the model's backend (`MInferenceAttention.prefill_lse`, what `generate` runs per layer): token-major
  q/k/v in, per-head index built online, one kernel call, output out; uniform vertical-slash (1000, 6096)
  and a mixed per-head config (vertical-slash / A-shape / block-sparse heads).
The timed function of a sparse run includes index building (`total`); the kernel alone is timed too
(`index` = total - kernel). Reported per run: key tiles of 64 per query block, density vs causal, kernel
FLOP/s on the tiles it visits, speedup of the total vs the best dense baseline; per config, the length
below which sparse stops paying.

Timing is device-side: `n` chained calls inside one jit (`lax.fori_loop`; each call's first input
gets a zero-valued in-place update from the previous output, so nothing is hoisted and calls run back
to back), wall time / n, median of several runs, minus the same loop without the call. Every output is
checked against the jnp reference on sampled query blocks before timing. Prints a table, writes JSON.
Use `--smoke` on a CPU (interpret mode, tiny shapes) to check the script end to end.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks.timing import Budget, median_time, torch_time  # noqa: E402
from models.kv_cache import LayerKV  # noqa: E402
from pallas_kernels.block_sparse import (  # noqa: E402
    block_key_counts,
    block_sparse_prefill,
    masked_attention_ref,
)
from pallas_kernels.vertical_slash import vertical_slash_key_counts, vertical_slash_prefill  # noqa: E402
from squeeze_jax.minference.backend import MInferenceAttention, MInferenceState  # noqa: E402
from squeeze_jax.minference.patterns import (  # noqa: E402
    BlockSparseIndex,
    a_shape_index,
    block_sparse_index,
    dense_causal_tiles,
    full_causal_index,
    index_cost,
    vertical_slash_index,
    vertical_slash_index_from_selection,
)
from squeeze_jax.minference.search import PATTERNS, planted_attention_sample  # noqa: E402

BLOCK = 64
PLANTED_KINDS = (
    "local",
    "vertical_slash",
    "block_sparse",
    "local",
    "vertical_slash",
    "local",
    "vertical_slash",
    "block_sparse",
)
TUNE_CONFIGS = ((128, 8, 2), (128, 8, 3), (128, 4, 2), (64, 4, 2), (64, 4, 3), (256, 8, 2))


# ----------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------


def _median_wall(fn: Callable[[], Any], reps: int) -> float:
    return median_time(fn, reps)


def _first_scalar(out: Any) -> jax.Array:
    """One element of every output leaf (so no output can be dropped as dead code)."""
    return sum(leaf.reshape(-1)[0].astype(jnp.float32) for leaf in jax.tree.leaves(out))


def device_time(fn: Callable[..., Any], args: tuple, reps: int = 3, target_s: float = 0.25) -> dict:
    """Milliseconds per call of `fn(*args)` from chained calls in one jit, loop overhead subtracted.

    `reps=0` (smoke mode) times one plain call after a warm-up (no chained loop to compile)."""
    one = fn if hasattr(fn, "lower") else jax.jit(fn)  # an already jitted fn keeps its compilation
    jax.block_until_ready(one(*args))
    if reps == 0:
        return {"ms": _median_wall(lambda: one(*args), 1) * 1e3, "loop_overhead_ms": 0.0, "iters": 1}
    est = _median_wall(lambda: one(*args), 2)
    n = int(min(100, max(3, target_s / max(est, 1e-6))))

    def make(with_call: bool):
        def loop(*a):
            def body(_, carry):
                x, c = carry
                x = x.at[(0,) * x.ndim].add((c * 0.0).astype(x.dtype))  # in place, depends on c
                c = c + (_first_scalar(fn(x, *a[1:])) if with_call else x.reshape(-1)[0].astype(jnp.float32))
                return x, c

            return lax.fori_loop(0, n, body, (a[0], jnp.float32(0)))[1]

        return jax.jit(loop)

    run, base = make(True), make(False)
    jax.block_until_ready(run(*args))
    jax.block_until_ready(base(*args))
    t_run = _median_wall(lambda: run(*args), reps) / n
    t_base = _median_wall(lambda: base(*args), reps) / n
    return {"ms": max(t_run - t_base, 1e-9) * 1e3, "loop_overhead_ms": t_base * 1e3, "iters": n}


def torch_time_ms(fn: Callable[[], Any], reps: int = 3) -> float:
    """Milliseconds per call of a torch CUDA function (`timing.torch_time`, its batch sized from one call)."""
    import torch

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return torch_time(fn, time.perf_counter() - t0, reps=reps, min_calls=3, warmup=0) * 1e3


# ----------------------------------------------------------------------------------------------------
# Synthetic indexes with stated budgets
# ----------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("B", "H", "T", "n_blocks"))
def synthetic_block_index(key: jax.Array, *, B: int, H: int, T: int, n_blocks: int) -> BlockSparseIndex:
    """Diagonal + block 0 + random causal blocks up to `n_blocks` per query block, ascending."""
    nq = -(-T // BLOCK)
    i, j = jnp.arange(nq)[:, None], jnp.arange(nq)[None, :]
    u = jax.random.uniform(key, (B, H, nq, nq))
    score = jnp.where((j == i) | (j == 0), 2.0, jnp.where(j <= i, u, -1.0))
    vals, idx = lax.top_k(score, min(n_blocks, nq))
    valid = vals >= 0
    ids = jnp.sort(jnp.where(valid, idx, nq), axis=-1)
    count = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    ids = jnp.where(
        jnp.arange(ids.shape[-1]) < count[..., None],
        ids,
        jnp.take_along_axis(ids, count[..., None] - 1, axis=-1),
    )
    return BlockSparseIndex(
        block_ids=ids.astype(jnp.int32), block_count=count, block_q=BLOCK, block_k=BLOCK, seq_len=T
    )


@functools.partial(jax.jit, static_argnames=("B", "H", "T", "n_vertical", "n_local", "n_far"))
def synthetic_vs_selection(
    key: jax.Array, *, B: int, H: int, T: int, n_vertical: int, n_local: int, n_far: int
) -> tuple[jax.Array, jax.Array]:
    """Columns: 30 sinks + random; offsets: the `n_local` most local diagonals + `n_far` random ones."""
    kc, ko = jax.random.split(key)
    n_sink = min(30, n_vertical, T)
    _, rc = lax.top_k(jax.random.uniform(kc, (B, H, T - n_sink)), min(n_vertical - n_sink, T - n_sink))
    cols = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_sink), (B, H, n_sink)), rc + n_sink], axis=-1)
    n_loc = min(n_local, T)
    _, ro = lax.top_k(jax.random.uniform(ko, (B, H, T - n_loc)), min(n_far, T - n_loc))
    offs = jnp.concatenate([jnp.broadcast_to(jnp.arange(n_loc), (B, H, n_loc)), ro + n_loc], axis=-1)
    return jnp.sort(cols, axis=-1).astype(jnp.int32), -jnp.sort(-offs, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


def _kernel_call(index, tune: dict, interpret: bool | None) -> Callable[..., Any]:
    if isinstance(index, BlockSparseIndex):
        rows, warps, stages = tune["block_sparse"]
        return lambda q, k, v, ids, cnt: block_sparse_prefill(
            q,
            k,
            v,
            ids,
            cnt,
            block_q=BLOCK,
            block_k=BLOCK,
            block_rows=rows,
            num_warps=warps,
            num_stages=stages,
            interpret=interpret,
        )
    rows, warps, stages = tune["vertical_slash"]
    return lambda q, k, v, rs, re, rc, ci, cc: vertical_slash_prefill(
        q,
        k,
        v,
        rs,
        re,
        rc,
        ci,
        cc,
        block_q=BLOCK,
        block_k=BLOCK,
        block_rows=rows,
        num_warps=warps,
        num_stages=stages,
        interpret=interpret,
    )


def _index_arrays(index, B: int, H: int) -> tuple:
    if isinstance(index, BlockSparseIndex):
        lead = (B, H, index.block_count.shape[-1])
        return (
            jnp.broadcast_to(index.block_ids, lead + index.block_ids.shape[-1:]),
            jnp.broadcast_to(index.block_count, lead),
        )
    return (index.tile_start, index.tile_end, index.tile_count, index.column_index, index.column_count)


def _check_rows(out, q, k, v, index, T: int) -> float:
    """Max relative error of `out` vs the reference on three query blocks of the first and last head."""
    nq = -(-T // BLOCK)
    sel = sorted({0, nq // 2, nq - 1})
    heads = sorted({0, q.shape[1] - 1})
    arrays = _index_arrays(index, q.shape[0], q.shape[1])
    pick = lambda a: a[:, heads][:, :, sel]
    if isinstance(index, BlockSparseIndex):
        mult = block_key_counts(pick(arrays[0]), pick(arrays[1]), T, block_k=BLOCK)
    else:
        mult = vertical_slash_key_counts(*(pick(a) for a in arrays), T)
    worst = 0.0
    for n, i in enumerate(sel):
        rows = jnp.arange(i * BLOCK, min(i * BLOCK + BLOCK, T))
        err = _rows_error(out[:, heads], q[:, heads], k[:, heads], v[:, heads], mult[:, :, n : n + 1], rows)
        worst = max(worst, float(err))
    return worst


@jax.jit
def _rows_error(out, q, k, v, mult_BH1T, rows):
    """Relative L2 error of `out` on query `rows` against the multiplicity-masked reference (one compile)."""
    want, _ = masked_attention_ref(
        q[:, :, rows], k, v, jnp.broadcast_to(mult_BH1T, mult_BH1T.shape[:2] + (rows.shape[0], k.shape[2])), rows
    )
    got = out[:, :, rows].astype(jnp.float32)
    want = want.astype(jnp.float32)
    return jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30)


def run_sparse(
    name: str,
    source: str,
    budget: str,
    q,
    k,
    v,
    index,
    build: Callable | None,
    build_args: tuple,
    tune: dict,
    interpret: bool | None,
    smoke: bool,
) -> dict:
    """Checks the kernel on sampled rows, then times index building and the kernel."""
    B, H, T, G, D = q.shape
    call = _kernel_call(index, tune, interpret)
    arrays = _index_arrays(index, B, H)
    out, _ = call(q, k, v, *arrays)
    err = _check_rows(out, q, k, v, index, T)
    tiles = np.asarray(jnp.broadcast_to(index_cost(index), (B, H, -(-T // BLOCK))), np.float64)
    dense_tiles = dense_causal_tiles(T, block_q=BLOCK, block_k=BLOCK)
    reps = 0 if smoke else 3
    kernel = device_time(lambda q_, k_, v_, *a: call(q_, k_, v_, *a)[0], (q, k, v, *arrays), reps=reps)
    total_ms, index_ms = kernel["ms"], 0.0
    if build is not None:
        n_build = len(build_args)

        def fused(q_, k_, v_, *a):  # index building and the kernel in one timed function
            dep = q_.reshape(-1)[0].astype(jnp.float32) * 0.0  # ties the build to the loop (no hoisting)
            idx = build(a[0] + dep.astype(a[0].dtype), *a[1:n_build])
            return call(q_, k_, v_, *_index_arrays(idx, B, H))[0]

        total_ms = device_time(fused, (q, k, v, *build_args), reps=reps)["ms"]
        index_ms = max(total_ms - kernel["ms"], 0.0)
    flops = float(tiles.sum()) * BLOCK * BLOCK * G * D * 4
    return {
        "name": name,
        "source": source,
        "budget": budget,
        "kernel": "block_sparse" if isinstance(index, BlockSparseIndex) else "vertical_slash",
        "tiles_per_qblock": float(tiles.mean()),
        "density": float(tiles.sum() / (B * H * dense_tiles)),
        "index_ms": index_ms,
        "kernel_ms": kernel["ms"],
        "total_ms": total_ms,
        "covered_tflops": flops / (kernel["ms"] * 1e-3) / 1e12,
        "max_rel_err": err,
        "ok": err < (0.05 if q.dtype == jnp.bfloat16 else 1e-3),
    }


def selected(name: str, only: tuple[str, ...]) -> bool:
    """Whether a run is kept by `--only` (name prefixes; empty keeps all)."""
    return not only or any(name.startswith(o) for o in only)


def dense_runs(
    q, k, v, tune: dict, interpret: bool | None, xla_max: int, smoke: bool, only: tuple[str, ...] = ()
) -> dict:
    """cuDNN / XLA / Pallas flash / our block-sparse kernel with every causal block, each row-checked."""
    B, H, T, G, D = q.shape
    q_n = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, T, H * G, D)  # query head h*G+g
    k_n, v_n = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    back = lambda o: jnp.transpose(o.reshape(B, T, H, G, D), (0, 2, 1, 3, 4))
    reps = 0 if smoke else 3
    full = full_causal_index(T, block=BLOCK)
    out = {}
    methods: list[tuple[str, Callable, tuple]] = []
    if not smoke:
        for impl in ("cudnn", "xla"):
            if impl == "xla" and T > xla_max:
                out[impl] = {"skipped": f"T > {xla_max} (materialises T x T scores)"}
                continue
            methods.append(
                (
                    impl,
                    functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl),
                    (q_n, k_n, v_n),
                )
            )
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention

        k_r, v_r = jnp.repeat(k_n, G, axis=2), jnp.repeat(v_n, G, axis=2)
        methods.append(
            (
                "pallas_flash",
                functools.partial(
                    pallas_attention.mha, segment_ids=None, causal=True, sm_scale=1 / math.sqrt(D)
                ),
                (q_n, k_r, v_r),
            )
        )
    else:
        methods.append(
            (
                "xla",
                functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla"),
                (q_n, k_n, v_n),
            )
        )
    ours = _kernel_call(full, tune, interpret)
    ids, cnt = _index_arrays(full, B, H)
    methods.append(("ours_full_causal", lambda q_, k_, v_: ours(q_, k_, v_, ids, cnt)[0], (q, k, v)))
    for name, fn, args in methods:
        if not selected(name, only):
            continue
        try:
            o = fn(*args)
            o = back(o) if name != "ours_full_causal" else o
            err = _check_rows(o, q, k, v, full, T)
            t = device_time(fn, args, reps=reps)
            out[name] = {
                "ms": t["ms"],
                "tflops": 2.0 * T * T * D * H * G / (t["ms"] * 1e-3) / 1e12,
                "max_rel_err": err,
            }
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run (OOM, unsupported) is recorded
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def torch_baseline(lengths: list[int], H: int, G: int, D: int, budget: Budget) -> dict:
    """torch SDPA causal (GQA) per length, CUDA-event timed; empty when torch or CUDA is missing."""
    try:
        import torch
        import torch.nn.functional as F

        if not torch.cuda.is_available():
            return {}
    except ImportError:
        return {}
    res = {}
    for T in lengths:
        if budget.left() < 60:
            res[str(T)] = {"skipped": "time budget"}
            continue
        try:
            q = torch.randn(1, H * G, T, D, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
            ms = torch_time_ms(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            )
            res[str(T)] = {"ms": ms, "tflops": 2.0 * T * T * D * H * G / (ms * 1e-3) / 1e12}
            del q, k, v
        except Exception as e:  # noqa: BLE001
            res[str(T)] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()
    return res


def tune_kernels(q, k, v, interpret: bool | None, smoke: bool) -> dict:
    """Picks (block_rows, num_warps, num_stages) per kernel on an A-shape / synthetic VS index."""
    B, H, T, G, D = q.shape
    ashape = a_shape_index(T, n_sink=1024, n_local=4096, block=BLOCK)
    cols, offs = synthetic_vs_selection(
        jax.random.PRNGKey(1), B=B, H=H, T=T, n_vertical=512, n_local=256, n_far=32
    )
    vs = vertical_slash_index_from_selection(cols, offs, T, block_q=BLOCK, block_k=BLOCK)
    configs = TUNE_CONFIGS[:2] if smoke else TUNE_CONFIGS
    result, log = {}, {}
    for kind, index in (("block_sparse", ashape), ("vertical_slash", vs)):
        best = None
        for cfg in configs:
            if cfg[0] > BLOCK * G:
                continue
            try:
                call = _kernel_call(index, {kind: cfg}, interpret)
                arrays = _index_arrays(index, B, H)
                ms = device_time(
                    lambda q_, k_, v_, *a, call=call: call(q_, k_, v_, *a)[0],
                    (q, k, v, *arrays),
                    reps=0 if smoke else 3,
                )["ms"]
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is skipped
                log[f"{kind}{cfg}"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            log[f"{kind}{cfg}"] = ms
            if best is None or ms < best[0]:
                best = (ms, cfg)
        result[kind] = best[1] if best else (128, 8, 2)
    return {"chosen": result, "timings_ms": log, "length": T}


def bench_length(T: int, args, tune: dict, interpret: bool | None, budget: Budget) -> dict:
    B, H, G, D = 1, args.kv_heads, args.groups, args.head_dim
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    kq, kk, kv, ki = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(kq, (B, H, T, G, D), dtype)
    k = jax.random.normal(kk, (B, H, T, D), dtype)
    v = jax.random.normal(kv, (B, H, T, D), dtype)
    res: dict = {"dense": dense_runs(q, k, v, tune, interpret, args.xla_max, args.smoke, args.only), "sparse": []}

    def attempt(*a, **kw):
        if not selected(a[0], args.only):
            return
        if budget.left() < 30:
            res["sparse"].append({"name": a[0], "skipped": "time budget"})
            return
        try:
            res["sparse"].append(run_sparse(*a, **kw, tune=tune, interpret=interpret, smoke=args.smoke))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            res["sparse"].append({"name": a[0], "error": f"{type(e).__name__}: {str(e)[:300]}"})

    s = args.scale  # budgets scale with --smoke
    want = lambda name: selected(name, args.only)
    if want("a_shape_1k_4k"):
        attempt(
            "a_shape_1k_4k",
            "synthetic",
            f"{1024 // s} sinks + {4096 // s} local",
            q,
            k,
            v,
            a_shape_index(T, n_sink=1024 // s, n_local=4096 // s, block=BLOCK),
            None,
            (),
        )
    few = (lambda xs: xs[:1]) if args.smoke else (lambda xs: xs)  # --smoke: one config per family
    for n_blocks in few((32 // s, 128 // s)):
        if not want(f"bs_random_{n_blocks}"):
            continue
        idx = synthetic_block_index(ki, B=B, H=H, T=T, n_blocks=max(n_blocks, 2))
        attempt(f"bs_random_{n_blocks}", "synthetic", f"{n_blocks} blocks/qblock", q, k, v, idx, None, ())
    for nv, n_local, n_far in few(((256 // s, 256 // s, 16 // s), (1024 // s, 1024 // s, 128 // s))):
        if not want(f"vs_synth_v{nv}_l{n_local}_f{n_far}"):
            continue
        sel = functools.partial(
            synthetic_vs_selection,
            B=B,
            H=H,
            T=T,
            n_vertical=max(nv, 30),
            n_local=n_local,
            n_far=max(n_far, 1),
        )
        cols, offs = sel(ki)
        build = lambda c, o: vertical_slash_index_from_selection(c, o, T, block_q=BLOCK, block_k=BLOCK)
        attempt(
            f"vs_synth_v{nv}_l{n_local}_f{n_far}",
            "synthetic",
            f"{nv} verticals, {n_local} local + {n_far} far slashes",
            q,
            k,
            v,
            build(cols, offs),
            build,
            (cols, offs),
        )
    del q, k, v
    if args.only and not any(o.startswith(g) or g.startswith(o) for o in args.only for g in ("vs_est", "bs_est",
                                                                                              "backend")):
        return res

    qp, kp, vp = planted_attention_sample(
        T,
        PLANTED_KINDS[:H],
        seq_len=T,
        groups=G,
        head_dim=D,
        n_verticals=64,
        local_window=256,
        logit=10.0,
        dtype=dtype,
    )
    qp, kp, vp = qp[0], kp[0], vp[0]
    q_last = qp[:, :, -64:]
    for nv, ns, floor in few(((1000, 6096, 0.0), (512, 2048, 0.0), (1000, 6096, 1e-4), (64, 256, 0.0))):
        nv_s, ns_s = max(30, nv // s), max(100, ns // s) if not args.smoke else max(4, ns // s)
        kw = dict(
            n_vertical=nv_s,
            n_slash=ns_s,
            n_sink_cols=min(30, nv_s),
            n_local_diags=min(100, ns_s),
            min_mass=floor,
        )
        build = lambda ql, k_, kw=kw: vertical_slash_index(ql, k_, **kw)
        tag = f"vs_est_{nv_s}_{ns_s}" + (f"_floor{floor:g}" if floor else "")
        if not want(tag):
            continue
        attempt(
            tag,
            "estimator",
            f"({nv_s}, {ns_s}) min_mass={floor:g}",
            qp,
            kp,
            vp,
            build(q_last, kp),
            build,
            (q_last, kp),
        )
    for top_k in few((100 // s, 32 // s)):
        if not want(f"bs_est_{top_k}"):
            continue
        build = lambda q_, k_, top_k=top_k: block_sparse_index(
            q_, k_, top_k_blocks=max(top_k, 2), block=BLOCK
        )
        attempt(
            f"bs_est_{top_k}", "estimator", f"top {top_k} blocks", qp, kp, vp, build(qp, kp), build, (qp, kp)
        )
    for name, backend, state in backend_configs(T, H, s, tune["vertical_slash"], interpret):
        if not selected(name, args.only):
            continue
        if budget.left() < 30:
            res["sparse"].append({"name": name, "skipped": "time budget"})
            continue
        try:
            res["sparse"].append(run_backend(name, backend, state, qp, kp, vp, args.smoke))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            res["sparse"].append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return res


def backend_configs(T: int, H: int, s: int, tune_vs: tuple, interpret: bool | None) -> list[tuple]:
    """(name, MInferenceAttention, per-layer MInferenceState) pairs; budgets are absolute (ref_len = T)."""
    rows, warps, stages = tune_vs
    vs, ash, bs = (1000 // s, 6096 // s), (1024 // s, 4096 // s), max(2, 100 // s)
    common = dict(ref_len=T, block=BLOCK, interpret=interpret, block_rows=rows, num_warps=warps, num_stages=stages,
                  attend_prefix=False)  # a prefill from an empty cache
    uniform = MInferenceAttention(max_vertical=vs[0], max_slash=vs[1], default_pattern=("vertical_slash", *vs),
                                  **common)
    mixed = MInferenceAttention(max_vertical=max(vs[0], ash[0]), max_slash=max(vs[1], ash[1]), max_blocks=bs,
                                default_pattern=("vertical_slash", *vs), **common)
    kinds = [("vertical_slash", *vs), ("a_shape", *ash), ("block_sparse", bs, BLOCK), ("vertical_slash", *vs)]
    heads = [kinds[h % len(kinds)] for h in range(H)]
    codes = jnp.asarray([PATTERNS.index(k) for k, _, _ in heads], jnp.int32)
    state = MInferenceState(codes, jnp.asarray([p for _, p, _ in heads]), jnp.asarray([p for _, _, p in heads]))
    return [
        (f"backend_vs_{vs[0]}_{vs[1]}", uniform, None),
        ("backend_mixed_vs_ashape_bs", mixed, state),
    ]


def run_backend(name: str, backend: MInferenceAttention, state, q, k, v, smoke: bool) -> dict:
    """Times the model backend's prefill attention on token-major q/k/v: index building, kernel, layouts."""
    B, H, T, G, D = q.shape
    q_t = jnp.transpose(q, (0, 2, 1, 3, 4)).reshape(B, T, H * G, D)
    k_t, v_t = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
    zeros, full = jnp.zeros((B,), jnp.int32), jnp.full((B,), T, jnp.int32)

    def prefill(q_, k_, v_, attn=backend):  # what MInferenceAttention.__call__ does in prefill, minus the cache write
        o, _, _ = attn.prefill_lse(q_, k_, v_, LayerKV(k_, v_), zeros, full, state)
        return jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(B, T, H * G, D).astype(q_.dtype)

    # the check compares with the sparse index's own reference, so it runs without the exact tail rows (those
    # equal dense attention: tests/test_minference_backend.py); the timing includes them
    out = jax.jit(functools.partial(prefill, attn=dataclasses.replace(backend, dense_tail=0)))(q_t, k_t, v_t)
    prefill = jax.jit(prefill)
    index = jax.jit(backend.build_index)(q, k, full, state)
    err = _check_rows(jnp.transpose(out.reshape(B, T, H, G, D), (0, 2, 1, 3, 4)), q, k, v, index, T)
    tiles = np.asarray(index_cost(index), np.float64)
    dense_tiles = dense_causal_tiles(T, block_q=BLOCK, block_k=BLOCK)
    total = device_time(prefill, (q_t, k_t, v_t), reps=0 if smoke else 3)["ms"]
    flops = float(tiles.sum()) * BLOCK * BLOCK * G * D * 4
    return {
        "name": name,
        "source": "backend",
        "budget": "per-head patterns, index built online",
        "kernel": "vertical_slash",
        "tiles_per_qblock": float(tiles.mean()),
        "density": float(tiles.sum() / (B * H * dense_tiles)),
        "index_ms": None,
        "kernel_ms": None,
        "total_ms": total,
        "covered_tflops": flops / (total * 1e-3) / 1e12,
        "max_rel_err": err,
        "ok": err < (0.05 if q.dtype == jnp.bfloat16 else 1e-3),
    }


def _ms(x: float | None) -> str:
    return f"{x:9.2f}" if x is not None else f"{'-':>9}"


def breakeven(per_length: dict) -> dict:
    """Per sparse config, the length below which it stops paying (log-log interpolation of the speedup)."""
    names = sorted({r["name"] for L in per_length.values() for r in L["sparse"] if "speedup" in r})
    out = {}
    for name in names:
        pts = sorted(
            (int(L), r["speedup"])
            for L, d in per_length.items()
            for r in d["sparse"]
            if r.get("name") == name and "speedup" in r
        )
        if not pts:
            continue
        if all(s >= 1 for _, s in pts):
            out[name] = {"length": None, "note": f"pays at every measured length (>= {pts[0][0]})"}
        elif pts[-1][1] < 1:
            out[name] = {"length": None, "note": f"does not pay up to {pts[-1][0]}"}
        else:
            i = max(j for j in range(len(pts)) if pts[j][1] < 1)
            (l0, s0), (l1, s1) = pts[i], pts[i + 1]
            f = -math.log(s0) / (math.log(s1) - math.log(s0)) if s1 != s0 else 0.0
            length = math.exp(math.log(l0) + f * (math.log(l1) - math.log(l0)))
            out[name] = {"length": round(length), "note": f"interpolated between {l0} and {l1}"}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--lengths", default="4096,8192,16384,32768,131072,262144")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--xla-max", type=int, default=16384, help="longest length for the XLA dense baseline")
    p.add_argument("--budget-s", type=float, default=560.0, help="wall-clock budget; later runs are skipped")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-tune", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU check: interpret mode, tiny shapes and budgets")
    p.add_argument("--only", default="", help="comma-separated name prefixes of the runs to keep (default all)")
    args = p.parse_args(argv)
    args.only = tuple(x for x in args.only.split(",") if x)
    budget = Budget(args.budget_s)
    if args.smoke:
        if args.lengths == p.get_default("lengths"):
            args.lengths = "128,256"
        args.kv_heads, args.head_dim, args.no_torch, args.no_tune = 4, 32, True, True
    args.scale = 16 if args.smoke else 1
    interpret = True if args.smoke else None
    lengths = [int(x) for x in args.lengths.split(",")]
    H, G, D = args.kv_heads, args.groups, args.head_dim

    meta = {
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "B": 1,
        "kv_heads": H,
        "q_heads": H * G,
        "head_dim": D,
        "dtype": args.dtype,
        "block": BLOCK,
        "lengths": lengths,
        "timing": "chained calls in one jit, loop overhead subtracted (torch: CUDA events)",
    }
    print(json.dumps(meta))
    torch_res = {} if args.no_torch else torch_baseline(lengths, H, G, D, budget)

    tune = {"block_sparse": (128, 8, 2), "vertical_slash": (128, 8, 2)}
    tuning = {"chosen": tune, "note": "defaults (--no-tune)"}
    if not args.no_tune:
        t_len = min(lengths, key=lambda L: abs(math.log(L / (512 if args.smoke else 32768))))
        kq = jax.random.split(jax.random.PRNGKey(7), 3)
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        tq = jax.random.normal(kq[0], (1, H, t_len, G, D), dtype)
        tk = jax.random.normal(kq[1], (1, H, t_len, D), dtype)
        tv = jax.random.normal(kq[2], (1, H, t_len, D), dtype)
        tuning = tune_kernels(tq, tk, tv, interpret, args.smoke)
        tune = tuning["chosen"]
        del tq, tk, tv
        print("tuning:", json.dumps(tuning))

    per_length = {}
    for T in lengths:
        if budget.left() < 60:
            per_length[str(T)] = {"skipped": "time budget"}
            continue
        r = bench_length(T, args, tune, interpret, budget)
        if str(T) in torch_res:
            r["dense"]["torch_sdpa"] = torch_res[str(T)]
        timed = {n: d["ms"] for n, d in r["dense"].items() if "ms" in d and n != "ours_full_causal"}
        if not timed:
            timed = {n: d["ms"] for n, d in r["dense"].items() if "ms" in d}
        best = min(timed, key=timed.get) if timed else None
        r["best_dense"] = {"name": best, "ms": timed[best]} if best else None
        for s in r["sparse"]:
            if best and "total_ms" in s:
                s["speedup"] = timed[best] / s["total_ms"]
                if s.get("kernel_ms"):
                    s["kernel_speedup"] = timed[best] / s["kernel_ms"]
        per_length[str(T)] = r
        print(f"\n=== T = {T} ===")
        for n, d in r["dense"].items():
            print(
                f"  dense {n:<18} "
                + (
                    f"{d['ms']:9.2f} ms  {d.get('tflops', 0):6.1f} TFLOP/s"
                    if "ms" in d
                    else str(d.get("error") or d.get("skipped"))
                )
            )
        print(
            f"  {'sparse':<34}{'tiles':>7}{'dens':>7}{'index':>9}{'kernel':>9}{'total':>9}{'TF/s':>7}"
            f"{'x best':>8}{'err':>9}"
        )
        for s in r["sparse"]:
            if "total_ms" not in s:
                print(f"  {s['name']:<34}{s.get('error') or s.get('skipped')}")
                continue
            print(
                f"  {s['name']:<34}{s['tiles_per_qblock']:7.1f}{s['density']:7.3f}{_ms(s['index_ms'])}"
                f"{_ms(s['kernel_ms'])}{s['total_ms']:9.2f}{s['covered_tflops']:7.1f}"
                f"{s.get('speedup', 0):8.2f}{s['max_rel_err']:9.1e}"
            )
    be = breakeven({L: d for L, d in per_length.items() if "sparse" in d})
    print("\nbreak-even (sparse stops paying below):")
    for name, d in be.items():
        print(f"  {name:<34}{d['length'] if d['length'] else '-':>10}  {d['note']}")
    result = {"meta": meta, "tuning": tuning, "lengths": per_length, "breakeven": be}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
