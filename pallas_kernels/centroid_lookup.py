"""Centroid lookup: per-cluster log-probability estimates for Squeezed Attention, flat and hierarchical.

For a query row q (post-RoPE, one query head) and fine cluster j of its KV head (centroid c_j = mean of the
raw member keys, size N_j, radius r_j = max distance of a member key to c_j):

    logit_j = scale * q.c_j  [+ scale * ||q|| * r_j * radius_weight   for score="radius"]
    s_j     = logit_j - logsumexp_i(logit_i + log N_i)                 (= log S_j of the paper)

computed stably (max-subtraction, never exp of a raw logit). The R rows that share one selection (decode: the
G query heads of a KV group; prefill: block_q user tokens x G heads) are aggregated per cluster with
agg="max" (max_r s_rj) or agg="mean" (log mean_r exp(s_rj)). Clusters of size 0 (log size -inf) score -inf.

Layout of the work (all inside one jit, two kernel launches for the flat lookup):
- The normaliser needs every cluster, so scoring runs in two phases over a grid (B, H, programs), each
  program walking `chunks_per_program` chunks of `block_c` centroids: phase 1 computes each row's partial
  log-sum-exp (max, sum) per program; phase 2 merges those partials in-kernel and either (method="logits")
  aggregates logits that phase 1 wrote, or (method="recompute") recomputes the chunk's logits. Writing
  logits costs 2*R*4 bytes per centroid against re-reading D*itemsize bytes, so "auto" picks "logits" for
  few rows (decode) and "recompute" for many (prefill).
- The hierarchical lookup scores the coarse centroids with the same kernels, keeps the top `coarse_keep`
  coarse clusters per (B, H), and runs gather kernels over only the fine centroids under them (each coarse
  cluster is a contiguous run of fine clusters). The fine normaliser is the reached fine clusters' mass plus
  the unreached coarse clusters' mass, the latter computed as total coarse mass minus the kept coarse mass
  (the kept part comes from the gather kernel, which also reads the kept coarse centroids).

The dot runs in the query dtype with f32 accumulation by default (bf16 queries: the centroids are cast to
bf16 in-kernel, as precise as the attention's own q.k); `dot_dtype="float32"` asks for full f32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    check_head_dim,
    check_row_head_mask,
    compiler_params,
    default_scale,
    is_pow2,
    next_pow2,
    pad_axis,
    padded_rows,
    resolve_interpret,
    row_head_mask_i32,
)

Score = Literal["mean", "radius"]
Agg = Literal["max", "mean"]
Method = Literal["auto", "logits", "recompute"]

_NEG_INF = float("-inf")
_SCORES = ("mean", "radius")
_AGGS = ("max", "mean")
_METHODS = ("auto", "logits", "recompute")
_DOT_DTYPES = (None, "bfloat16", "float16", "float32")


@dataclasses.dataclass(frozen=True)
class _ScoreCfg:
    """Static scoring config shared by the kernels and the jnp glue."""

    scale: float
    radius_coef: float  # scale * radius_weight; only used when use_radius
    use_radius: bool
    agg: str
    n_rows: int  # real rows R (the tile holds padded_rows(R))
    dot_dtype: str | None  # operand dtype of the dot; None = promoted dtype of q and the centroids


# --------------------------------------------------------------------------------------------------------
# Validation and static choices
# --------------------------------------------------------------------------------------------------------


def _check_options(score: str, agg: str, method: str, radius_weight: float, dot_dtype: str | None) -> None:
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not math.isfinite(float(radius_weight)):
        raise ValueError(f"radius_weight must be finite, got {radius_weight}")
    if dot_dtype not in _DOT_DTYPES:
        raise ValueError(f"dot_dtype must be one of {_DOT_DTYPES}, got {dot_dtype!r}")


def _check_float(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {x.dtype}")


def _check_int(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")


def _check_level(q_BHRD: jax.Array, centroids_HCD: jax.Array, log_sizes_HC: jax.Array,
                 radius_HC: jax.Array | None, what: str) -> None:
    """Shapes and dtypes of one level (centroids + per-cluster tables) against the queries."""
    if q_BHRD.ndim != 4:
        raise ValueError(f"q_BHRD must be 4-D [B, H, R, D], got shape {q_BHRD.shape}")
    _check_float("q_BHRD", q_BHRD)
    B, H, R, D = q_BHRD.shape
    if min(B, H, R) < 1:
        raise ValueError(f"q_BHRD has an empty axis: {q_BHRD.shape}")
    check_head_dim(D)
    if centroids_HCD.ndim != 3 or centroids_HCD.shape[0] != H or centroids_HCD.shape[2] != D:
        raise ValueError(f"{what} centroids must be [H={H}, C, D={D}], got shape {centroids_HCD.shape}")
    _check_float(f"{what} centroids", centroids_HCD)
    C = centroids_HCD.shape[1]
    if C < 1:
        raise ValueError(f"{what} centroids have no clusters (C = 0)")
    tables = [("log_sizes", log_sizes_HC)] + ([("radius", radius_HC)] if radius_HC is not None else [])
    for name, t in tables:
        if t.shape != (H, C):
            raise ValueError(f"{what} {name} must be [H={H}, C={C}], got shape {t.shape}")
        _check_float(f"{what} {name}", t)


def _resolve_method(method: str, n_rows: int, head_dim: int, c_dtype: jnp.dtype) -> str:
    """'logits' when writing + reading R f32 logits per centroid moves fewer bytes than re-reading it."""
    if method != "auto":
        return method
    return "logits" if 2 * n_rows * 4 < head_dim * jnp.dtype(c_dtype).itemsize else "recompute"


def _default_block_c(rows_p: int) -> int:
    """Centroids per loop step: keeps the [rows_p, block_c] logit tile at <= 16K elements, 32..128
    (128 for decode; 64 for 256-row prefill tiles, the fastest of 32/64/128 measured on the H100)."""
    return int(min(128, max(32, 16384 // rows_p)))


def _num_warps(rows_p: int, cols: int) -> int:
    return 8 if rows_p * cols >= 16384 else 4


def _default_chunks_per_program(n_chunks: int, rows_p: int) -> int:
    """Chunks one program walks: 2 for few rows (decode: on the H200 at 6.5K centroids x 8 heads, 2 chunks of
    128 took 11.8 us (f32 means) / 13.1 us (bf16 boxes) against 15.8 / 16.2 us for 1 and 13.3 / 14.3 for 4);
    8 for large tiles (each program loads its q tile once for 8 chunks; on the H100 8 beat 1/2/4 for 256-row
    prefill)."""
    return min(2, n_chunks) if rows_p <= 32 else min(8, n_chunks)


def _prepare_q(q_BHRD: jax.Array) -> jax.Array:
    """Pads the row axis to a power of two >= 16 (the dot needs >= 16 rows); padded rows are masked."""
    return pad_axis(q_BHRD, 2, padded_rows(q_BHRD.shape[2]))


def _q_norms(q_BHRpD: jax.Array) -> jax.Array:
    """||q|| per row [B, H, Rp] in f32 (for the radius score)."""
    qf = q_BHRpD.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(qf * qf, axis=-1))


# --------------------------------------------------------------------------------------------------------
# In-kernel tile math (works on loaded arrays; shared by the flat and the gather kernels)
# --------------------------------------------------------------------------------------------------------


def _scaled_dot(q_RD, c_CD, cfg: _ScoreCfg) -> jax.Array:
    """scale * q @ c.T with f32 accumulation. dot_dtype None: operands in the query dtype (the precision of
    the attention's own q.k; an f32 query gives an f32 dot, tf32 on the GPU); "float32": full f32
    precision; "bfloat16"/"float16": operands cast to it."""
    dt = jnp.dtype(q_RD.dtype if cfg.dot_dtype is None else cfg.dot_dtype)
    prec = lax.Precision.HIGHEST if cfg.dot_dtype == "float32" else None
    return plgpu.dot(q_RD.astype(dt), c_CD.astype(dt), trans_b=True, precision=prec) * cfg.scale


def _tile_logits(q_RD, c_CD, qn_R, rad_C, cfg: _ScoreCfg) -> jax.Array:
    """Scaled (and optionally radius-boosted) logits [R, C] in f32 for one tile."""
    logits = _scaled_dot(q_RD, c_CD, cfg)
    if cfg.use_radius:
        logits = logits + cfg.radius_coef * qn_R[:, None] * rad_C.astype(jnp.float32)[None, :]
    return logits


def _partial_lse(w_RC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (max, sum exp(w - max)) of a tile; rows with every entry -inf give (-inf, 0)."""
    m = jnp.max(w_RC, axis=1)
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    return m, jnp.sum(jnp.exp(w_RC - m_safe[:, None]), axis=1)


def _merge_two(m1, l1, m2, l2):
    """Merges two (max, sum) partials (either may be empty: max -inf, sum 0)."""
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    return m, l1 * jnp.exp(m1 - m_safe) + l2 * jnp.exp(m2 - m_safe)


def _aggregate_rows(s_RC: jax.Array, row_ok: jax.Array, agg: str, n_rows: int) -> jax.Array:
    """Aggregates per-row log-probabilities over the (valid) rows: max, or log of the mean probability."""
    s = jnp.where(row_ok[:, None], s_RC, _NEG_INF)
    m = jnp.max(s, axis=0)
    if agg == "max":
        return m
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    return m_safe + jnp.log(jnp.sum(jnp.exp(s - m_safe[None, :]), axis=0)) - math.log(n_rows)


# --------------------------------------------------------------------------------------------------------
# Flat kernels: grid (B, H, programs); each program walks `cpp` chunks of `block_c` centroids
# --------------------------------------------------------------------------------------------------------


def _flat_chunk(q, qn, c_ref, logn_ref, rad_ref, start, cfg: _ScoreCfg, n_clusters: int, block_c: int):
    """Logits [Rp, block_c] of the chunk at `start`, its log sizes (-inf outside [0, C)) and column mask."""
    col_ok = start + jnp.arange(block_c) < n_clusters
    sl = pl.ds(start, block_c)
    c = plgpu.load(c_ref.at[sl, :], mask=col_ok[:, None], other=0.0)
    rad = plgpu.load(rad_ref.at[sl], mask=col_ok, other=0.0) if cfg.use_radius else None
    logn = plgpu.load(logn_ref.at[sl], mask=col_ok, other=_NEG_INF).astype(jnp.float32)
    logn = jnp.where(col_ok, logn, _NEG_INF)
    return _tile_logits(q, c, qn, rad, cfg), logn, col_ok


def _chunk_range(n_clusters: int, block_c: int, cpp: int):
    """(first chunk, number of chunks) of this program."""
    n_chunks = pl.cdiv(n_clusters, block_c)
    first = pl.program_id(2) * cpp
    return first, jnp.minimum(cpp, n_chunks - first)


def _flat_lse_kernel(act_ref, q_ref, qn_ref, c_ref, logn_ref, rad_ref, m_ref, l_ref, *logits_ref, cfg, n_clusters,
                     block_c, cpp):
    """Per-row partial LSE over this program's chunks; optionally writes the logits of real rows. An inactive
    (row, head) reads nothing: its partials are empty (max -inf, sum 0)."""
    q = q_ref[...]
    qn = qn_ref[...] if cfg.use_radius else None
    row_ok = jnp.arange(q.shape[0]) < cfg.n_rows
    first, n = _chunk_range(n_clusters, block_c, cpp)
    n = jnp.where(act_ref[...] != 0, n, 0)

    def body(i, carry):
        start = (first + i) * block_c
        logits, logn, col_ok = _flat_chunk(q, qn, c_ref, logn_ref, rad_ref, start, cfg, n_clusters, block_c)
        if logits_ref:
            plgpu.store(logits_ref[0].at[:, pl.ds(start, block_c)], logits,
                        mask=row_ok[:, None] & col_ok[None, :])
        return _merge_two(*carry, *_partial_lse(logits + logn[None, :]))

    init = (jnp.full(q.shape[:1], _NEG_INF, jnp.float32), jnp.zeros(q.shape[:1], jnp.float32))
    m, l_sum = lax.fori_loop(0, n, body, init)
    m_ref[...] = m
    l_ref[...] = l_sum


def lse_from_partials(m_ref, l_ref) -> jax.Array:
    """In-kernel merge of per-program (max, sum) partials [nP, Rp] into each row's log-normaliser [Rp]."""
    nP, Rp = m_ref.shape
    nPp = next_pow2(nP)
    ok = (jnp.arange(nPp) < nP)[:, None]
    m = plgpu.load(m_ref.at[pl.ds(0, nPp), :], mask=ok, other=_NEG_INF)
    l_sum = plgpu.load(l_ref.at[pl.ds(0, nPp), :], mask=ok, other=0.0)
    M = jnp.max(m, axis=0)
    M_safe = jnp.where(M > _NEG_INF, M, 0.0)
    return M_safe + jnp.log(jnp.sum(l_sum * jnp.exp(m - M_safe[None, :]), axis=0))


def _flat_score_kernel(act_ref, q_ref, qn_ref, c_ref, logn_ref, rad_ref, m_ref, l_ref, out_ref, *, cfg,
                       n_clusters, block_c, cpp):
    """Aggregated scores of this program's chunks (recomputed logits; normaliser merged from partials); an
    inactive (row, head) writes `_idle_scores` without reading a centroid."""
    q = q_ref[...]
    qn = qn_ref[...] if cfg.use_radius else None
    lse = lse_from_partials(m_ref, l_ref)
    row_ok = jnp.arange(q.shape[0]) < cfg.n_rows
    first, n = _chunk_range(n_clusters, block_c, cpp)
    active = act_ref[...] != 0

    def body(i, carry):
        start = (first + i) * block_c
        logits, logn, col_ok = _flat_chunk(q, qn, c_ref, logn_ref, rad_ref, start, cfg, n_clusters, block_c)
        out = _aggregate_rows(logits - lse[:, None], row_ok, cfg.agg, cfg.n_rows)
        plgpu.store(out_ref.at[pl.ds(start, block_c)], jnp.where(logn > _NEG_INF, out, _NEG_INF), mask=col_ok)
        return carry

    def idle(i, carry):
        sl = pl.ds((first + i) * block_c, block_c)
        col_ok = (first + i) * block_c + jnp.arange(block_c) < n_clusters
        plgpu.store(out_ref.at[sl], _idle_scores(plgpu.load(logn_ref.at[sl], mask=col_ok, other=_NEG_INF)),
                    mask=col_ok)
        return carry

    lax.fori_loop(0, jnp.where(active, n, 0), body, 0)
    lax.fori_loop(0, jnp.where(active, 0, n), idle, 0)


def _idle_scores(logn):
    """Scores of an inactive (row, head): 0 for every non-empty cluster, -inf for empty ones (one uninformative
    tie, so a selection that keeps every block takes the same blocks as from real scores)."""
    return jnp.where(logn > _NEG_INF, 0.0, _NEG_INF)


def _flat_finish_kernel(act_ref, logits_ref, logn_ref, m_ref, l_ref, out_ref, *, cfg, n_clusters, block_c):
    """Aggregated scores of one chunk from stored logits (normaliser merged from partials); an inactive
    (row, head), whose logits were never written, gets `_idle_scores`."""
    Rp = m_ref.shape[1]
    active = act_ref[...] != 0
    lse = lse_from_partials(m_ref, l_ref)
    row_ok = jnp.arange(Rp) < cfg.n_rows
    start = pl.program_id(2) * block_c
    col_ok = start + jnp.arange(block_c) < n_clusters
    sl = pl.ds(start, block_c)
    logits = plgpu.load(logits_ref.at[:, sl], mask=row_ok[:, None] & col_ok[None, :] & active, other=0.0)
    logn = plgpu.load(logn_ref.at[sl], mask=col_ok, other=_NEG_INF)
    out = jnp.where(active, _aggregate_rows(logits - lse[:, None], row_ok, cfg.agg, cfg.n_rows), 0.0)
    plgpu.store(out_ref.at[sl], jnp.where(col_ok & (logn > _NEG_INF), out, _NEG_INF), mask=col_ok)


def _flat_in_specs(Rp: int, D: int, C: int):
    return [
        pl.BlockSpec((None, None), lambda b, h, p: (b, h)),  # active (row, head)
        pl.BlockSpec((None, None, Rp, D), lambda b, h, p: (b, h, 0, 0)),  # q
        pl.BlockSpec((None, None, Rp), lambda b, h, p: (b, h, 0)),  # ||q||
        pl.BlockSpec((None, C, D), lambda b, h, p: (h, 0, 0)),  # centroids of head h
        pl.BlockSpec((None, C), lambda b, h, p: (h, 0)),  # log sizes
        pl.BlockSpec((None, C), lambda b, h, p: (h, 0)),  # radius
    ]


def _flat_partials(active_BH, q_BHRpD, qn_BHRp, centroids_HCD, log_sizes_HC, radius_HC, cfg: _ScoreCfg, *,
                   block_c: int, cpp: int, want_logits: bool, interpret: bool):
    """Phase 1: per-program partial LSE per row ([B, H, nP, Rp] max and sum); optionally logits [B,H,R,C]."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    nP = pl.cdiv(pl.cdiv(C, block_c), cpp)
    part_spec = pl.BlockSpec((None, None, None, Rp), lambda b, h, p: (b, h, p, 0))
    out_specs = [part_spec, part_spec]
    out_shape = [jax.ShapeDtypeStruct((B, H, nP, Rp), jnp.float32)] * 2
    if want_logits:
        out_specs.append(pl.BlockSpec((None, None, Rp, C), lambda b, h, p: (b, h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, H, cfg.n_rows, C), jnp.float32))
    kernel = functools.partial(_flat_lse_kernel, cfg=cfg, n_clusters=C, block_c=block_c, cpp=cpp)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nP),
        in_specs=_flat_in_specs(Rp, D, C),
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(_num_warps(Rp, block_c), 2),
        interpret=interpret,
        name="lookup_flat_lse",
    )(active_BH, q_BHRpD, qn_BHRp, centroids_HCD, log_sizes_HC, radius_HC)


def _flat_recompute(active_BH, q_BHRpD, qn_BHRp, centroids_HCD, log_sizes_HC, radius_HC, m_BHPR, l_BHPR,
                    cfg: _ScoreCfg, *, block_c: int, cpp: int, interpret: bool) -> jax.Array:
    """Phase 2 (recompute): aggregated scores [B, H, C] from the phase-1 partials."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    nP = m_BHPR.shape[2]
    part_spec = pl.BlockSpec((None, None, nP, Rp), lambda b, h, p: (b, h, 0, 0))
    kernel = functools.partial(_flat_score_kernel, cfg=cfg, n_clusters=C, block_c=block_c, cpp=cpp)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nP),
        in_specs=_flat_in_specs(Rp, D, C) + [part_spec, part_spec],
        out_specs=pl.BlockSpec((None, None, C), lambda b, h, p: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, C), jnp.float32),
        compiler_params=compiler_params(_num_warps(Rp, block_c), 2),
        interpret=interpret,
        name="lookup_flat_scores",
    )(active_BH, q_BHRpD, qn_BHRp, centroids_HCD, log_sizes_HC, radius_HC, m_BHPR, l_BHPR)


def _flat_finish(active_BH, logits_BHRC, log_sizes_HC, m_BHPR, l_BHPR, cfg: _ScoreCfg, *,
                 interpret: bool) -> jax.Array:
    """Phase 2 (logits): aggregated scores [B, H, C] from stored logits and the phase-1 partials."""
    B, H, R, C = logits_BHRC.shape
    nP, Rp = m_BHPR.shape[2:]
    block_c = 128
    part_spec = pl.BlockSpec((None, None, nP, Rp), lambda b, h, j: (b, h, 0, 0))
    kernel = functools.partial(_flat_finish_kernel, cfg=cfg, n_clusters=C, block_c=block_c)
    return pl.pallas_call(
        kernel,
        grid=(B, H, pl.cdiv(C, block_c)),
        in_specs=[pl.BlockSpec((None, None), lambda b, h, j: (b, h)),
                  pl.BlockSpec((None, None, Rp, C), lambda b, h, j: (b, h, 0, 0)),
                  pl.BlockSpec((None, C), lambda b, h, j: (h, 0)), part_spec, part_spec],
        out_specs=pl.BlockSpec((None, None, C), lambda b, h, j: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, C), jnp.float32),
        compiler_params=compiler_params(4, 1),
        interpret=interpret,
        name="lookup_flat_finish",
    )(active_BH, logits_BHRC, log_sizes_HC, m_BHPR, l_BHPR)


# --------------------------------------------------------------------------------------------------------
# jnp glue shared by the paths
# --------------------------------------------------------------------------------------------------------


def _merge_partials(m_BHnR: jax.Array, l_BHnR: jax.Array) -> jax.Array:
    """Merges per-chunk (max, sum) partials along axis 2 into a log-sum-exp [B, H, R]; -inf if empty."""
    M = jnp.max(m_BHnR, axis=2)
    M_safe = jnp.where(M > _NEG_INF, M, 0.0)
    L = jnp.sum(l_BHnR * jnp.exp(m_BHnR - M_safe[:, :, None, :]), axis=2)
    return M_safe + jnp.log(L)


def _aggregate_logits(logits_BHRX: jax.Array, lse_BHR: jax.Array, ok_BHX: jax.Array, agg: str) -> jax.Array:
    """Scores from stored logits: s = logit - lse per row, aggregated over rows; -inf where not ok."""
    s = logits_BHRX - lse_BHR[..., None]
    if agg == "max":
        out = jnp.max(s, axis=2)
    else:
        out = jax.nn.logsumexp(s, axis=2) - math.log(logits_BHRX.shape[2])
    return jnp.where(ok_BHX, out, _NEG_INF)


def _make_cfg(q_BHRD, score, radius_weight, agg, scale, dot_dtype) -> _ScoreCfg:
    sc = default_scale(q_BHRD.shape[-1], scale)
    return _ScoreCfg(scale=sc, radius_coef=sc * float(radius_weight), use_radius=score == "radius",
                     agg=agg, n_rows=q_BHRD.shape[2], dot_dtype=dot_dtype)


def _resolve_block_c(block_c: int | None, n_rows: int) -> int:
    block_c = _default_block_c(padded_rows(n_rows)) if block_c is None else block_c
    if not isinstance(block_c, int) or not is_pow2(block_c) or block_c < 16:
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c!r}")
    return block_c


def _check_cpp(cpp: int | None) -> None:
    if cpp is not None and (not isinstance(cpp, int) or cpp < 1):
        raise ValueError(f"chunks_per_program must be a positive int, got {cpp!r}")


def _flat_phase1(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg: _ScoreCfg, *, block_c: int,
                 cpp: int | None, want_logits: bool, interpret: bool, active_BH: jax.Array | None = None):
    """The flat lookup's first launch on padded rows: (q_p, ||q_p||, chunks per program, active [B, H] int32,
    `_flat_partials` out)."""
    B, H = q_BHRD.shape[:2]
    C = centroids_HCD.shape[1]
    q_p = _prepare_q(q_BHRD)
    Rp = q_p.shape[2]
    qn = _q_norms(q_p) if cfg.use_radius else jnp.zeros((B, H, Rp), jnp.float32)
    if cpp is None:
        cpp = _default_chunks_per_program(pl.cdiv(C, block_c), Rp)
    active = row_head_mask_i32(active_BH, B, H)
    outs = _flat_partials(active, q_p, qn, centroids_HCD, log_sizes_HC, radius_HC, cfg, block_c=block_c, cpp=cpp,
                          want_logits=want_logits, interpret=interpret)
    return q_p, qn, cpp, active, outs


def _flat_scores_and_lse(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg: _ScoreCfg, *, block_c: int,
                         method: str, cpp: int | None, interpret: bool,
                         active_BH: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Flat lookup: (scores [B, H, C], per-row log-normaliser [B, H, R]); two kernel launches.

    The normaliser is merged from the phase-1 partials inside the phase-2 kernel; the jnp merge returned
    here is dead code (and dropped by XLA) unless the caller uses it.
    """
    _, _, R, D = q_BHRD.shape
    method = _resolve_method(method, R, D, centroids_HCD.dtype)
    q_p, qn, cpp, active, outs = _flat_phase1(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg, block_c=block_c,
                                              cpp=cpp, want_logits=method == "logits", interpret=interpret,
                                              active_BH=active_BH)
    if method == "logits":
        scores = _flat_finish(active, outs[2], log_sizes_HC, outs[0], outs[1], cfg, interpret=interpret)
    else:
        scores = _flat_recompute(active, q_p, qn, centroids_HCD, log_sizes_HC, radius_HC, outs[0], outs[1], cfg,
                                 block_c=block_c, cpp=cpp, interpret=interpret)
    return scores, _merge_partials(outs[0], outs[1])[:, :, :R]


# --------------------------------------------------------------------------------------------------------
# Public: flat lookup
# --------------------------------------------------------------------------------------------------------


_FLAT_STATIC = ("score", "radius_weight", "agg", "scale", "block_c", "interpret", "method", "dot_dtype",
                "chunks_per_program")


@functools.partial(jax.jit, static_argnames=_FLAT_STATIC)
def centroid_scores(
    q_BHRD: jax.Array,
    centroids_HCD: jax.Array,
    log_sizes_HC: jax.Array,
    radius_HC: jax.Array,
    *,
    score: Score = "mean",
    radius_weight: float = 1.0,
    agg: Agg = "max",
    scale: float | None = None,
    block_c: int | None = None,
    interpret: bool | None = None,
    method: Method = "auto",
    dot_dtype: str | None = None,
    chunks_per_program: int | None = None,
    active_BH: jax.Array | None = None,
) -> jax.Array:
    """Aggregated log-probability estimate of every fine cluster, [B, H, C] float32.

    `q_BHRD`: R query rows sharing one selection per (batch, KV head); `log_sizes_HC` = log N_j (-inf for an
    empty cluster, which then scores -inf); `radius_HC` is read only for score="radius". Tuning knobs (all
    static): `block_c` (power of two >= 16) centroids per loop step, `chunks_per_program` steps per program,
    `method` the phase-2 strategy (module doc), `dot_dtype` the dot operands: None = the query dtype (bf16
    queries put f32 centroids on the bf16 tensor cores: ~3x faster prefill on the H100, log-probabilities
    within ~1e-2; an f32 query runs tf32 on the GPU), "float32" = full f32 precision (slow on the GPU).
    `active_BH` (optional, bool or int [B, H]): a (row, head) where it is 0 reads no centroid and scores every
    non-empty cluster 0 (empty ones -inf): for selections that keep every block whatever the scores.
    """
    _check_options(score, agg, method, radius_weight, dot_dtype)
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    check_row_head_mask(active_BH, *q_BHRD.shape[:2])
    _check_cpp(chunks_per_program)
    block_c = _resolve_block_c(block_c, q_BHRD.shape[2])
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale, dot_dtype)
    scores, _ = _flat_scores_and_lse(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg, block_c=block_c,
                                     method=method, cpp=chunks_per_program,
                                     interpret=resolve_interpret(interpret), active_BH=active_BH)
    return scores


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClusterLogits:
    """Phase 1 of the flat lookup, for a consumer that finishes the scores itself (the fused selection).

    `logits_BHRC`: scaled (radius-boosted) logits of the R real rows, f32. `m_BHPR, l_BHPR`: per-program
    partial (max, sum exp) of logit + log N over the clusters, rows padded to a power of two; merged they give
    each row's log-normaliser, and score_j = agg_r(logit_rj - lse_r) (`scores_from_logits`).
    """

    logits_BHRC: jax.Array
    m_BHPR: jax.Array
    l_BHPR: jax.Array

    @property
    def n_rows(self) -> int:
        return self.logits_BHRC.shape[2]


@functools.partial(jax.jit, static_argnames=("score", "radius_weight", "scale", "block_c", "interpret",
                                             "dot_dtype", "chunks_per_program"))
def centroid_logits(
    q_BHRD: jax.Array,
    centroids_HCD: jax.Array,
    log_sizes_HC: jax.Array,
    radius_HC: jax.Array,
    *,
    score: Score = "mean",
    radius_weight: float = 1.0,
    scale: float | None = None,
    block_c: int | None = None,
    interpret: bool | None = None,
    dot_dtype: str | None = None,
    chunks_per_program: int | None = None,
) -> ClusterLogits:
    """The flat lookup's first launch alone: logits and partial normalisers (`ClusterLogits`), one kernel.

    For few rows (decode) the second launch, which only turns these into scores, can be folded into the
    consumer (`block_select.select_blocks_from_logits`). Same arguments as `centroid_scores` (no `agg`).
    """
    _check_options(score, "max", "logits", radius_weight, dot_dtype)
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    _check_cpp(chunks_per_program)
    block_c = _resolve_block_c(block_c, q_BHRD.shape[2])
    cfg = _make_cfg(q_BHRD, score, radius_weight, "max", scale, dot_dtype)
    *_, (m, l_sum, logits) = _flat_phase1(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg, block_c=block_c,
                                          cpp=chunks_per_program, want_logits=True,
                                          interpret=resolve_interpret(interpret))
    return ClusterLogits(logits, m, l_sum)


@functools.partial(jax.jit, static_argnames=("score", "radius_weight", "scale", "block_c", "interpret",
                                             "dot_dtype", "chunks_per_program"))
def centroid_logits_ref(
    q_BHRD: jax.Array,
    centroids_HCD: jax.Array,
    log_sizes_HC: jax.Array,
    radius_HC: jax.Array,
    *,
    score: Score = "mean",
    radius_weight: float = 1.0,
    scale: float | None = None,
    block_c: int | None = None,
    interpret: bool | None = None,
    dot_dtype: str | None = None,
    chunks_per_program: int | None = None,
) -> ClusterLogits:
    """Pure-jnp reference of `centroid_logits` in f32: one partial (P = 1) over all clusters, rows unpadded."""
    del block_c, interpret, chunks_per_program
    _check_options(score, "max", "logits", radius_weight, dot_dtype)
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    cfg = _make_cfg(q_BHRD, score, radius_weight, "max", scale, None)
    logits = _ref_logits(q_BHRD, centroids_HCD, radius_HC, cfg)
    w = logits + log_sizes_HC.astype(jnp.float32)[None, :, None, :]
    m = jnp.max(w, axis=-1)
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    l_sum = jnp.sum(jnp.exp(w - m_safe[..., None]), axis=-1)
    return ClusterLogits(logits, m[:, :, None], l_sum[:, :, None])


def scores_from_logits(cl: ClusterLogits, log_sizes_HC: jax.Array, agg: Agg = "max") -> jax.Array:
    """Aggregated cluster scores [B, H, C] from `ClusterLogits` (what the second lookup launch computes)."""
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    R = cl.n_rows
    lse_BHR = _merge_partials(cl.m_BHPR, cl.l_BHPR)[:, :, :R]
    ok_BHC = jnp.broadcast_to(log_sizes_HC[None] > _NEG_INF, (cl.logits_BHRC.shape[0],) + log_sizes_HC.shape)
    return _aggregate_logits(cl.logits_BHRC, lse_BHR, ok_BHC, agg)


def _ref_logits(q_BHRD, centroids_HCD, radius_HC, cfg: _ScoreCfg) -> jax.Array:
    """Reference logits [B, H, R, C] in f32 (HIGHEST precision)."""
    q = q_BHRD.astype(jnp.float32)
    logits = jnp.einsum("bhrd,hcd->bhrc", q, centroids_HCD.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * cfg.scale
    if cfg.use_radius:
        qnorm = jnp.sqrt(jnp.sum(q * q, axis=-1))
        logits = logits + cfg.radius_coef * qnorm[..., None] * radius_HC.astype(jnp.float32)[None, :, None, :]
    return logits


@functools.partial(jax.jit, static_argnames=_FLAT_STATIC)
def centroid_scores_ref(
    q_BHRD: jax.Array,
    centroids_HCD: jax.Array,
    log_sizes_HC: jax.Array,
    radius_HC: jax.Array,
    *,
    score: Score = "mean",
    radius_weight: float = 1.0,
    agg: Agg = "max",
    scale: float | None = None,
    block_c: int | None = None,
    interpret: bool | None = None,
    method: Method = "auto",
    dot_dtype: str | None = None,
    chunks_per_program: int | None = None,
    active_BH: jax.Array | None = None,
) -> jax.Array:
    """Pure-jnp reference of `centroid_scores` in f32 (the tuning knobs are accepted and ignored)."""
    del block_c, interpret, chunks_per_program
    _check_options(score, agg, method, radius_weight, dot_dtype)
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    check_row_head_mask(active_BH, *q_BHRD.shape[:2])
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale, None)
    logits = _ref_logits(q_BHRD, centroids_HCD, radius_HC, cfg)
    logn = log_sizes_HC.astype(jnp.float32)[None, :, None, :]
    lse = jax.nn.logsumexp(logits + logn, axis=-1)
    ok = jnp.broadcast_to(log_sizes_HC > _NEG_INF, (q_BHRD.shape[0],) + log_sizes_HC.shape)
    scores = _aggregate_logits(logits, lse, ok, agg)
    if active_BH is None:
        return scores
    return jnp.where(active_BH[..., None] != 0, scores, _idle_scores(log_sizes_HC[None]))


# --------------------------------------------------------------------------------------------------------
# Hierarchical lookup: gather kernels over the fine runs of the kept coarse clusters, grid (B, H, groups)
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GatherCfg:
    """Static layout of the gather kernels: a group = `kb` kept coarse clusters x `fp` fine slots each."""

    kb: int  # kept coarse clusters per group (power of two)
    fp: int  # fine slots per coarse cluster: next_pow2(max_fine_per_coarse)
    max_fine: int  # fine clusters past this under one coarse cluster are not reached
    kc: int  # coarse rows of the kept-coarse dot: max(16, kb)
    n_groups: int  # groups per (B, H)
    gpp: int  # groups walked by one program
    with_coarse: bool  # also compute the kept coarse clusters' partial LSE

    @property
    def tile(self) -> int:
        return self.kb * self.fp


def _group_range(gcfg: _GatherCfg):
    first = pl.program_id(2) * gcfg.gpp
    return first, jnp.minimum(gcfg.gpp, gcfg.n_groups - first)


def _gather_fine(q, qn, g, first_ref, count_ref, c_ref, logn_ref, rad_ref, cfg: _ScoreCfg, gcfg: _GatherCfg):
    """Logits [Rp, tile] of group g's fine clusters (rows gathered in-bounds) and their log sizes (-inf
    for slots past a run's end)."""
    t = jnp.arange(gcfg.tile)
    slot = g * gcfg.kb + t // gcfg.fp
    f = t % gcfg.fp
    ok = f < jnp.minimum(count_ref[slot], gcfg.max_fine)
    rows = jnp.where(ok, first_ref[slot] + f, 0)
    c = c_ref[rows[:, None], jnp.arange(q.shape[1])[None, :]]
    rad = rad_ref[rows] if cfg.use_radius else None
    logn = jnp.where(ok, logn_ref[rows].astype(jnp.float32), _NEG_INF)
    return _tile_logits(q, c, qn, rad, cfg), logn


def _gather_lse_kernel(q_ref, qn_ref, first_ref, count_ref, c_ref, logn_ref, rad_ref, *refs, cfg, gcfg,
                       want_logits):
    """Per-row partial LSE of the reached fine clusters of this program's groups (and, with_coarse, of
    the kept coarse clusters); optionally writes the logits of real rows."""
    if gcfg.with_coarse:
        kid_ref, cc_ref, cln_ref, mf_ref, lf_ref, mc_ref, lc_ref, *logits_ref = refs
    else:
        mf_ref, lf_ref, *logits_ref = refs
    q = q_ref[...]
    qn = qn_ref[...] if cfg.use_radius else None
    row_ok = jnp.arange(q.shape[0]) < cfg.n_rows
    g0, n = _group_range(gcfg)
    empty = (jnp.full(q.shape[:1], _NEG_INF, jnp.float32), jnp.zeros(q.shape[:1], jnp.float32))

    def body(i, carry):
        g = g0 + i
        logits, logn = _gather_fine(q, qn, g, first_ref, count_ref, c_ref, logn_ref, rad_ref, cfg, gcfg)
        if want_logits:
            plgpu.store(logits_ref[0].at[:, pl.ds(g * gcfg.tile, gcfg.tile)], logits, mask=row_ok[:, None])
        fine = _merge_two(*carry[:2], *_partial_lse(logits + logn[None, :]))
        if not gcfg.with_coarse:
            return fine
        kid = kid_ref[g * gcfg.kc + jnp.arange(gcfg.kc)]
        kok = kid >= 0
        kid = jnp.where(kok, kid, 0)
        cc = cc_ref[kid[:, None], jnp.arange(q.shape[1])[None, :]]
        lc = _scaled_dot(q, cc, cfg)
        cln = jnp.where(kok, cln_ref[kid].astype(jnp.float32), _NEG_INF)
        return fine + _merge_two(*carry[2:], *_partial_lse(lc + cln[None, :]))

    parts = lax.fori_loop(0, n, body, empty * (2 if gcfg.with_coarse else 1))
    mf_ref[...] = parts[0]
    lf_ref[...] = parts[1]
    if gcfg.with_coarse:
        mc_ref[...] = parts[2]
        lc_ref[...] = parts[3]


def _gather_score_kernel(q_ref, qn_ref, first_ref, count_ref, c_ref, logn_ref, rad_ref, lse_ref, out_ref, *,
                         cfg, gcfg):
    """Aggregated scores of the gathered fine clusters of this program's groups (compact layout)."""
    q = q_ref[...]
    qn = qn_ref[...] if cfg.use_radius else None
    lse = lse_ref[...]
    row_ok = jnp.arange(q.shape[0]) < cfg.n_rows
    g0, n = _group_range(gcfg)

    def body(i, carry):
        g = g0 + i
        logits, logn = _gather_fine(q, qn, g, first_ref, count_ref, c_ref, logn_ref, rad_ref, cfg, gcfg)
        out = _aggregate_rows(logits - lse[:, None], row_ok, cfg.agg, cfg.n_rows)
        out_ref[pl.ds(g * gcfg.tile, gcfg.tile)] = jnp.where(logn > _NEG_INF, out, _NEG_INF)
        return carry

    lax.fori_loop(0, n, body, 0)


def _gather_in_specs(Rp, D, C, Kp):
    return [
        pl.BlockSpec((None, None, Rp, D), lambda b, h, p: (b, h, 0, 0)),  # q
        pl.BlockSpec((None, None, Rp), lambda b, h, p: (b, h, 0)),  # ||q||
        pl.BlockSpec((None, None, Kp), lambda b, h, p: (b, h, 0)),  # first fine cluster per kept slot
        pl.BlockSpec((None, None, Kp), lambda b, h, p: (b, h, 0)),  # run length per kept slot
        pl.BlockSpec((None, C, D), lambda b, h, p: (h, 0, 0)),  # fine centroids of head h
        pl.BlockSpec((None, C), lambda b, h, p: (h, 0)),  # log sizes
        pl.BlockSpec((None, C), lambda b, h, p: (h, 0)),  # radius
    ]


def _gather_partials(q_BHRpD, qn_BHRp, first_BHK, count_BHK, kid_BHX, centroids_HCD, log_sizes_HC, radius_HC,
                     coarse_HCcD, coarse_logn_HCc, cfg, gcfg: _GatherCfg, *, want_logits, interpret):
    """Gather phase 1: per-program partial LSE of the reached fine clusters [B, H, nP, Rp] (max, sum), then
    (with_coarse) of the kept coarse clusters, then (want_logits) the logits [B, H, R, n_groups * tile]."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    nP = pl.cdiv(gcfg.n_groups, gcfg.gpp)
    in_specs = _gather_in_specs(Rp, D, C, first_BHK.shape[2])
    args = [q_BHRpD, qn_BHRp, first_BHK, count_BHK, centroids_HCD, log_sizes_HC, radius_HC]
    n_parts = 2
    if gcfg.with_coarse:
        Cc = coarse_HCcD.shape[1]
        in_specs += [
            pl.BlockSpec((None, None, kid_BHX.shape[2]), lambda b, h, p: (b, h, 0)),
            pl.BlockSpec((None, Cc, D), lambda b, h, p: (h, 0, 0)),
            pl.BlockSpec((None, Cc), lambda b, h, p: (h, 0)),
        ]
        args += [kid_BHX, coarse_HCcD, coarse_logn_HCc]
        n_parts = 4
    part_spec = pl.BlockSpec((None, None, None, Rp), lambda b, h, p: (b, h, p, 0))
    out_specs = [part_spec] * n_parts
    out_shape = [jax.ShapeDtypeStruct((B, H, nP, Rp), jnp.float32)] * n_parts
    if want_logits:
        X = gcfg.n_groups * gcfg.tile
        out_specs.append(pl.BlockSpec((None, None, Rp, X), lambda b, h, p: (b, h, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, H, cfg.n_rows, X), jnp.float32))
    kernel = functools.partial(_gather_lse_kernel, cfg=cfg, gcfg=gcfg, want_logits=want_logits)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nP),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(_num_warps(Rp, gcfg.tile), 2),
        interpret=interpret,
        name="lookup_gather_lse",
    )(*args)


def _gather_recompute(q_BHRpD, qn_BHRp, first_BHK, count_BHK, centroids_HCD, log_sizes_HC, radius_HC,
                      lse_BHRp, cfg, gcfg: _GatherCfg, *, interpret) -> jax.Array:
    """Gather phase 2: compact aggregated scores [B, H, n_groups * tile]."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    X = gcfg.n_groups * gcfg.tile
    kernel = functools.partial(_gather_score_kernel, cfg=cfg, gcfg=gcfg)
    return pl.pallas_call(
        kernel,
        grid=(B, H, pl.cdiv(gcfg.n_groups, gcfg.gpp)),
        in_specs=_gather_in_specs(Rp, D, C, first_BHK.shape[2])
        + [pl.BlockSpec((None, None, Rp), lambda b, h, p: (b, h, 0))],
        out_specs=pl.BlockSpec((None, None, X), lambda b, h, p: (b, h, 0)),
        out_shape=jax.ShapeDtypeStruct((B, H, X), jnp.float32),
        compiler_params=compiler_params(_num_warps(Rp, gcfg.tile), 2),
        interpret=interpret,
        name="lookup_gather_scores",
    )(q_BHRpD, qn_BHRp, first_BHK, count_BHK, centroids_HCD, log_sizes_HC, radius_HC, lse_BHRp)


def _check_hier(q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, coarse_first_HCc, coarse_count_HCc,
                centroids_HCD, log_sizes_HC, radius_HC, coarse_keep, max_fine_per_coarse):
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    _check_level(q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, None, "coarse")
    H, Cc = coarse_log_sizes_HCc.shape
    for name, t in (("coarse_first_HCc", coarse_first_HCc), ("coarse_count_HCc", coarse_count_HCc)):
        if t.shape != (H, Cc):
            raise ValueError(f"{name} must be [H={H}, Cc={Cc}], got shape {t.shape}")
        _check_int(name, t)
    if not isinstance(coarse_keep, int) or not 1 <= coarse_keep <= Cc:
        raise ValueError(f"coarse_keep must be an int in [1, Cc={Cc}], got {coarse_keep!r}")
    if not isinstance(max_fine_per_coarse, int) or max_fine_per_coarse < 1:
        raise ValueError(f"max_fine_per_coarse must be a positive int, got {max_fine_per_coarse!r}")


def _kept_coarse(coarse_scores_BHCc: jax.Array, coarse_keep: int) -> jax.Array:
    """Ids [B, H, K] of the top `coarse_keep` coarse clusters, ascending (locality of the fine runs)."""
    Cc = coarse_scores_BHCc.shape[-1]
    if coarse_keep == Cc:
        return jnp.broadcast_to(jnp.arange(Cc, dtype=jnp.int32), coarse_scores_BHCc.shape)
    _, ids = lax.top_k(coarse_scores_BHCc, coarse_keep)
    return jnp.sort(ids.astype(jnp.int32), axis=-1)


def _unreached_lse(total_BHR: jax.Array, kept_BHR: jax.Array) -> jax.Array:
    """log(exp(total) - exp(kept)) clamped at -inf: the unreached coarse clusters' mass per row.

    The subtraction loses precision only when the kept mass nearly equals the total, and then the result is
    tiny next to the reached fine mass it is added to, so the normaliser keeps its relative accuracy.
    """
    diff = kept_BHR - jnp.where(total_BHR > _NEG_INF, total_BHR, 0.0)
    frac = -jnp.expm1(jnp.minimum(diff, 0.0))  # 1 - exp(kept - total), in [0, 1]
    return jnp.where((frac > 0) & (total_BHR > _NEG_INF), total_BHR + jnp.log(frac), _NEG_INF)


_HIER_STATIC = _FLAT_STATIC + ("coarse_keep", "max_fine_per_coarse", "coarse_per_group")


def _gather_layout(B: int, H: int, Rp: int, coarse_keep: int, max_fine: int, block_c: int, Cc: int,
                   kb: int | None, gpp: int | None) -> _GatherCfg:
    """Static tiling of the fine gather: ~block_c fine slots per group, dot width >= 16."""
    fp = next_pow2(max_fine)
    kb = max(1, block_c // fp) if kb is None else kb
    if not isinstance(kb, int) or not is_pow2(kb):
        raise ValueError(f"coarse_per_group must be a power of two, got {kb!r}")
    kb = max(min(kb, next_pow2(coarse_keep)), -(-16 // fp))  # the dot needs >= 16 columns
    n_groups = -(-coarse_keep // kb)
    if gpp is None:
        gpp = _default_chunks_per_program(n_groups, Rp)
    return _GatherCfg(kb=kb, fp=fp, max_fine=max_fine, kc=max(16, kb), n_groups=n_groups, gpp=gpp,
                      with_coarse=coarse_keep < Cc)


@functools.partial(jax.jit, static_argnames=_HIER_STATIC)
def hierarchical_scores(
    q_BHRD: jax.Array,
    coarse_centroids_HCcD: jax.Array,
    coarse_log_sizes_HCc: jax.Array,
    coarse_first_HCc: jax.Array,
    coarse_count_HCc: jax.Array,
    centroids_HCD: jax.Array,
    log_sizes_HC: jax.Array,
    radius_HC: jax.Array,
    *,
    coarse_keep: int,
    max_fine_per_coarse: int,
    score: Score = "mean",
    radius_weight: float = 1.0,
    agg: Agg = "max",
    scale: float | None = None,
    block_c: int | None = None,
    interpret: bool | None = None,
    method: Method = "auto",
    dot_dtype: str | None = None,
    chunks_per_program: int | None = None,
    coarse_per_group: int | None = None,
) -> jax.Array:
    """Two-level lookup: fine-cluster scores [B, H, C] float32, -inf for fine clusters not reached.

    Coarse clusters are scored with mean centroids (no coarse radius exists) and aggregated like the fine
    level; the top `coarse_keep` per (B, H) are kept and only their fine runs [first, first + count) are
    scored (at most `max_fine_per_coarse` fine clusters per coarse cluster are reached). The fine estimates
    are normalised by the reached fine mass plus the unreached coarse mass, so with every coarse cluster
    kept they equal `centroid_scores`. Tuning knobs as in `centroid_scores`; `coarse_per_group` (power of
    two) kept coarse clusters are gathered per loop step of the fine kernels.
    """
    _check_options(score, agg, method, radius_weight, dot_dtype)
    _check_hier(q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, coarse_first_HCc, coarse_count_HCc,
                centroids_HCD, log_sizes_HC, radius_HC, coarse_keep, max_fine_per_coarse)
    _check_cpp(chunks_per_program)
    interpret = resolve_interpret(interpret)
    B, H, R, D = q_BHRD.shape
    C = centroids_HCD.shape[1]
    Cc = coarse_centroids_HCcD.shape[1]
    block_c = _resolve_block_c(block_c, R)
    q_p = _prepare_q(q_BHRD)
    Rp = q_p.shape[2]
    gcfg = _gather_layout(B, H, Rp, coarse_keep, max_fine_per_coarse, block_c, Cc, coarse_per_group,
                          chunks_per_program)
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale, dot_dtype)

    # Coarse level: scores for the top-k, and the per-row total coarse mass for the normaliser.
    coarse_cfg = dataclasses.replace(cfg, use_radius=False)
    coarse_scores, coarse_lse = _flat_scores_and_lse(
        q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, jnp.zeros((H, Cc), jnp.float32), coarse_cfg,
        block_c=block_c, method=method, cpp=chunks_per_program, interpret=interpret)
    kept_BHK = _kept_coarse(coarse_scores, coarse_keep)

    # Fine runs of the kept coarse clusters, padded to whole groups (padded slots: count 0).
    Kp = gcfg.n_groups * gcfg.kb
    hidx = jnp.arange(H)[None, :, None]
    first = pad_axis(coarse_first_HCc.astype(jnp.int32)[hidx, kept_BHK], 2, Kp)
    count = pad_axis(coarse_count_HCc.astype(jnp.int32)[hidx, kept_BHK], 2, Kp)
    kid = jnp.pad(kept_BHK, ((0, 0), (0, 0), (0, Kp - coarse_keep)), constant_values=-1)
    kid = jnp.pad(kid.reshape(B, H, gcfg.n_groups, gcfg.kb), ((0, 0),) * 3 + ((0, gcfg.kc - gcfg.kb),),
                  constant_values=-1).reshape(B, H, gcfg.n_groups * gcfg.kc)

    qn = _q_norms(q_p) if cfg.use_radius else jnp.zeros((B, H, Rp), jnp.float32)
    method = _resolve_method(method, R, D, centroids_HCD.dtype)
    outs = _gather_partials(q_p, qn, first, count, kid, centroids_HCD, log_sizes_HC, radius_HC,
                            coarse_centroids_HCcD, coarse_log_sizes_HCc, cfg, gcfg,
                            want_logits=method == "logits", interpret=interpret)
    lse_BHR = _merge_partials(outs[0], outs[1])[:, :, :R]
    if gcfg.with_coarse:
        kept_lse = _merge_partials(outs[2], outs[3])[:, :, :R]
        lse_BHR = jnp.logaddexp(lse_BHR, _unreached_lse(coarse_lse, kept_lse))

    # Compact scores over the gathered slots, then scattered into [B, H, C].
    f = jnp.arange(Kp * gcfg.fp) % gcfg.fp
    slot_first = jnp.repeat(first, gcfg.fp, axis=-1)
    slot_ok = f < jnp.minimum(jnp.repeat(count, gcfg.fp, axis=-1), max_fine_per_coarse)
    fine_idx = jnp.where(slot_ok, slot_first + f, 0)
    if method == "logits":
        ok = slot_ok & (log_sizes_HC[hidx, fine_idx] > _NEG_INF)
        compact = _aggregate_logits(outs[-1], lse_BHR, ok, agg)
    else:
        compact = _gather_recompute(q_p, qn, first, count, centroids_HCD, log_sizes_HC, radius_HC,
                                    pad_axis(lse_BHR, 2, Rp), cfg, gcfg, interpret=interpret)
    dest = jnp.where(slot_ok, fine_idx, C)  # C = dropped
    out = jnp.full((B, H, C), _NEG_INF, jnp.float32)
    return out.at[jnp.arange(B)[:, None, None], hidx, dest].set(compact, mode="drop")


@functools.partial(jax.jit, static_argnames=_HIER_STATIC)
def hierarchical_scores_ref(
    q_BHRD: jax.Array,
    coarse_centroids_HCcD: jax.Array,
    coarse_log_sizes_HCc: jax.Array,
    coarse_first_HCc: jax.Array,
    coarse_count_HCc: jax.Array,
    centroids_HCD: jax.Array,
    log_sizes_HC: jax.Array,
    radius_HC: jax.Array,
    *,
    coarse_keep: int,
    max_fine_per_coarse: int,
    score: Score = "mean",
    radius_weight: float = 1.0,
    agg: Agg = "max",
    scale: float | None = None,
    block_c: int | None = None,
    interpret: bool | None = None,
    method: Method = "auto",
    dot_dtype: str | None = None,
    chunks_per_program: int | None = None,
    coarse_per_group: int | None = None,
) -> jax.Array:
    """Pure-jnp reference of `hierarchical_scores` in f32: scores every fine cluster, masks the unreached
    ones, and sums the unreached coarse mass directly (not by subtraction). Tuning knobs are ignored."""
    del block_c, interpret, chunks_per_program, coarse_per_group
    _check_options(score, agg, method, radius_weight, dot_dtype)
    _check_hier(q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, coarse_first_HCc, coarse_count_HCc,
                centroids_HCD, log_sizes_HC, radius_HC, coarse_keep, max_fine_per_coarse)
    B, H, R, _ = q_BHRD.shape
    C = centroids_HCD.shape[1]
    Cc = coarse_centroids_HCcD.shape[1]
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale, None)
    coarse_cfg = dataclasses.replace(cfg, use_radius=False)
    ok_c = jnp.broadcast_to(coarse_log_sizes_HCc > _NEG_INF, (B, H, Cc))
    lc = _ref_logits(q_BHRD, coarse_centroids_HCcD, None, coarse_cfg)
    wc = lc + coarse_log_sizes_HCc.astype(jnp.float32)[None, :, None, :]
    coarse_scores = _aggregate_logits(lc, jax.nn.logsumexp(wc, axis=-1), ok_c, agg)
    kept_BHK = _kept_coarse(coarse_scores, coarse_keep)
    kept_mask = jnp.zeros((B, H, Cc), bool).at[
        jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None], kept_BHK].set(True)
    # Reached fine clusters: j in [first, first + min(count, max_fine)) of a kept coarse cluster.
    # +1 at each kept run's first fine cluster, -1 one past its end; a positive running sum = reached.
    first = jnp.broadcast_to(coarse_first_HCc.astype(jnp.int32), (B, H, Cc))
    count = jnp.minimum(coarse_count_HCc.astype(jnp.int32), max_fine_per_coarse)
    bi, hi = jnp.arange(B)[:, None, None], jnp.arange(H)[None, :, None]
    step = jnp.where(kept_mask & (count > 0), 1, 0)
    delta = jnp.zeros((B, H, C + 1), jnp.int32).at[bi, hi, first].add(step)
    delta = delta.at[bi, hi, first + count].add(-step)
    reached = (jnp.cumsum(delta, axis=-1)[..., :C] > 0) & (log_sizes_HC > _NEG_INF)[None]
    lf = _ref_logits(q_BHRD, centroids_HCD, radius_HC, cfg)
    wf = jnp.where(reached[:, :, None, :], lf + log_sizes_HC.astype(jnp.float32)[None, :, None, :], _NEG_INF)
    wu = jnp.where(kept_mask[:, :, None, :], _NEG_INF, wc)
    lse = jax.nn.logsumexp(jnp.concatenate([wf, wu], axis=-1), axis=-1)
    return _aggregate_logits(lf, lse, reached, agg)
