"""Centroid lookup: per-cluster log-probability estimates for Squeezed Attention, flat and hierarchical.

For a query row q (post-RoPE, one query head) and fine cluster j of its KV head (centroid c_j = mean of the
raw member keys, size N_j, radius r_j = max distance of a member key to c_j):

    logit_j = scale * q.c_j  [+ scale * ||q|| * r_j * radius_weight   for score="radius"]
    s_j     = logit_j - logsumexp_i(logit_i + log N_i)                 (= log S_j of the paper)

computed stably (max-subtraction, never exp of a raw logit). The R rows that share one selection (decode: the
G query heads of a KV group; prefill: block_q user tokens x G heads) are aggregated per cluster with
agg="max" (max_r s_rj) or agg="mean" (log mean_r exp(s_rj)). Clusters of size 0 (log size -inf) score -inf.

Layout of the work (all inside one jit):
- The normaliser needs every cluster, so scoring runs in two phases over a grid (B, H, C-chunks): phase 1 (a
  Pallas kernel) computes each row's partial log-sum-exp (max, sum) per chunk; a jnp step merges the partials.
  Phase 2 either (method="logits") reuses logits that phase 1 wrote and aggregates them in jnp, or
  (method="recompute") runs a second kernel that recomputes the chunk's logits and writes the aggregated
  scores. Writing logits costs 2*R*4 bytes per centroid against re-reading D*itemsize bytes, so "auto" picks
  "logits" for few rows (decode) and "recompute" for many (prefill).
- The hierarchical lookup scores the coarse centroids with the same kernels, keeps the top `coarse_keep`
  coarse clusters per (B, H), and runs gather kernels over only the fine centroids under them (each coarse
  cluster is a contiguous run of fine clusters). The fine normaliser is the reached fine clusters' mass plus
  the unreached coarse clusters' mass, the latter computed as total coarse mass minus the kept coarse mass
  (the kept part comes from the gather kernel, which also reads the kept coarse centroids).

The dot runs in the promoted dtype of q and the centroids with f32 accumulation (bf16 x bf16 on the tensor
cores; f32 centroids make it an f32 dot, which Triton runs as tf32 on the GPU).
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
    compiler_params,
    default_scale,
    is_pow2,
    next_pow2,
    pad_axis,
    padded_rows,
    resolve_interpret,
)

Score = Literal["mean", "radius"]
Agg = Literal["max", "mean"]
Method = Literal["auto", "logits", "recompute"]

_NEG_INF = float("-inf")
_SCORES = ("mean", "radius")
_AGGS = ("max", "mean")
_METHODS = ("auto", "logits", "recompute")


@dataclasses.dataclass(frozen=True)
class _ScoreCfg:
    """Static scoring config shared by the kernels and the jnp glue."""

    scale: float
    radius_coef: float  # scale * radius_weight; only used when use_radius
    use_radius: bool
    agg: str
    n_rows: int  # real rows R (the tile holds padded_rows(R))


# --------------------------------------------------------------------------------------------------------
# Validation and static choices
# --------------------------------------------------------------------------------------------------------


def _check_options(score: str, agg: str, method: str, radius_weight: float) -> None:
    if score not in _SCORES:
        raise ValueError(f"score must be one of {_SCORES}, got {score!r}")
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}, got {agg!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not math.isfinite(float(radius_weight)):
        raise ValueError(f"radius_weight must be finite, got {radius_weight}")


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
    """Centroids per program: keeps the [rows_p, block_c] logit tile at <= 8K elements, 32..128."""
    return int(min(128, max(32, 8192 // rows_p)))


def _num_warps(rows_p: int, cols: int) -> int:
    return 8 if rows_p * cols >= 16384 else 4


def _prepare_q(q_BHRD: jax.Array) -> jax.Array:
    """Pads the row axis to a power of two >= 16 (the dot needs >= 16 rows); padded rows are masked."""
    return pad_axis(q_BHRD, 2, padded_rows(q_BHRD.shape[2]))


# --------------------------------------------------------------------------------------------------------
# In-kernel tile math (works on loaded arrays; shared by the flat and the gather kernels)
# --------------------------------------------------------------------------------------------------------


def _tile_logits(q_RD: jax.Array, c_CD: jax.Array, rad_C: jax.Array | None, cfg: _ScoreCfg) -> jax.Array:
    """Scaled (and optionally radius-boosted) logits [R, C] in f32 for one tile."""
    dt = jnp.promote_types(q_RD.dtype, c_CD.dtype)
    logits = plgpu.dot(q_RD.astype(dt), c_CD.astype(dt), trans_b=True) * cfg.scale
    if cfg.use_radius:
        qf = q_RD.astype(jnp.float32)
        qnorm = jnp.sqrt(jnp.sum(qf * qf, axis=1))
        logits = logits + cfg.radius_coef * qnorm[:, None] * rad_C.astype(jnp.float32)[None, :]
    return logits


def _partial_lse(w_RC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row (max, sum exp(w - max)) of a tile; rows with every entry -inf give (-inf, 0)."""
    m = jnp.max(w_RC, axis=1)
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    return m, jnp.sum(jnp.exp(w_RC - m_safe[:, None]), axis=1)


def _aggregate_rows(s_RC: jax.Array, row_ok: jax.Array, agg: str, n_rows: int) -> jax.Array:
    """Aggregates per-row log-probabilities over the (valid) rows: max, or log of the mean probability."""
    s = jnp.where(row_ok[:, None], s_RC, _NEG_INF)
    m = jnp.max(s, axis=0)
    if agg == "max":
        return m
    m_safe = jnp.where(m > _NEG_INF, m, 0.0)
    return m_safe + jnp.log(jnp.sum(jnp.exp(s - m_safe[None, :]), axis=0)) - math.log(n_rows)


# --------------------------------------------------------------------------------------------------------
# Flat kernels: grid (B, H, C-chunks)
# --------------------------------------------------------------------------------------------------------


def _flat_lse_kernel(q_ref, c_ref, logn_ref, rad_ref, m_ref, l_ref, *logits_ref, cfg, n_clusters, block_c):
    """Partial LSE per row over one chunk of centroids; optionally the chunk's logits."""
    j = pl.program_id(2)
    col_ok = j * block_c + jnp.arange(block_c) < n_clusters
    rad = rad_ref[...] if cfg.use_radius else None
    logits = _tile_logits(q_ref[...], c_ref[...], rad, cfg)
    w = jnp.where(col_ok[None, :], logits + logn_ref[...].astype(jnp.float32)[None, :], _NEG_INF)
    m, s = _partial_lse(w)
    m_ref[...] = m
    l_ref[...] = s
    if logits_ref:
        logits_ref[0][...] = logits


def _flat_score_kernel(q_ref, c_ref, logn_ref, rad_ref, lse_ref, out_ref, *, cfg, n_clusters, block_c):
    j = pl.program_id(2)
    logn = logn_ref[...].astype(jnp.float32)
    col_ok = (j * block_c + jnp.arange(block_c) < n_clusters) & (logn > _NEG_INF)
    q = q_ref[...]
    rad = rad_ref[...] if cfg.use_radius else None
    logits = _tile_logits(q, c_ref[...], rad, cfg)
    row_ok = jnp.arange(q.shape[0]) < cfg.n_rows
    out = _aggregate_rows(logits - lse_ref[...][:, None], row_ok, cfg.agg, cfg.n_rows)
    out_ref[...] = jnp.where(col_ok, out, _NEG_INF)


def _flat_specs(Rp: int, D: int, block_c: int):
    q_spec = pl.BlockSpec((None, None, Rp, D), lambda b, h, j: (b, h, 0, 0))
    c_spec = pl.BlockSpec((None, block_c, D), lambda b, h, j: (h, j, 0))
    t_spec = pl.BlockSpec((None, block_c), lambda b, h, j: (h, j))
    return q_spec, c_spec, t_spec


def _flat_partials(q_BHRpD, centroids_HCD, log_sizes_HC, radius_HC, cfg: _ScoreCfg, *, block_c: int,
                   want_logits: bool, interpret: bool):
    """Phase 1: per-chunk partial LSE per row ([B, H, nC, Rp] max and sum); optionally logits [B,H,R,C]."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    nC = pl.cdiv(C, block_c)
    q_spec, c_spec, t_spec = _flat_specs(Rp, D, block_c)
    part_spec = pl.BlockSpec((None, None, None, Rp), lambda b, h, j: (b, h, j, 0))
    out_specs = [part_spec, part_spec]
    out_shape = [jax.ShapeDtypeStruct((B, H, nC, Rp), jnp.float32)] * 2
    if want_logits:
        out_specs.append(pl.BlockSpec((None, None, Rp, block_c), lambda b, h, j: (b, h, 0, j)))
        out_shape.append(jax.ShapeDtypeStruct((B, H, cfg.n_rows, C), jnp.float32))
    kernel = functools.partial(_flat_lse_kernel, cfg=cfg, n_clusters=C, block_c=block_c)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nC),
        in_specs=[q_spec, c_spec, t_spec, t_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(_num_warps(Rp, block_c), 2),
        interpret=interpret,
        name="centroid_lse",
    )(q_BHRpD, centroids_HCD, log_sizes_HC, radius_HC)


def _flat_recompute(q_BHRpD, centroids_HCD, log_sizes_HC, radius_HC, lse_BHRp, cfg: _ScoreCfg, *,
                    block_c: int, interpret: bool) -> jax.Array:
    """Phase 2 (recompute): aggregated scores [B, H, C] given each row's log-normaliser."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    q_spec, c_spec, t_spec = _flat_specs(Rp, D, block_c)
    kernel = functools.partial(_flat_score_kernel, cfg=cfg, n_clusters=C, block_c=block_c)
    return pl.pallas_call(
        kernel,
        grid=(B, H, pl.cdiv(C, block_c)),
        in_specs=[q_spec, c_spec, t_spec, t_spec, pl.BlockSpec((None, None, Rp), lambda b, h, j: (b, h, 0))],
        out_specs=pl.BlockSpec((None, None, block_c), lambda b, h, j: (b, h, j)),
        out_shape=jax.ShapeDtypeStruct((B, H, C), jnp.float32),
        compiler_params=compiler_params(_num_warps(Rp, block_c), 2),
        interpret=interpret,
        name="centroid_scores",
    )(q_BHRpD, centroids_HCD, log_sizes_HC, radius_HC, lse_BHRp)


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


def _make_cfg(q_BHRD, score, radius_weight, agg, scale) -> _ScoreCfg:
    sc = default_scale(q_BHRD.shape[-1], scale)
    return _ScoreCfg(scale=sc, radius_coef=sc * float(radius_weight), use_radius=score == "radius",
                     agg=agg, n_rows=q_BHRD.shape[2])


def _flat_scores_and_lse(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg: _ScoreCfg, *, block_c: int,
                         method: str, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """Flat lookup: (scores [B, H, C], per-row log-normaliser [B, H, R])."""
    R = q_BHRD.shape[2]
    q_p = _prepare_q(q_BHRD)
    method = _resolve_method(method, R, q_BHRD.shape[3], centroids_HCD.dtype)
    outs = _flat_partials(q_p, centroids_HCD, log_sizes_HC, radius_HC, cfg, block_c=block_c,
                          want_logits=method == "logits", interpret=interpret)
    lse_BHRp = _merge_partials(outs[0], outs[1])
    if method == "logits":
        ok = jnp.broadcast_to(log_sizes_HC > _NEG_INF, (q_BHRD.shape[0],) + log_sizes_HC.shape)
        scores = _aggregate_logits(outs[2], lse_BHRp[:, :, :R], ok, cfg.agg)
    else:
        scores = _flat_recompute(q_p, centroids_HCD, log_sizes_HC, radius_HC, lse_BHRp, cfg,
                                 block_c=block_c, interpret=interpret)
    return scores, lse_BHRp[:, :, :R]


# --------------------------------------------------------------------------------------------------------
# Public: flat lookup
# --------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("score", "radius_weight", "agg", "scale", "block_c",
                                             "interpret", "method"))
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
) -> jax.Array:
    """Aggregated log-probability estimate of every fine cluster, [B, H, C] float32.

    `q_BHRD`: R query rows sharing one selection per (batch, KV head); `log_sizes_HC` = log N_j (-inf for an
    empty cluster, which then scores -inf); `radius_HC` is read only for score="radius". `block_c` (a power
    of two >= 16) is the number of centroids per program; `method` picks the phase-2 strategy (module doc).
    """
    _check_options(score, agg, method, radius_weight)
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    Rp = padded_rows(q_BHRD.shape[2])
    block_c = _default_block_c(Rp) if block_c is None else block_c
    if not is_pow2(block_c) or block_c < 16:
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c}")
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale)
    scores, _ = _flat_scores_and_lse(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, cfg, block_c=block_c,
                                     method=method, interpret=resolve_interpret(interpret))
    return scores


def _ref_logits(q_BHRD, centroids_HCD, radius_HC, cfg: _ScoreCfg) -> jax.Array:
    """Reference logits [B, H, R, C] in f32 (HIGHEST precision)."""
    q = q_BHRD.astype(jnp.float32)
    logits = jnp.einsum("bhrd,hcd->bhrc", q, centroids_HCD.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST) * cfg.scale
    if cfg.use_radius:
        qnorm = jnp.sqrt(jnp.sum(q * q, axis=-1))
        logits = logits + cfg.radius_coef * qnorm[..., None] * radius_HC.astype(jnp.float32)[None, :, None, :]
    return logits


@functools.partial(jax.jit, static_argnames=("score", "radius_weight", "agg", "scale", "block_c",
                                             "interpret", "method"))
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
) -> jax.Array:
    """Pure-jnp reference of `centroid_scores` (block_c, interpret and method are accepted and ignored)."""
    del block_c, interpret
    _check_options(score, agg, method, radius_weight)
    _check_level(q_BHRD, centroids_HCD, log_sizes_HC, radius_HC, "fine")
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale)
    logits = _ref_logits(q_BHRD, centroids_HCD, radius_HC, cfg)
    logn = log_sizes_HC.astype(jnp.float32)[None, :, None, :]
    lse = jax.nn.logsumexp(logits + logn, axis=-1)
    ok = jnp.broadcast_to(log_sizes_HC > _NEG_INF, (q_BHRD.shape[0],) + log_sizes_HC.shape)
    return _aggregate_logits(logits, lse, ok, agg)


# --------------------------------------------------------------------------------------------------------
# Hierarchical lookup: gather kernels over the fine runs of the kept coarse clusters, grid (B, H, groups)
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GatherCfg:
    """Static layout of a gather program: `kb` kept coarse clusters x `fp` fine slots each."""

    kb: int  # kept coarse clusters per program (power of two)
    fp: int  # fine slots per coarse cluster: next_pow2(max_fine_per_coarse)
    max_fine: int  # fine clusters past this under one coarse cluster are not reached
    kc: int  # coarse rows of the kept-coarse dot: max(16, kb)
    with_coarse: bool  # also compute the kept coarse clusters' partial LSE


def _gather_tile(first_ref, count_ref, gcfg: _GatherCfg):
    """Fine-cluster rows of this program's tile [kb*fp] (clamped in-bounds) and their validity."""
    t = jnp.arange(gcfg.kb * gcfg.fp)
    slot = t // gcfg.fp
    f = t % gcfg.fp
    first = first_ref[slot]
    count = jnp.minimum(count_ref[slot], gcfg.max_fine)
    ok = f < count
    return jnp.where(ok, first + f, 0), ok


def _gather_fine(q, rows, ok, c_ref, logn_ref, rad_ref, cfg: _ScoreCfg):
    """Logits [Rp, kb*fp] of the gathered fine clusters and their log sizes (-inf where not reached)."""
    D = q.shape[1]
    c = c_ref[rows[:, None], jnp.arange(D)[None, :]]
    rad = rad_ref[rows] if cfg.use_radius else None
    logits = _tile_logits(q, c, rad, cfg)
    logn = jnp.where(ok, logn_ref[rows].astype(jnp.float32), _NEG_INF)
    return logits, logn


def _gather_lse_kernel(q_ref, first_ref, count_ref, c_ref, logn_ref, rad_ref, *refs, cfg, gcfg, want_logits):
    """Partial LSE per row of the reached fine clusters (and, with_coarse, of the kept coarse clusters)."""
    if gcfg.with_coarse:
        kid_ref, cc_ref, cln_ref, mf_ref, lf_ref, mc_ref, lc_ref, *logits_ref = refs
    else:
        mf_ref, lf_ref, *logits_ref = refs
    q = q_ref[...]
    rows, ok = _gather_tile(first_ref, count_ref, gcfg)
    logits, logn = _gather_fine(q, rows, ok, c_ref, logn_ref, rad_ref, cfg)
    m, s = _partial_lse(logits + logn[None, :])
    mf_ref[...] = m
    lf_ref[...] = s
    if gcfg.with_coarse:
        kid = kid_ref[...]
        kok = kid >= 0
        kid = jnp.where(kok, kid, 0)
        cc = cc_ref[kid[:, None], jnp.arange(q.shape[1])[None, :]]
        dt = jnp.promote_types(q.dtype, cc.dtype)
        lc = plgpu.dot(q.astype(dt), cc.astype(dt), trans_b=True) * cfg.scale
        cln = jnp.where(kok, cln_ref[kid].astype(jnp.float32), _NEG_INF)
        m, s = _partial_lse(lc + cln[None, :])
        mc_ref[...] = m
        lc_ref[...] = s
    if want_logits:
        logits_ref[0][...] = logits


def _gather_score_kernel(q_ref, first_ref, count_ref, c_ref, logn_ref, rad_ref, lse_ref, out_ref, *,
                         cfg, gcfg):
    q = q_ref[...]
    rows, ok = _gather_tile(first_ref, count_ref, gcfg)
    logits, logn = _gather_fine(q, rows, ok, c_ref, logn_ref, rad_ref, cfg)
    row_ok = jnp.arange(q.shape[0]) < cfg.n_rows
    out = _aggregate_rows(logits - lse_ref[...][:, None], row_ok, cfg.agg, cfg.n_rows)
    out_ref[...] = jnp.where(logn > _NEG_INF, out, _NEG_INF)


def _gather_specs(Rp, D, C, kb):
    q_spec = pl.BlockSpec((None, None, Rp, D), lambda b, h, g: (b, h, 0, 0))
    run_spec = pl.BlockSpec((None, None, None, kb), lambda b, h, g: (b, h, g, 0))
    c_spec = pl.BlockSpec((None, C, D), lambda b, h, g: (h, 0, 0))
    t_spec = pl.BlockSpec((None, C), lambda b, h, g: (h, 0))
    return q_spec, run_spec, c_spec, t_spec


def _gather_partials(q_BHRpD, first_BHGk, count_BHGk, kid_BHGk, centroids_HCD, log_sizes_HC, radius_HC,
                     coarse_HCcD, coarse_logn_HCc, cfg, gcfg: _GatherCfg, *, want_logits, interpret):
    """Gather phase 1: per-program partial LSE of the reached fine clusters [B, H, nG, Rp] (max, sum), then
    (with_coarse) of the kept coarse clusters, then (want_logits) the logits [B, H, R, nG * kb * fp]."""
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    nG = first_BHGk.shape[2]
    tile = gcfg.kb * gcfg.fp
    q_spec, run_spec, c_spec, t_spec = _gather_specs(Rp, D, C, gcfg.kb)
    in_specs = [q_spec, run_spec, run_spec, c_spec, t_spec, t_spec]
    args = [q_BHRpD, first_BHGk, count_BHGk, centroids_HCD, log_sizes_HC, radius_HC]
    n_parts = 2
    if gcfg.with_coarse:
        Cc = coarse_HCcD.shape[1]
        in_specs += [
            pl.BlockSpec((None, None, None, gcfg.kc), lambda b, h, g: (b, h, g, 0)),
            pl.BlockSpec((None, Cc, D), lambda b, h, g: (h, 0, 0)),
            pl.BlockSpec((None, Cc), lambda b, h, g: (h, 0)),
        ]
        args += [kid_BHGk, coarse_HCcD, coarse_logn_HCc]
        n_parts = 4
    part_spec = pl.BlockSpec((None, None, None, Rp), lambda b, h, g: (b, h, g, 0))
    out_specs = [part_spec] * n_parts
    out_shape = [jax.ShapeDtypeStruct((B, H, nG, Rp), jnp.float32)] * n_parts
    if want_logits:
        out_specs.append(pl.BlockSpec((None, None, Rp, tile), lambda b, h, g: (b, h, 0, g)))
        out_shape.append(jax.ShapeDtypeStruct((B, H, cfg.n_rows, nG * tile), jnp.float32))
    kernel = functools.partial(_gather_lse_kernel, cfg=cfg, gcfg=gcfg, want_logits=want_logits)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nG),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(_num_warps(Rp, tile), 2),
        interpret=interpret,
        name="centroid_gather_lse",
    )(*args)


def _gather_recompute(q_BHRpD, first_BHGk, count_BHGk, centroids_HCD, log_sizes_HC, radius_HC, lse_BHRp,
                      cfg, gcfg: _GatherCfg, *, interpret) -> jax.Array:
    B, H, Rp, D = q_BHRpD.shape
    C = centroids_HCD.shape[1]
    nG = first_BHGk.shape[2]
    tile = gcfg.kb * gcfg.fp
    q_spec, run_spec, c_spec, t_spec = _gather_specs(Rp, D, C, gcfg.kb)
    kernel = functools.partial(_gather_score_kernel, cfg=cfg, gcfg=gcfg)
    return pl.pallas_call(
        kernel,
        grid=(B, H, nG),
        in_specs=[q_spec, run_spec, run_spec, c_spec, t_spec, t_spec,
                  pl.BlockSpec((None, None, Rp), lambda b, h, g: (b, h, 0))],
        out_specs=pl.BlockSpec((None, None, tile), lambda b, h, g: (b, h, g)),
        out_shape=jax.ShapeDtypeStruct((B, H, nG * tile), jnp.float32),
        compiler_params=compiler_params(_num_warps(Rp, tile), 2),
        interpret=interpret,
        name="centroid_gather_scores",
    )(q_BHRpD, first_BHGk, count_BHGk, centroids_HCD, log_sizes_HC, radius_HC, lse_BHRp)


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


@functools.partial(jax.jit, static_argnames=("coarse_keep", "max_fine_per_coarse", "score", "radius_weight",
                                             "agg", "scale", "block_c", "interpret", "method",
                                             "coarse_per_program"))
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
    coarse_per_program: int | None = None,
) -> jax.Array:
    """Two-level lookup: fine-cluster scores [B, H, C] float32, -inf for fine clusters not reached.

    Coarse clusters are scored with mean centroids (no coarse radius exists) and aggregated like the fine
    level; the top `coarse_keep` per (B, H) are kept and only their fine runs [first, first + count) are
    scored (at most `max_fine_per_coarse` fine clusters per coarse cluster are reached). The fine estimates
    are normalised by the reached fine mass plus the unreached coarse mass, so with every coarse cluster
    kept they equal `centroid_scores`. `coarse_per_program` (power of two) sets the gather tile width.
    """
    _check_options(score, agg, method, radius_weight)
    _check_hier(q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, coarse_first_HCc, coarse_count_HCc,
                centroids_HCD, log_sizes_HC, radius_HC, coarse_keep, max_fine_per_coarse)
    interpret = resolve_interpret(interpret)
    B, H, R, D = q_BHRD.shape
    C = centroids_HCD.shape[1]
    Cc = coarse_centroids_HCcD.shape[1]
    Rp = padded_rows(R)
    block_c = _default_block_c(Rp) if block_c is None else block_c
    if not is_pow2(block_c) or block_c < 16:
        raise ValueError(f"block_c must be a power of two >= 16, got {block_c}")
    fp = next_pow2(max_fine_per_coarse)
    kb = max(1, block_c // fp) if coarse_per_program is None else coarse_per_program
    if not is_pow2(kb):
        raise ValueError(f"coarse_per_program must be a power of two, got {kb}")
    kb = min(kb, next_pow2(coarse_keep))
    if kb * fp < 16:  # the dot needs >= 16 columns
        kb = 16 // fp
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale)
    coarse_cfg = dataclasses.replace(cfg, use_radius=False)
    dummy_rad = jnp.zeros((H, Cc), jnp.float32)

    # Coarse level: scores for the top-k, and the per-row total coarse mass for the normaliser.
    coarse_scores, coarse_lse = _flat_scores_and_lse(
        q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, dummy_rad, coarse_cfg, block_c=block_c,
        method=method, interpret=interpret)
    kept_BHK = _kept_coarse(coarse_scores, coarse_keep)

    # Fine runs of the kept coarse clusters, grouped kb per program.
    K = coarse_keep
    Kp = -(-K // kb) * kb
    nG = Kp // kb
    hidx = jnp.arange(H)[None, :, None]
    first = coarse_first_HCc.astype(jnp.int32)[hidx, kept_BHK]
    count = coarse_count_HCc.astype(jnp.int32)[hidx, kept_BHK]
    first = pad_axis(first, 2, Kp).reshape(B, H, nG, kb)
    count = pad_axis(count, 2, Kp).reshape(B, H, nG, kb)  # padded slots: count 0
    with_coarse = K < Cc
    gcfg = _GatherCfg(kb=kb, fp=fp, max_fine=max_fine_per_coarse, kc=max(16, kb), with_coarse=with_coarse)
    kid = jnp.pad(kept_BHK, ((0, 0), (0, 0), (0, Kp - K)), constant_values=-1).reshape(B, H, nG, kb)
    kid = jnp.pad(kid, ((0, 0), (0, 0), (0, 0), (0, gcfg.kc - kb)), constant_values=-1)

    q_p = _prepare_q(q_BHRD)
    method = _resolve_method(method, R, D, centroids_HCD.dtype)
    outs = _gather_partials(q_p, first, count, kid, centroids_HCD, log_sizes_HC, radius_HC,
                            coarse_centroids_HCcD, coarse_log_sizes_HCc, cfg, gcfg,
                            want_logits=method == "logits", interpret=interpret)
    reached_lse = _merge_partials(outs[0], outs[1])[:, :, :R]
    if with_coarse:
        kept_lse = _merge_partials(outs[2], outs[3])[:, :, :R]
        lse_BHR = jnp.logaddexp(reached_lse, _unreached_lse(coarse_lse, kept_lse))
    else:
        lse_BHR = reached_lse

    # Compact scores over the gathered slots, then scattered into [B, H, C].
    f = jnp.arange(Kp * fp) % fp
    slot_first = jnp.repeat(first.reshape(B, H, Kp), fp, axis=-1)
    slot_count = jnp.minimum(jnp.repeat(count.reshape(B, H, Kp), fp, axis=-1), max_fine_per_coarse)
    slot_ok = f < slot_count
    if method == "logits":
        logn_slot = log_sizes_HC[hidx, jnp.where(slot_ok, slot_first + f, 0)]
        compact = _aggregate_logits(outs[-1], lse_BHR, slot_ok & (logn_slot > _NEG_INF), agg)
    else:
        lse_p = pad_axis(lse_BHR, 2, Rp)
        compact = _gather_recompute(q_p, first, count, centroids_HCD, log_sizes_HC, radius_HC, lse_p, cfg,
                                    gcfg, interpret=interpret)
    dest = jnp.where(slot_ok, slot_first + f, C)  # C = dropped
    bidx = jnp.arange(B)[:, None, None]
    out = jnp.full((B, H, C), _NEG_INF, jnp.float32)
    return out.at[bidx, hidx, dest].set(compact, mode="drop")


@functools.partial(jax.jit, static_argnames=("coarse_keep", "max_fine_per_coarse", "score", "radius_weight",
                                             "agg", "scale", "block_c", "interpret", "method",
                                             "coarse_per_program"))
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
    coarse_per_program: int | None = None,
) -> jax.Array:
    """Pure-jnp reference of `hierarchical_scores`: scores every fine cluster, masks the unreached ones, and
    sums the unreached coarse mass directly (not by subtraction)."""
    del block_c, interpret, coarse_per_program
    _check_options(score, agg, method, radius_weight)
    _check_hier(q_BHRD, coarse_centroids_HCcD, coarse_log_sizes_HCc, coarse_first_HCc, coarse_count_HCc,
                centroids_HCD, log_sizes_HC, radius_HC, coarse_keep, max_fine_per_coarse)
    B, H, R, _ = q_BHRD.shape
    C = centroids_HCD.shape[1]
    Cc = coarse_centroids_HCcD.shape[1]
    cfg = _make_cfg(q_BHRD, score, radius_weight, agg, scale)
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
