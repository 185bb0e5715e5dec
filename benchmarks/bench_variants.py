"""Variant timings of the decode pipeline's stages (GQA 32/8, d128, bf16, 1/8 kept): what limits each one.

    PYTHONPATH=. python3 benchmarks/bench_variants.py --out benchmarks/results/variants.json   # GPU
    PYTHONPATH=. python3 benchmarks/bench_variants.py --smoke --out /tmp/variants.json         # CPU, interpret

  fold      decode lookup + selection in three launches vs two (the lookup's finish inside the selection):
            same blocks on the device, and the time of each

Each stage is timed alone (chained calls inside one jit, `timing.device_time`) under the knobs that decide
its cost, next to the floor of an empty launch on the same grid:
  floor     a Pallas kernel that writes one int per program, grids (1, 8) and (8, 33)
  select    fused block selection: warps x search steps (0 = no search: gather + compaction only), range
            offsets gathered per step, from the lookup's logits (its finish folded in), the chunked selection
            (blocks per program, from scores and from logits), and the gather at span 1 (every block one cluster)
  prior     the question prior: selection with a prior row, and the prefill pass building it (16 rows)
  lookup    flat centroid lookup over the mean centroids (bf16 [C, D]; phase 1 alone also f32) and the box
            table (bf16 [C, 2D]): phase-2 method, centroids per step, steps per program
  decode    sparse decode with 512 user tokens in the launch: splits, blocks per step, warps, stages; the
            same count of blocks at consecutive ids; without the user tokens; and the split combine alone
  tail      the exact-question pass (32 queries over every key): kernel vs XLA key chunks
  full      100% kept, GQA 32/8 and MHA 32/32, with the user tokens: cuDNN over context + user keys, the sparse
            kernel over every block id and over all but one, `dense_decode` (slices) under its knobs
Rows go to the JSON file as they finish (a run cut short keeps them).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from benchmarks import bench_e2e, timing  # noqa: E402
from pallas_kernels import centroid_lookup as cl  # noqa: E402
from pallas_kernels.block_select import SEARCH_ITERS, select_blocks, select_blocks_from_logits  # noqa: E402
from pallas_kernels.centroid_lookup import centroid_scores  # noqa: E402
from pallas_kernels.common import compiler_params, resolve_interpret  # noqa: E402
from pallas_kernels.merge import combine_partials  # noqa: E402
from pallas_kernels.selection import block_logprob_max  # noqa: E402
from pallas_kernels.sparse_decode import dense_decode, sparse_decode  # noqa: E402
from squeeze_jax.index.bounds import index_box_table, signed_split  # noqa: E402

D, BK, NF, USER = bench_e2e.D, bench_e2e.BLOCK_K, bench_e2e.N_FIXED, bench_e2e.USER


def _floor(grid: tuple[int, int]):
    """An empty launch: each program writes its flat id (the fixed cost of one kernel in the chained loop)."""
    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + pl.program_id(0) * grid[1] + pl.program_id(1)

    def run(i, x_AB):
        return pl.pallas_call(
            kernel, grid=grid, in_specs=[pl.BlockSpec((None, None), lambda a, b: (a, b))],
            out_specs=pl.BlockSpec((None, None), lambda a, b: (a, b)),
            out_shape=jax.ShapeDtypeStruct(grid, jnp.float32),
            compiler_params=compiler_params(num_warps=4, num_stages=1), interpret=resolve_interpret(None),
            name="floor")(x_AB)

    return (jnp.zeros(grid, jnp.float32),), run


@functools.lru_cache(maxsize=1)
def _decode_case(n: int):
    """The decode case every section times (built once): synthetic index of n keys over 8 KV heads, one query
    row per head group (G = 4), the blocks to keep at 1/8 and the selection's static arguments."""
    H, G = 8, 4
    ix = bench_e2e.synthetic_index(n, H, seed=n)
    q = jax.random.normal(jax.random.PRNGKey(0), (1, H, G, D), jnp.bfloat16)
    fine = (ix["centroids"], ix["log_sizes"], ix["radius"])
    kb = max(NF // BK + 1, int(round(0.125 * ix["n_blocks"])))
    k_BH = jnp.full((1, H), kb, jnp.int32)
    sel = dict(n_blocks=ix["n_blocks"], capacity=kb, fixed_blocks=NF // BK)
    return ix, q, fine, k_BH, sel


def stage_variants(n: int, smoke: bool):
    """(section, variant dict, args, step) for every timed variant at context length n."""
    ix, q, fine, k_BH, sel = _decode_case(n)
    H, G = q.shape[1:3]
    key = jax.random.PRNGKey(0)
    k_u = jax.random.normal(jax.random.fold_in(key, 1), (1, USER, H, D), jnp.bfloat16)
    user_len = jnp.full((1,), USER, jnp.int32)
    box = index_box_table(ix["keys"], ix["centroids"], ix["cluster_start"], ix["cluster_size"], 0.25,
                          dtype=jnp.bfloat16)
    scores = centroid_scores(q, *fine)
    ids, cnt = select_blocks(scores, ix["cluster_size"], ix["lo"], ix["hi"], k_BH, **sel)
    lay = dict(n_fixed=NF, fixed_pad=NF, n_clustered=n - NF)
    out = []
    for grid in ((1, 8), (8, 33)):
        out.append(("floor", {"grid": list(grid)}, *_floor(grid)))
    for warps in (16, 32):
        for iters in (0, 6, SEARCH_ITERS):
            out.append(("select", {"num_warps": warps, "search_iters": iters}, (scores,),
                        lambda i, s, w=warps, it=iters: select_blocks(s, ix["cluster_size"], ix["lo"], ix["hi"], k_BH,
                                                                      num_warps=w, search_iters=it, **sel)))
    for unroll in (2, 4):
        out.append(("select", {"num_warps": 8, "gather_unroll": unroll}, (scores,),
                    lambda i, s, u=unroll: select_blocks(s, ix["cluster_size"], ix["lo"], ix["hi"], k_BH,
                                                         gather_unroll=u, **sel)))
    # the lookup's finish inside the selection (decode's path): from the first launch's logits
    logits = cl.centroid_logits(q, *fine)
    for warps in (8, 16):
        out.append(("select", {"from_logits": True, "num_warps": warps}, (logits,),
                    lambda i, lg, w=warps: select_blocks_from_logits(lg, ix["cluster_size"], ix["lo"], ix["hi"],
                                                                     k_BH, num_warps=w, **sel)))
    # chunked selection (block scores + band counts on many programs, then per-chunk search and compaction)
    for chunk in (256, 512, 1024):
        out.append(("select", {"chunk_blocks": chunk}, (scores,),
                    lambda i, s, c=chunk: select_blocks(s, ix["cluster_size"], ix["lo"], ix["hi"], k_BH,
                                                        chunk_blocks=c, **sel)))
        out.append(("select", {"from_logits": True, "chunk_blocks": chunk}, (logits,),
                    lambda i, lg, c=chunk: select_blocks_from_logits(lg, ix["cluster_size"], ix["lo"], ix["hi"],
                                                                     k_BH, chunk_blocks=c, **sel)))
    for v in ({"num_warps": 16}, {"search_iters": 0}):
        out.append(("select", {"chunk_blocks": 512, **v}, (scores,),
                    lambda i, s, v=v: select_blocks(s, ix["cluster_size"], ix["lo"], ix["hi"], k_BH,
                                                    chunk_blocks=512, **v, **sel)))
    out.append(("select", {"num_warps": 8, "search_iters": 0, "span": 1}, (scores,),
                lambda i, s: select_blocks(s, ix["cluster_size"], ix["lo"], ix["lo"], k_BH, search_iters=0, **sel)))
    # question prior: the decode selection with a prior row per (row, head), and the prefill pass that builds it
    # (4 question tokens x 4 query heads over every key)
    prior = jax.random.normal(key, (1, H, ix["n_blocks"]), jnp.float32) - 12.0
    out.append(("prior", {"stage": "select_with_prior"}, (scores,),
                lambda i, s: select_blocks(s, ix["cluster_size"], ix["lo"], ix["hi"], k_BH, prior_BHB=prior, **sel)))
    q_rows = jax.random.normal(key, (1, H, 4 * G, D), jnp.bfloat16)
    lse_rows = jnp.full((1, H, 4 * G), 12.0, jnp.float32)
    valid = jnp.ones((n,), bool)
    out.append(("prior", {"stage": "block_logprob_max", "rows": 4 * G}, (q_rows,),
                lambda i, x: block_logprob_max(x, ix["keys"], lse_rows, valid, block_k=BK, scale=D ** -0.5)))
    q_box = signed_split(q)
    zeros = jnp.zeros_like(ix["log_sizes"])
    for table, args in (("mean_bf16", fine), ("box_bf16", (box, ix["log_sizes"], zeros))):
        qq = q if table == "mean_bf16" else q_box
        for method in ("logits", "recompute"):
            for block_c in (64, 128, 256):
                for cpp in (1, 2, 4):
                    if smoke and (block_c != 64 or cpp != 1):
                        continue
                    v = {"table": table, "method": method, "block_c": block_c, "chunks_per_program": cpp}
                    out.append(("lookup", v, (qq,), lambda i, x, a=args, v=v: centroid_scores(
                        x, *a, method=v["method"], block_c=v["block_c"], chunks_per_program=v["chunks_per_program"],
                        scale=D ** -0.5)))
    # phase 1 alone (partial normalisers + logits written): the rest of the lookup is the finish launch
    fine_f32 = (fine[0].astype(jnp.float32), *fine[1:])
    for table, args in (("mean_bf16", fine), ("mean_f32", fine_f32), ("box_bf16", (box, ix["log_sizes"], zeros))):
        qq = q_box if table == "box_bf16" else q
        out.append(("lookup", {"table": table, "phase1_only": True}, (qq,),
                    lambda i, x, a=args: cl.centroid_logits(x, *a, scale=D ** -0.5)))
    user = dict(k_user_BUHD=k_u, v_user_BUHD=k_u, user_len_B=user_len)
    decode = [{}] + [{"num_splits": s} for s in (8, 16, 66, 132)]
    decode += [{"blocks_per_step": p} for p in (4, 16)] + [{"num_warps": 8}]
    decode += [{"num_stages": s} for s in (1, 3)] + [{"blocks_per_step": 16, "num_warps": 8}]
    decode += [{"blocks_per_step": 4, "num_splits": 66}, {"user_keys_per_split": 512}]
    for v in decode[: 2 if smoke else None]:
        out.append(("decode", v or {"default": True}, (q,), lambda i, x, v=v: sparse_decode(
            x, ix["keys"], ix["values"], ids, cnt, **lay, **user, **v)))
    # what the access pattern costs: the same count of blocks at consecutive ids (contiguous K/V), and the
    # launch without the user tokens
    ids_seq = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=ids.dtype), ids.shape)
    out.append(("decode", {"contiguous_ids": True}, (q,), lambda i, x: sparse_decode(
        x, ix["keys"], ix["values"], ids_seq, cnt, **lay, **user)))
    out.append(("decode", {"no_user_tokens": True}, (q,), lambda i, x: sparse_decode(
        x, ix["keys"], ix["values"], ids, cnt, **lay)))
    S = 33 + USER // 256
    o_p = jax.random.normal(key, (1, H, S, G, D), jnp.float32)
    lse_p = jax.random.normal(key, (1, H, S, G), jnp.float32)
    out.append(("decode", {"combine_only": True, "splits": S}, (o_p,),
                lambda i, o: combine_partials(o, lse_p, axis=2)))
    return out


def fold_rows(n: int) -> list[dict]:
    """Decode lookup + selection as three launches (centroid_scores, select_blocks) against two (centroid_logits,
    select_blocks_from_logits): the same blocks on the device, and each path's time."""
    ix, q, fine, k_BH, sel = _decode_case(n)
    tables = (ix["cluster_size"], ix["lo"], ix["hi"], k_BH)
    paths = {
        "three_launch": jax.jit(lambda q: select_blocks(centroid_scores(q, *fine), *tables, **sel)),
        "folded": jax.jit(lambda q: select_blocks_from_logits(cl.centroid_logits(q, *fine), *tables, **sel)),
    }
    got = {name: jax.device_get(f(q)) for name, f in paths.items()}
    same = all(bool((a == b).all()) for a, b in zip(got["three_launch"], got["folded"], strict=True))
    rows = []
    for name, f in paths.items():
        us = timing.device_time(lambda i, x, f=f: f(x), (q,), est_s=5e-5, unroll=4, reps=3) * 1e6
        rows.append({"section": "fold", "path": name, "same_selection": same, "us": us})
    return rows


def tail_rows(n: int, read_bw: float) -> list[dict]:
    from benchmarks import bench_sparse_attention as bsa

    rows: list[dict] = []
    q, k, v = bsa.make_inputs("gqa", n, 64)
    bsa.exact_tail_case(rows, "gqa", n, q, k, v, read_bw)
    return [{"section": "tail", **{k: val for k, val in r.items() if k != "trace"}} for r in rows]


def full_rows(n: int, read_bw: float, smoke: bool) -> list[dict]:
    """100% kept: the best dense (cuDNN) against the sparse kernel over every block id and `dense_decode`."""
    return [r for shape in bench_e2e.SHAPES for r in _full_shape_rows(shape, n, read_bw, smoke)]


def _full_shape_rows(shape: str, n: int, read_bw: float, smoke: bool) -> list[dict]:
    Hq, H = bench_e2e.SHAPES[shape]
    G = Hq // H
    rows: list[dict] = []
    lay = dict(n_fixed=NF, fixed_pad=NF, n_clustered=n - NF)
    key = jax.random.PRNGKey(3)
    k = jax.random.normal(key, (H, n, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 1), (H, n, D), jnp.bfloat16)
    q = jax.random.normal(jax.random.fold_in(key, 2), (1, H, G, D), jnp.bfloat16)
    k_u = jax.random.normal(jax.random.fold_in(key, 3), (1, USER, H, D), jnp.bfloat16)
    user = dict(k_user_BUHD=k_u, v_user_BUHD=k_u, user_len_B=jnp.full((1,), USER, jnp.int32))
    nbytes = 2 * H * (n + USER) * D * 2
    base = {"section": "full", "shape": shape, "bytes": nbytes}

    def timed(row: dict, fn, args) -> None:
        try:
            t = timing.device_time(lambda i, *a: fn(*a), args, est_s=nbytes / read_bw, unroll=4, reps=3)
            row.update(us=t * 1e6, read_roofline=nbytes / t / read_bw)
        except Exception as ex:  # noqa: BLE001 - a variant that does not compile is reported
            row["error"] = repr(ex)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)

    if not smoke:
        k_all = jnp.concatenate([k.transpose(1, 0, 2)[None], k_u], axis=1)
        v_all = jnp.concatenate([v.transpose(1, 0, 2)[None], k_u], axis=1)
        timed({**base, "path": "cudnn"}, lambda q, ka, va: jax.nn.dot_product_attention(
            q.reshape(1, 1, Hq, D), ka, va, implementation="cudnn"), (q, k_all, v_all))
        del k_all, v_all
    nb = n // BK
    ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (1, H, nb))
    cnt = jnp.full((1, H), nb, jnp.int32)
    timed({**base, "path": "sparse_decode_all_ids"},
          lambda q, k, v: sparse_decode(q, k, v, ids, cnt, **lay, **user)[0], (q, k, v))
    # one block short of all: the same gather over nearly the same bytes
    timed({**base, "path": "sparse_decode_gather_all_but_one"},
          lambda q, k, v: sparse_decode(q, k, v, ids, cnt - 1, **lay, **user)[0], (q, k, v))
    knobs = [{}, {"num_stages": 3}, {"num_warps": 8}, {"blocks_per_step": 4}, {"num_splits": 8},
             {"num_splits": 9}, {"num_splits": 16}, {"num_splits": 33}]
    for kn in knobs[: 1 if smoke else None]:
        timed({**base, "path": "dense_decode", **(kn or {"default": True})},
              lambda q, k, v, kn=kn: dense_decode(q, k, v, **lay, **user, **kn)[0], (q, k, v))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--smoke", action="store_true", help="CPU: 2K keys, interpret mode, a few variants")
    ap.add_argument("--sections", default="fold,floor,select,prior,lookup,decode,tail,full")
    args = ap.parse_args(argv)
    timing.set_smoke(args.smoke)
    n = 2048 if args.smoke else args.context
    wanted = set(args.sections.split(","))
    result = {"device": timing.device_info(), "context": n, "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    read_bw = timing.read_bandwidth()
    result["read_GBps"] = read_bw / 1e9
    if "fold" in wanted:
        for row in fold_rows(n):
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        save()
    for section, variant, xs, step in stage_variants(n, args.smoke):
        if section not in wanted:
            continue
        row = {"section": section, **variant}
        try:
            row["us"] = timing.device_time(step, xs, est_s=3e-5, unroll=4, reps=3) * 1e6
        except Exception as ex:  # noqa: BLE001 - a variant that does not compile is reported
            row["error"] = repr(ex)[:300]
            row["trace"] = traceback.format_exc()[-800:]
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        save()
    if "full" in wanted:
        result["rows"] += full_rows(n, read_bw, args.smoke)
        save()
    if "tail" in wanted and not args.smoke:
        t0 = time.perf_counter()
        result["rows"] += tail_rows(n, read_bw)
        result["tail_wall_s"] = time.perf_counter() - t0
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
