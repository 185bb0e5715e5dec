"""End-to-end squeezed decode on the GPU: one attention layer's full pipeline, and whole-model token latency.

1. `attention_rows`: per decode token and layer, centroid lookup (flat or hierarchical) + fused block
   selection + sparse attention over the kept context blocks + dense attention over the user's own tokens +
   the LSE merge, against dense attention over context + user keys (cuDNN and XLA through
   `jax.nn.dot_product_attention`) in the same run. The bytes it must read (kept KV blocks, centroids,
   selection tables, user KV) over the measured read bandwidth give the roofline fraction.
2. `model_rows`: a random-weight Llama-3.1-8B-shaped model with a few layers; per-token decode latency of
   `generate` with dense attention (cuDNN, XLA) over the whole prompt vs squeezed attention over a context
   index built from the same context.

    PYTHONPATH=. python3 benchmarks/bench_e2e.py --out benchmarks/results/e2e.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Budget, device_info, device_time, median_time, read_bandwidth, rel_err
from pallas_kernels.block_select import (
    TIE_CHECK,
    block_cluster_ranges,
    select_blocks,
    select_blocks_from_logits,
    select_blocks_ref,
)
from pallas_kernels.centroid_lookup import centroid_logits, centroid_scores, centroid_scores_ref, hierarchical_scores
from pallas_kernels.selection import block_scores, select_topk
from pallas_kernels.sparse_decode import dense_decode, sparse_decode, sparse_decode_ref
from squeeze_jax.attention.context import fused_select_chunks
from squeeze_jax.index.bounds import index_box_table, signed_split

D = 128
ITEM = 2
BLOCK_K = 16
N_FIXED = 128  # sinks + window of the synthetic index (a multiple of the key block)
USER = 512  # user/generated tokens attended densely
BOX_WEIGHT = 0.25  # the library's default cluster score (ContextAttention(score="box", box_weight=0.25))
SHAPES = {"gqa": (32, 8), "mha": (32, 32)}


def synthetic_index(n_keys: int, H: int, seed: int, centroid_fraction: float = 0.05,
                    coarse_fraction: float = 0.01) -> dict:
    """One layer of a context index with realistic cluster-size spread (gamma sizes) and a 2-level tree."""
    rng = np.random.default_rng(seed)
    n_clustered = n_keys - N_FIXED
    C = max(16, int(round(centroid_fraction * n_clustered)))
    Cc = max(4, int(round(coarse_fraction * n_clustered)))
    counts = 1 + rng.multinomial(C - Cc, np.ones(Cc) / Cc, size=H)
    first = np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(counts, 1)[:, :-1]], axis=1)
    w = rng.gamma(2.0, 1.0, size=(H, C))
    sizes = np.maximum(1, np.floor(w / w.sum(1, keepdims=True) * (n_clustered - C)).astype(np.int64) + 1)
    sizes[:, -1] += n_clustered - sizes.sum(1)
    starts = N_FIXED + np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(sizes, 1)[:, :-1]], axis=1)
    coarse = rng.normal(size=(H, Cc, D)).astype(np.float32)
    fine = np.empty((H, C, D), np.float32)
    for h in range(H):
        fine[h] = np.repeat(coarse[h], counts[h], axis=0) + 0.5 * rng.normal(size=(C, D)).astype(np.float32)
    log_sizes = np.log(sizes).astype(np.float32)
    coarse_logn = np.stack([np.logaddexp.reduceat(log_sizes[h], first[h]) for h in range(H)])
    key = jax.random.PRNGKey(seed)
    n_blocks = n_keys // BLOCK_K
    lo, hi = block_cluster_ranges(jnp.asarray(starts, jnp.int32), jnp.asarray(sizes, jnp.int32),
                                  n_blocks=n_blocks, block_k=BLOCK_K)
    return dict(
        C=C, Cc=Cc, max_fine=int(counts.max()), n_blocks=n_blocks,
        keys=jax.random.normal(key, (H, n_keys, D), jnp.bfloat16),
        values=jax.random.normal(jax.random.fold_in(key, 1), (H, n_keys, D), jnp.bfloat16),
        # centroids in the keys' dtype, as ContextState.for_backend stores them for the kernel path
        centroids=jnp.asarray(fine, jnp.bfloat16), log_sizes=jnp.asarray(log_sizes),
        radius=jnp.ones((H, C), jnp.float32),
        coarse_centroids=jnp.asarray(coarse), coarse_log_sizes=jnp.asarray(coarse_logn, jnp.float32),
        coarse_first=jnp.asarray(first, jnp.int32), coarse_count=jnp.asarray(counts, jnp.int32),
        cluster_start=jnp.asarray(starts, jnp.int32), cluster_size=jnp.asarray(sizes, jnp.int32), lo=lo, hi=hi,
    )


def squeezed_select(q_BHGD, ix: dict, *, keep_blocks: int, hierarchical: bool, coarse_keep: int,
                    score: str = "mean", reference: bool = False, fold: bool = False, select: str = "auto",
                    chunk_blocks: int = 0, tie_check: int = TIE_CHECK):
    """A decode step's lookup + block selection: (block_ids, count). `select`: "auto" as ContextAttention picks
    it, "fused" the Pallas selection (`chunk_blocks` > 0: its chunked form), "xla" block scores + top-k in XLA;
    `fold`: the lookup's finish inside the Pallas selection (flat mean scores only); `tie_check`: the Pallas
    selection's search step after which a band of one tied value ends it."""
    B, H = q_BHGD.shape[:2]
    k_BH = jnp.full((B, H), keep_blocks, jnp.int32)
    # as ContextAttention: a selection keeping every block (each holds keys here) skips its lookup
    lookup_kw = dict(hierarchical=hierarchical, coarse_keep=coarse_keep, score=score, active=k_BH < ix["n_blocks"])
    sel_kw = dict(n_blocks=ix["n_blocks"], capacity=keep_blocks, fixed_blocks=N_FIXED // BLOCK_K)
    tables = (ix["cluster_size"], ix["lo"], ix["hi"], k_BH)
    if reference:
        return select_blocks_ref(_lookup(q_BHGD, ix, {}, lookup_kw, reference=True), *tables,
                                 active_BH=lookup_kw["active"], **sel_kw)
    if select == "auto":
        chunks = fused_select_chunks(ix["n_blocks"], B * H)
        select, chunk_blocks = ("xla", 0) if chunks is None else ("fused", chunks)
    if select == "xla":
        bs = block_scores(_lookup(q_BHGD, ix, {}, lookup_kw), ix["cluster_start"], ix["cluster_size"],
                          n_blocks=ix["n_blocks"], block_k=BLOCK_K, fixed_blocks=N_FIXED // BLOCK_K)
        return select_topk(bs, k_BH, keep_blocks)
    if fold and not hierarchical and score == "mean":
        logits = centroid_logits(q_BHGD, ix["centroids"], ix["log_sizes"], ix["radius"])
        return select_blocks_from_logits(logits, *tables, chunk_blocks=chunk_blocks, tie_check=tie_check,
                                         active_BH=lookup_kw["active"], **sel_kw)
    return select_blocks(_lookup(q_BHGD, ix, {}, lookup_kw), *tables, chunk_blocks=chunk_blocks,
                         tie_check=tie_check, active_BH=lookup_kw["active"], **sel_kw)


def squeezed_step(q_BHGD, k_user_BUHD, v_user_BUHD, ix: dict, *, keep_blocks: int, hierarchical: bool,
                  coarse_keep: int, n_keys: int, score: str = "mean", reference: bool = False, fold: bool = False,
                  select: str = "auto", chunk_blocks: int = 0, tie_check: int = TIE_CHECK):
    """One layer's decode attention for one token: lookup, block selection, then one attention launch over
    the selected context blocks and the user tokens (merged in its split combine), as ContextAttention runs
    it."""
    B = q_BHGD.shape[0]
    ids, count = squeezed_select(q_BHGD, ix, keep_blocks=keep_blocks, hierarchical=hierarchical,
                                 coarse_keep=coarse_keep, score=score, reference=reference, fold=fold,
                                 select=select, chunk_blocks=chunk_blocks, tie_check=tie_check)
    attend = sparse_decode_ref if reference else sparse_decode
    user_len = jnp.full((B,), k_user_BUHD.shape[1], jnp.int32)
    o, _ = attend(q_BHGD, ix["keys"], ix["values"], ids, count, n_fixed=N_FIXED, fixed_pad=N_FIXED,
                  n_clustered=n_keys - N_FIXED, k_user_BUHD=k_user_BUHD, v_user_BUHD=v_user_BUHD,
                  user_len_B=user_len)
    return o


def attention_rows(n_keys: int, shape: str, keeps: list[float], read_bw: float, budget: Budget,
                   check: bool = True, hier_keeps: tuple[float, ...] = (0.125,),
                   box_keeps: tuple[float, ...] = (), select_variants: tuple[dict, ...] = ()) -> list[dict]:
    """Dense vs squeezed (flat / hierarchical, each kept fraction; flat with box-bound cluster scores at
    `box_keeps`) for one context length and head shape. Flat and hierarchical rows score cluster means.
    `select_variants`: more flat rows at the first kept fraction below 1, each with these `squeezed_select`
    options (e.g. `{"select": "xla"}`, `{"fold": True}`)."""
    Hq, H = SHAPES[shape]
    G = Hq // H
    ix = synthetic_index(n_keys, H, seed=n_keys + H)
    if box_keeps:  # [H, C, 2D] in the keys' dtype, as ContextState.for_backend builds it
        ix["box_table"] = jax.jit(lambda *a: index_box_table(*a, BOX_WEIGHT, dtype=jnp.bfloat16))(
            ix["keys"], ix["centroids"], ix["cluster_start"], ix["cluster_size"])
    key = jax.random.PRNGKey(7)
    q = jax.random.normal(key, (1, H, G, D), jnp.bfloat16)
    k_u = jax.random.normal(jax.random.fold_in(key, 1), (1, USER, H, D), jnp.bfloat16)  # a request's cache
    v_u = jax.random.normal(jax.random.fold_in(key, 2), (1, USER, H, D), jnp.bfloat16)
    base = dict(section="attention_decode", shape=shape, n_keys=n_keys, user=USER)
    rows: list[dict] = []

    def add(r: dict) -> None:  # printed as it finishes: a run cut short still shows its rows
        rows.append(r)
        print(_fmt(r), flush=True)

    # dense over context + user keys, [B, S, H, D] layout
    k_all = jnp.concatenate([ix["keys"].transpose(1, 0, 2)[None], k_u], axis=1)
    v_all = jnp.concatenate([ix["values"].transpose(1, 0, 2)[None], v_u], axis=1)
    q_dense = q.reshape(1, 1, Hq, D)
    dense_bytes = 2 * H * (n_keys + USER) * D * ITEM
    best = None
    ref_out = None
    for impl in ("cudnn", "xla"):
        f = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, implementation=impl))
        try:
            out = f(q_dense, k_all, v_all)
            ref_out = out if ref_out is None else ref_out
            est = median_time(lambda f=f, a=(q_dense, k_all, v_all): f(*a), 3) / 2  # compiled already: no new compile
            t = device_time(lambda i, q, k, v, f=f: f(q, k, v), (q_dense, k_all, v_all), est_s=est, unroll=4)
            add({**base, "method": f"dense_{impl}", "keep": 1.0, "us": t * 1e6, "bytes": dense_bytes,
                 "read_roofline": dense_bytes / t / read_bw})
            best = t if best is None else min(best, t)
        except Exception as ex:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            add({**base, "method": f"dense_{impl}", "error": repr(ex)[:300]})
    del k_all, v_all
    if 1.0 in keeps:
        add(_dense_kernel_row(base, ix, q, k_u, v_u, n_keys, read_bw, best, ref_out, dense_bytes))
    variants = [(False, "mean", k, {}) for k in keeps] + [(True, "mean", k, {}) for k in hier_keeps]
    variants += [(False, "box", k, {}) for k in box_keeps]
    sparse_keeps = [k for k in keeps if k < 1.0]
    variants += [(False, "mean", sparse_keeps[0], v) for v in select_variants if sparse_keeps]
    for hierarchical, score, keep, sel_v in variants:
        if budget.left() < 10:
            add({**base, "method": "squeezed", "keep": keep, "skipped": "time budget"})
            continue
        keep_blocks = max(N_FIXED // BLOCK_K + 1, int(round(keep * ix["n_blocks"])))
        coarse_keep = max(1, ix["Cc"] // 4)
        kw = dict(keep_blocks=keep_blocks, hierarchical=hierarchical, coarse_keep=coarse_keep, n_keys=n_keys,
                  score=score, **sel_v)
        statics = {k: v for k, v in ix.items() if not isinstance(v, jax.Array)}
        arrays = {k: v for k, v in ix.items() if isinstance(v, jax.Array)}
        step = jax.jit(lambda q, ku, vu, arr, kw=kw, st=statics: squeezed_step(q, ku, vu, {**st, **arr}, **kw))
        name = "squeezed_hier" if hierarchical else ("squeezed_box" if score == "box" else "squeezed_flat")
        row = {**base, "method": name, "keep": keep, "blocks": keep_blocks, **sel_v}
        t_row = time.perf_counter()
        try:
            out = step(q, k_u, v_u, arrays)
            if check:
                row.update(_check_step(q, k_u, v_u, arrays, statics, kw, H))
                if keep >= 1.0 and ref_out is not None and not hierarchical:
                    row["rel_err_vs_dense"] = rel_err(out.reshape(q_dense.shape), ref_out)
            est = median_time(lambda step=step, arr=arrays: step(q, k_u, v_u, arr), 3) / 2
            t = device_time(lambda i, q, ku, vu, arr, step=step: step(q, ku, vu, arr), (q, k_u, v_u, arrays),
                            est_s=est, unroll=2, reps=3)
            # box table [2D] bf16; centroids [D] bf16 (the hierarchical lookup's coarse ones f32)
            table_row = 2 * D * ITEM if score == "box" else (D * 4 if hierarchical else D * ITEM)
            lookup_read = hierarchical or keep_blocks < ix["n_blocks"]  # a keep-all selection reads no centroid
            nbytes = (2 * H * keep_blocks * BLOCK_K * D * ITEM + 2 * H * USER * D * ITEM
                      + lookup_read * H * (ix["Cc"] if hierarchical else ix["C"]) * (table_row + 8)
                      + H * ix["n_blocks"] * 8)
            row.update(us=t * 1e6, bytes=nbytes, read_roofline=nbytes / t / read_bw,
                       speedup_vs_best_dense=(best / t) if best else None)
        except Exception as ex:  # noqa: BLE001
            row["error"] = repr(ex)[:400]
        row["wall_s"] = time.perf_counter() - t_row  # compile + check + timing (the runner's time budget)
        add(row)
    for keep in [k for k in keeps if k < 1.0]:
        if budget.left() >= 10:
            add(_question_chosen_row(base, ix, q, k_u, v_u, keep, n_keys, read_bw, best))
    return rows


def _dense_kernel_row(base: dict, ix: dict, q, k_u, v_u, n_keys: int, read_bw: float, best: float | None,
                      ref_out, nbytes: int) -> dict:
    """Every context block and the user tokens through `dense_decode` (contiguous slices, no lookup): what a
    request keeping 100% of the context runs when that is known before the step."""
    row = {**base, "method": "dense_kernel", "keep": 1.0}
    lay = dict(n_fixed=N_FIXED, fixed_pad=N_FIXED, n_clustered=n_keys - N_FIXED, block_k=BLOCK_K)
    user_len = jnp.full((1,), k_u.shape[1], jnp.int32)
    f = jax.jit(lambda q, k, v, ku, vu: dense_decode(q, k, v, k_user_BUHD=ku, v_user_BUHD=vu, user_len_B=user_len,
                                                     **lay)[0])
    try:
        out = f(q, ix["keys"], ix["values"], k_u, v_u)
        if ref_out is not None:
            row["rel_err_vs_dense"] = rel_err(out.reshape(ref_out.shape), ref_out)
        t = device_time(lambda i, q, k, v, ku, vu: f(q, k, v, ku, vu), (q, ix["keys"], ix["values"], k_u, v_u),
                        est_s=best or 1e-4, unroll=4)
        row.update(us=t * 1e6, bytes=nbytes, read_roofline=nbytes / t / read_bw,
                   speedup_vs_best_dense=(best / t) if best else None)
    except Exception as ex:  # noqa: BLE001
        row["error"] = repr(ex)[:400]
    return row


def _question_chosen_row(base: dict, ix: dict, q, k_u, v_u, keep: float, n_keys: int, read_bw: float,
                         best: float | None) -> dict:
    """`ContextAttention(question_prior=n, prior_pin=1)` decode: the blocks were chosen once (here by one
    selection outside the timed step), so a step is one attention launch over them and the user tokens."""
    H = q.shape[1]
    keep_blocks = max(N_FIXED // BLOCK_K + 1, int(round(keep * ix["n_blocks"])))
    row = {**base, "method": "question_chosen", "keep": keep, "blocks": keep_blocks}
    try:
        ids, count = squeezed_select(q, ix, keep_blocks=keep_blocks, hierarchical=False, coarse_keep=1)
        user_len = jnp.full((1,), k_u.shape[1], jnp.int32)
        lay = dict(n_fixed=N_FIXED, fixed_pad=N_FIXED, n_clustered=n_keys - N_FIXED)
        # K/V and the ids are arguments, not constants of the compiled step (8.6 GB at 512K MHA)
        step = jax.jit(lambda q, ku, vu, k, v, ids, count: sparse_decode(
            q, k, v, ids, count, k_user_BUHD=ku, v_user_BUHD=vu, user_len_B=user_len, **lay)[0])
        args = (q, k_u, v_u, ix["keys"], ix["values"], ids, count)
        step(*args)
        est = median_time(lambda: step(*args), 3) / 2
        t = device_time(lambda i, *a: step(*a), args, est_s=est, unroll=2, reps=3)
        nbytes = 2 * H * (keep_blocks * BLOCK_K + USER) * D * ITEM
        row.update(us=t * 1e6, bytes=nbytes, read_roofline=nbytes / t / read_bw,
                   speedup_vs_best_dense=(best / t) if best else None)
    except Exception as ex:  # noqa: BLE001
        row["error"] = repr(ex)[:400]
    return row


def _lookup(q, arrays: dict, statics: dict, kw: dict, reference: bool = False):
    ix = {**statics, **arrays}
    fine = (ix["centroids"], ix["log_sizes"], ix["radius"])
    flat = functools.partial(centroid_scores_ref if reference else centroid_scores, active_BH=kw.get("active"))
    if kw.get("score") == "box":  # [q+, q-] . box table, as ContextAttention's default score
        return flat(signed_split(q), ix["box_table"], ix["log_sizes"], jnp.zeros_like(ix["log_sizes"]),
                    score="mean", scale=1.0 / float(np.sqrt(q.shape[-1])))
    if kw["hierarchical"] and not reference:
        return hierarchical_scores(q, ix["coarse_centroids"], ix["coarse_log_sizes"], ix["coarse_first"],
                                   ix["coarse_count"], *fine, coarse_keep=kw["coarse_keep"],
                                   max_fine_per_coarse=ix["max_fine"])
    return flat(q, *fine)


def _check_step(q, k_u, v_u, arrays: dict, statics: dict, kw: dict, H: int) -> dict:
    """The pipeline's pieces on the device against their references with the same inputs: the fused selection
    (exact ids and counts) and the sparse attention over those ids (relative error, two heads). One jit, so
    the check costs one compile."""
    ids, cnt, ids_r, cnt_r, o, o_r = jax.jit(
        lambda q, arrays: _check_parts(q, arrays, statics, kw, H))(q, arrays)
    exact = bool(np.array_equal(ids, ids_r) and np.array_equal(cnt, cnt_r))
    return {"selection_exact": exact, "rel_err_vs_ref": rel_err(o, o_r)}


def _check_parts(q, arrays: dict, statics: dict, kw: dict, H: int):
    ix = {**statics, **arrays}
    sel = {k: v for k, v in kw.items() if k != "n_keys"}
    ids, cnt = squeezed_select(q, ix, **sel)
    # the reference selection over the lookup kernel's scores: what the selection kernels must pick exactly
    k_1H = jnp.full((1, H), kw["keep_blocks"], jnp.int32)
    ids_r, cnt_r = select_blocks_ref(_lookup(q, arrays, statics, kw), ix["cluster_size"], ix["lo"], ix["hi"], k_1H,
                                     n_blocks=ix["n_blocks"], capacity=kw["keep_blocks"],
                                     fixed_blocks=N_FIXED // BLOCK_K)
    lay = dict(n_fixed=N_FIXED, fixed_pad=N_FIXED, n_clustered=kw["n_keys"] - N_FIXED)
    o, _ = sparse_decode(q, ix["keys"], ix["values"], ids, cnt, **lay)
    o_r, _ = sparse_decode_ref(q[:, :2], ix["keys"][:2], ix["values"][:2], ids[:, :2], cnt[:, :2], **lay)
    return ids, cnt, ids_r, cnt_r, o[:, :2], o_r


def _fmt(r: dict) -> str:
    head = f"{r.get('section', '')[:18]:18s} {r.get('shape', ''):4s} {r.get('n_keys', 0) // 1024:4d}K " \
           f"{r.get('method', ''):16s} keep={r.get('keep', '')!s:6.6s}"
    if "us" not in r:
        return f"{head} {r.get('error', r.get('skipped', ''))}"
    s = f"{head} {r['us']:9.1f} us"
    if r.get("read_roofline") is not None:
        s += f" roof={r['read_roofline']:.2f}"
    if r.get("speedup_vs_best_dense"):
        s += f" x{r['speedup_vs_best_dense']:.2f} vs dense"
    if r.get("rel_err_vs_ref") is not None:
        s += f" err={r['rel_err_vs_ref']:.1e}"
    return s


# ------------------------------------------------------------------------------------------------ whole model

def model_rows(context: int, n_layers: int, keep: float, new_tokens: int, budget: Budget,
               implementations: tuple[str, ...] = ("cudnn", "xla"), squeezed: bool = True,
               preset: str = "llama-3.1-8b") -> list[dict]:
    """Per-token decode latency of `generate` on a random-weight model: dense (each implementation) vs squeezed."""
    from models.config import load_preset
    from models.llama import init_model
    from squeeze_jax.attention.context import ContextAttention, ContextState
    from squeeze_jax.generate import SamplingConfig, generate
    from squeeze_jax.index.build import IndexConfig, build_index_report

    cfg = dataclasses.replace(load_preset(preset), n_layers=n_layers)
    model = init_model(cfg, 0, dtype=jnp.bfloat16)
    rng = np.random.default_rng(0)
    ctx = rng.integers(100, cfg.vocab_size - 100, size=context).astype(np.int32)
    question = rng.integers(100, cfg.vocab_size - 100, size=64).astype(np.int32)
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_tokens=())
    base = dict(section="model_decode", model=f"{preset} x{n_layers} layers", n_keys=context, user=64,
                new_tokens=new_tokens)
    rows = []
    prompt = np.concatenate([ctx, question])[None].astype(np.int32)
    prefilled = None
    for impl in implementations:
        if budget.left() < 30:
            rows.append({**base, "method": f"dense_{impl}", "skipped": "time budget"})
            continue
        try:  # the prompt is prefilled once with cuDNN (XLA cannot hold the logits), then decoded with `impl`
            prefilled = prefilled or _dense_prefill(model, prompt, sampling)
            ms = _dense_decode_ms(model, prefilled, sampling, impl)
            rows.append({**base, "method": f"dense_{impl}", "ms_per_token": ms})
        except Exception as ex:  # noqa: BLE001
            rows.append({**base, "method": f"dense_{impl}", "error": repr(ex)[:300]})
        print(rows[-1], flush=True)
    del prefilled
    if squeezed and budget.left() > 60:
        try:
            icfg = IndexConfig(budgets=(keep,), progress=False, prefill_chunk=512)
            index, report = build_index_report(model, ctx, icfg)
            backend = ContextAttention(policy="squeezed", max_budget=keep, score="mean")  # as attention_rows time
            state = ContextState.for_backend(index, jnp.full((index.n_layers, 1), keep, jnp.float32), backend)
            kw = dict(sampling=sampling, backend=backend, backend_state=state, position_offset=context)
            generate(model, [question.tolist()], **kw)
            res = [generate(model, [question.tolist()], **kw) for _ in range(2)]
            ms = min(r.decode_ms_per_token for r in res)
            rows.append({**base, "method": "squeezed", "keep": keep, "ms_per_token": ms,
                         "prefill_s": min(r.prefill_s for r in res),
                         "index_build_s": float(sum(report.stage_seconds.values()))})
        except Exception as ex:  # noqa: BLE001
            rows.append({**base, "method": "squeezed", "error": repr(ex)[:400]})
        print(rows[-1], flush=True)
    dense = [r["ms_per_token"] for r in rows if r["method"].startswith("dense") and "ms_per_token" in r]
    for r in rows:
        if "ms_per_token" in r and dense:
            r["speedup_vs_best_dense"] = min(dense) / r["ms_per_token"]
    return rows


def _dense_prefill(model, prompt_BT: np.ndarray, sampling) -> tuple:
    """(first logits, KV cache) of a cuDNN prefill (XLA off the GPU) of the whole prompt, room left for the new
    tokens."""
    from flax import nnx

    from models.attention import DenseAttention
    from squeeze_jax.generate import _prefill

    graphdef, state = nnx.split(model)
    T = prompt_BT.shape[1]
    cache_len = T + -(-sampling.max_new_tokens // 64) * 64
    args = (jnp.asarray(prompt_BT), jnp.full((1,), T, jnp.int32), jnp.int32(0), None)
    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"  # XLA: the CPU smoke test
    logits, cache, _ = _prefill(graphdef, state, *args, backend=DenseAttention(implementation=impl),
                                cache_len=cache_len)
    return jax.block_until_ready((logits, cache))


def _dense_decode_ms(model, prefilled: tuple, sampling, impl: str, reps: int = 2) -> float:
    """Per-token latency of the jit'd dense decode loop (attention `impl`) from a prefilled cache; each run
    decodes from a copy (the loop donates its cache)."""
    from flax import nnx

    from models.attention import DenseAttention
    from squeeze_jax.generate import _decode

    graphdef, state = nnx.split(model)
    logits, cache = prefilled
    times = []
    for _ in range(reps + 1):
        c = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
        t0 = time.perf_counter()
        out, _, steps, _, _ = _decode(graphdef, state, logits, c, jnp.int32(0), None, jax.random.key(0),
                                      backend=DenseAttention(implementation=impl), sampling=sampling)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / max(int(steps) - 1, 1))
    return 1e3 * min(times[1:])


def _select_variant(name: str) -> dict:
    """A `--select-variants` entry as `squeezed_select` options: [fold](fused | xla | auto | chunkN)[tieN]."""
    fold = name.startswith("fold")
    rest = name[4:] if fold else name
    rest, tie, n_tie = rest.partition("tie")
    extra = {"tie_check": int(n_tie)} if tie else {}
    if rest.startswith("chunk"):
        return {"fold": fold, "select": "fused", "chunk_blocks": int(rest[5:]), **extra}
    if rest in ("", "fused", "xla", "auto"):
        return {"fold": fold, "select": rest or "fused", **extra}
    raise ValueError(f"unknown selection variant {name!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", default="32768,131072,524288")
    ap.add_argument("--shapes", default="gqa,mha")
    ap.add_argument("--keeps", default="0.125,0.0625,1.0")
    ap.add_argument("--model-context", type=int, default=131072)
    ap.add_argument("--model-layers", type=int, default=4, help="0 = no whole-model rows")
    ap.add_argument("--box-keeps", default="", help="kept fractions also timed with box-bound cluster scores")
    ap.add_argument("--hier-keeps", default="0.125", help="kept fractions also timed with the hierarchical lookup")
    ap.add_argument("--select-variants", default="",
                    help="more flat rows at the first kept fraction < 1, each a selection path: fused, xla, fold, "
                         "chunkN (the chunked Pallas selection, N blocks per program), foldchunkN; a tieN suffix "
                         "ends the search on a tied band after N steps (e.g. autotie8)")
    ap.add_argument("--time-budget", type=float, default=300)
    args = ap.parse_args(argv)
    select_variants = tuple(_select_variant(v) for v in args.select_variants.split(",") if v)
    budget = Budget(args.time_budget)
    read_bw = read_bandwidth()
    keeps = [float(x) for x in args.keeps.split(",")]
    rows = []
    for n in [int(x) for x in args.contexts.split(",")]:
        for shape in args.shapes.split(","):
            if SHAPES[shape][1] * n * D * ITEM * 6 > 50e9 or budget.left() < 20:
                continue
            rows += attention_rows(n, shape, keeps, read_bw, budget,
                                   box_keeps=tuple(float(x) for x in args.box_keeps.split(",") if x),
                                   hier_keeps=tuple(float(x) for x in args.hier_keeps.split(",") if x),
                                   select_variants=select_variants)
    if args.model_layers > 0:
        rows += model_rows(args.model_context, args.model_layers, 0.125, 32, budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": {**device_info(), "read_bw_Bps": read_bw}, "rows": rows}, indent=1,
                                   default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


