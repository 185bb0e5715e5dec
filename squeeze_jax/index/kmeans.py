"""Batched Lloyd K-means over many (layer, KV head) pairs at once.

All `P` problems (P = layers x KV heads) run in one jit-compiled computation: the distance matmuls are batched
einsums over `P`, chunked over the `N` points so that an `[P, N, C]` distance matrix never exists at once, and
the Lloyd iterations run in a `lax.while_loop` that stops when the relative objective decrease of every
problem is below `tol`.

Metric "cosine" runs Euclidean Lloyd on L2-normalised points (spherical assignment), "l2" on the points
centred per problem (translation does not change distances, centring keeps the f32 distance arithmetic
accurate for keys with large norms). Whatever the metric, the returned centroids are the (weighted) means of
the RAW member points, so that `q . centroid_j` is the mean logit of cluster j.

Initialisation is a k-means++-lite: the first 32 seeds are greedy k-means++ (each step draws 2 + ln C
candidates with probability ~ weight x squared distance to the seeds so far and keeps the one that lowers the
objective most), the remaining seeds come in doubling batches (32, 64, 128, ...) drawn the same way without
replacement (Gumbel top-k), k-means|| style, so a large C costs ~log2(C / 32) rounds, not C. Plain random
sampling puts several seeds into dense regions and none into small, distant groups, so the result depends on
the seed; D^2 weighting with greedy trials places a seed in every well-separated group whatever the seed.
`init="systematic"` keeps that schedule and weighting but replaces each draw by systematic sampling: the
points in index (token) order, their D^2 masses laid end to end, and the seeds taken at evenly spaced
quantiles of the total. No PRNG is involved, so the clustering is a function of the keys alone.

Every cluster is non-empty after every iteration: points of empty clusters are re-seeded with the points
farthest from their centroid, taken only from clusters that keep at least one member (each cluster's closest
member is never taken). This never increases the objective and never yields NaN or zero centroids.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

METRICS = ("cosine", "l2")
INITS = ("sampled", "systematic")
ASSIGN_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
_NORM_EPS = 1e-12


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["centroids_PCD", "assign_PN", "sizes_PC", "objective_P", "n_iters", "history_PI"],
    meta_fields=[],
)
@dataclasses.dataclass
class KMeansResult:
    """Result of `kmeans`.

    centroids_PCD: f32 (weighted) mean of the raw member points of each cluster.
    assign_PN: int32 cluster of each point. sizes_PC: int32 member count (>= 1 for every cluster).
    objective_P: weighted sum of squared distances in the assignment space (normalised points for "cosine").
    n_iters: int32 scalar, Lloyd updates run (the largest over the batch and restarts).
    history_PI: objective after each assignment step; entries past the last step repeat the final value.
    """

    centroids_PCD: jax.Array
    assign_PN: jax.Array
    sizes_PC: jax.Array
    objective_P: jax.Array
    n_iters: jax.Array
    history_PI: jax.Array


def auto_chunk(n_problems: int, n_points: int, n_clusters: int, max_chunk_bytes: int = 1 << 30) -> int:
    """Largest power-of-two point chunk (>= 128) whose f32 distances `[P, chunk, C]` fit the budget."""
    per_point = max(1, n_problems * n_clusters * 4)
    chunk = max(128, 1 << int(math.floor(math.log2(max(1, max_chunk_bytes // per_point)))))
    return int(min(chunk, 1 << int(math.ceil(math.log2(max(n_points, 1))))))


# ----------------------------------------------------------------------------------------------------- pieces


def _to_assignment_space(x_PND: jax.Array, w_PN: jax.Array, metric: str) -> jax.Array:
    """f32 points in the space where Lloyd runs: L2-normalised ("cosine") or centred per problem ("l2")."""
    x = x_PND.astype(jnp.float32)
    if metric == "cosine":
        norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
        return x / jnp.maximum(norm, _NORM_EPS)
    wsum = jnp.maximum(jnp.sum(w_PN, axis=1), 1e-30)
    mean_PD = jnp.einsum("pn,pnd->pd", w_PN, x) / wsum[:, None]
    return x - mean_PD[:, None, :]


@dataclasses.dataclass(frozen=True)
class AssignPlan:
    """Static settings of the nearest-centroid pass.

    impl "xla": batched einsum over chunks of `chunk` points (the `[P, chunk, C]` distances live in memory).
    impl "pallas": one fused Pallas (Triton) kernel per (problem, block of `block_n` points) that walks the
    centroids in blocks of `block_c` keeping a running min / argmin in registers, so no distance matrix is
    written at all ("pallas_interpret" runs the same kernel on CPU for tests).
    """

    chunk: int
    mm_dtype: str = "float32"
    impl: str = "xla"
    block_n: int = 128
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.mm_dtype)

    @property
    def pad_multiple(self) -> int:
        return self.chunk if self.impl == "xla" else math.lcm(self.chunk, self.block_n)


def _nearest_pallas(xm_PND, c_PCD, csq_PC, plan: AssignPlan):
    """Fused distance + running argmin (Pallas Triton): returns (argmin, min of csq - 2 x.c) per point."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    P, N, D = xm_PND.shape
    C = c_PCD.shape[1]
    bn = plan.block_n
    bc = min(plan.block_c, max(16, 1 << (C - 1).bit_length()))
    c_pad = -(-C // bc) * bc
    c_mm = jnp.pad(c_PCD.astype(xm_PND.dtype), ((0, 0), (0, c_pad - C), (0, 0)))
    csq = jnp.pad(csq_PC, ((0, 0), (0, c_pad - C)), constant_values=jnp.inf)
    n_cblocks = c_pad // bc
    big = jnp.iinfo(jnp.int32).max

    def kernel(x_ref, c_ref, csq_ref, a_ref, d_ref):
        x = x_ref[...]

        def body(j, carry):
            best, arg = carry
            sl = pl.ds(pl.multiple_of(j * bc, bc), bc)
            s = plgpu.dot(x, c_ref[sl, :], trans_b=True).astype(jnp.float32)
            dist = csq_ref[sl][None, :] - 2.0 * s
            m = jnp.min(dist, axis=1)
            ids = j * bc + lax.broadcasted_iota(jnp.int32, (bn, bc), 1)
            am = jnp.min(jnp.where(dist == m[:, None], ids, big), axis=1)
            better = m < best
            return jnp.where(better, m, best), jnp.where(better, am, arg)

        init = (jnp.full((bn,), jnp.inf, jnp.float32), jnp.zeros((bn,), jnp.int32))
        best, arg = lax.fori_loop(0, n_cblocks, body, init)
        a_ref[...] = arg
        d_ref[...] = best

    return pl.pallas_call(
        kernel,
        grid=(P, -(-N // bn)),
        in_specs=[
            pl.BlockSpec((None, bn, D), lambda p, i: (p, i, 0)),
            pl.BlockSpec((None, c_pad, D), lambda p, i: (p, 0, 0)),
            pl.BlockSpec((None, c_pad), lambda p, i: (p, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bn), lambda p, i: (p, i)),
            pl.BlockSpec((None, bn), lambda p, i: (p, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((P, N), jnp.int32), jax.ShapeDtypeStruct((P, N), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.impl == "pallas_interpret",
    )(xm_PND, c_mm, csq)


def _assign(xm_PND, xsq_PN, c_PCD, c_mask_PC, plan: AssignPlan):
    """Nearest centroid and its squared distance for every point (`xm_PND` already in the matmul dtype)."""
    P, N, _ = xm_PND.shape
    c_PCD = c_PCD.astype(jnp.float32)
    csq_PC = jnp.sum(c_PCD * c_PCD, axis=-1)
    if c_mask_PC is not None:
        csq_PC = jnp.where(c_mask_PC, csq_PC, jnp.inf)
    if plan.impl != "xla":
        a_PN, m_PN = _nearest_pallas(xm_PND, c_PCD, csq_PC, plan)
        return a_PN, jnp.maximum(m_PN + xsq_PN, 0.0)
    chunk = plan.chunk
    c_mm = c_PCD.astype(plan.dtype)

    def body(i, carry):
        a_PN, d_PN = carry
        start = i * chunk
        xs = lax.dynamic_slice_in_dim(xm_PND, start, chunk, axis=1)
        dot_PnC = jnp.einsum("pnd,pcd->pnc", xs, c_mm, preferred_element_type=jnp.float32)
        dist_PnC = csq_PC[:, None, :] - 2.0 * dot_PnC
        a = jnp.argmin(dist_PnC, axis=-1).astype(jnp.int32)
        d = jnp.min(dist_PnC, axis=-1) + lax.dynamic_slice_in_dim(xsq_PN, start, chunk, axis=1)
        a_PN = lax.dynamic_update_slice_in_dim(a_PN, a, start, axis=1)
        d_PN = lax.dynamic_update_slice_in_dim(d_PN, jnp.maximum(d, 0.0), start, axis=1)
        return a_PN, d_PN

    init = (jnp.zeros((P, N), jnp.int32), jnp.zeros((P, N), jnp.float32))
    return lax.fori_loop(0, N // chunk, body, init)


def _segment_ids(a_PN: jax.Array, n_clusters: int) -> jax.Array:
    P = a_PN.shape[0]
    return (a_PN + n_clusters * jnp.arange(P, dtype=jnp.int32)[:, None]).reshape(-1)


def _counts(a_PN, valid_PN, n_clusters: int) -> jax.Array:
    P = a_PN.shape[0]
    seg = _segment_ids(a_PN, n_clusters)
    cnt = jax.ops.segment_sum(valid_PN.reshape(-1).astype(jnp.int32), seg, num_segments=P * n_clusters)
    return cnt.reshape(P, n_clusters)


def _weighted_means(x_PND, w_PN, a_PN, n_clusters: int, fallback_PCD):
    """Weighted mean of the member points per cluster; clusters of zero weight keep `fallback_PCD`."""
    P, _, D = x_PND.shape
    seg = _segment_ids(a_PN, n_clusters)
    wx = (x_PND.astype(jnp.float32) * w_PN[..., None]).reshape(-1, D)
    sums = jax.ops.segment_sum(wx, seg, num_segments=P * n_clusters).reshape(P, n_clusters, D)
    wsum = jax.ops.segment_sum(w_PN.reshape(-1), seg, num_segments=P * n_clusters).reshape(P, n_clusters)
    means = sums / jnp.maximum(wsum, 1e-30)[..., None]
    return jnp.where((wsum > 0)[..., None], means, fallback_PCD)


def _fill_empty(a_PN, d_PN, valid_PN, n_clusters: int):
    """Give every empty cluster one point: the farthest from their centroids, never a cluster's last one.

    Each cluster's closest valid member (lowest index on ties) is its keeper and is never moved, so a donor
    keeps >= 1 member. With at least C valid points there are always enough movable points.
    """
    P, N = a_PN.shape
    C = n_clusters
    sizes_PC = _counts(a_PN, valid_PN, C)
    empty_PC = sizes_PC == 0

    def fix(a_PN):
        seg = _segment_ids(a_PN, C)
        n_idx = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (P, N))
        d_valid = jnp.where(valid_PN, d_PN, jnp.inf).reshape(-1)
        dmin = jax.ops.segment_min(d_valid, seg, num_segments=P * C)
        is_min = valid_PN.reshape(-1) & (d_valid == dmin[seg])
        first = jax.ops.segment_min(jnp.where(is_min, n_idx.reshape(-1), N), seg, num_segments=P * C)
        keeper_PN = (n_idx.reshape(-1) == first[seg]).reshape(P, N)
        movable_PN = valid_PN & ~keeper_PN
        score_PN = jnp.where(movable_PN, d_PN, -1.0)
        order_PN = jnp.argsort(-score_PN, axis=1, stable=True).astype(jnp.int32)
        rank_PC = jnp.cumsum(empty_PC.astype(jnp.int32), axis=1) - 1
        pick_PC = jnp.take_along_axis(order_PN, jnp.clip(rank_PC, 0, N - 1), axis=1)
        target_PC = jnp.where(empty_PC, pick_PC, N)  # out of range -> dropped
        p_idx = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32)[:, None], (P, C))
        c_idx = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32)[None, :], (P, C))
        return a_PN.at[p_idx, target_PC].set(c_idx, mode="drop")

    return lax.cond(jnp.any(empty_PC), fix, lambda a: a, a_PN)


# ---------------------------------------------------------------------------------------------- jitted stages


N_GREEDY_SEEDS = 32


def init_schedule(n_clusters: int, n_greedy: int = N_GREEDY_SEEDS) -> list[int]:
    """Seeds per init round: `n_greedy` rounds of 1 (greedy k-means++), then doubling batches."""
    sizes = [1] * min(n_clusters, n_greedy)
    total = len(sizes)
    while total < n_clusters:
        m = min(total, n_clusters - total)
        sizes.append(m)
        total += m
    return sizes


def _gumbel_scores(key, logit_PN, valid_PN, chosen_PN, n_real: int):
    """Gumbel-perturbed log-weights; unchosen valid points always beat chosen or padded ones, so duplicate
    points still yield distinct indices. The noise is drawn for the `n_real` unpadded points only, so padding
    never changes the draw."""
    P, N = logit_PN.shape
    gumbel = jnp.pad(jax.random.gumbel(key, (P, n_real), jnp.float32), ((0, 0), (0, N - n_real)))
    score = jnp.where(valid_PN & ~chosen_PN, logit_PN + gumbel, -1e30)
    return jnp.where(chosen_PN | ~valid_PN, -jnp.inf, score)


def _systematic_pick(mass_PN, chosen_PN, m: int, n_real: int) -> jax.Array:
    """`m` distinct points per problem at the evenly spaced quantiles (j + 1/2) / m of the cumulative `mass`
    over the points in index order (systematic sampling: the D^2 draw of k-means++ without a PRNG).

    Chosen points carry no mass. A point whose mass spans several quantiles takes the first of them and the
    others move on to the next indices (`idx_j = j + cummax(raw_j - j)` keeps the picks strictly increasing);
    a pick moved onto an already chosen point duplicates a seed, which the empty-cluster fill of the Lloyd
    steps re-seeds. Returns int32 `[P, m]`.
    """
    mass = jnp.where(chosen_PN, 0.0, mass_PN)
    cum_PN = jnp.cumsum(mass, axis=1)
    t_PM = (jnp.arange(m, dtype=jnp.float32) + 0.5) / m * cum_PN[:, -1:]
    raw_PM = jax.vmap(lambda c, t: jnp.searchsorted(c, t, side="right"))(cum_PN, t_PM).astype(jnp.int32)
    j = jnp.arange(m, dtype=jnp.int32)
    return jnp.minimum(j + lax.cummax(raw_PM - j, axis=1), n_real - 1)


def _draw(key, logw_PN, d_PN, valid_PN, chosen_PN, m: int, n_real: int, init: str) -> jax.Array:
    """`m` new seed candidates per problem, drawn with probability ~ weight x squared distance to the seeds
    so far ("sampled": Gumbel top-k; "systematic": evenly spaced quantiles, no randomness). int32 `[P, m]`."""
    logit_PN = logw_PN + jnp.log(jnp.maximum(d_PN, 1e-30))
    if init == "systematic":
        mass_PN = jnp.where(valid_PN, jnp.exp(logit_PN - jnp.max(logit_PN, axis=1, keepdims=True)), 0.0)
        return _systematic_pick(mass_PN, chosen_PN, m, n_real)
    _, idx_PM = lax.top_k(_gumbel_scores(key, logit_PN, valid_PN, chosen_PN, n_real), m)
    return idx_PM.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n_clusters", "plan", "n_real", "init"))
def _init_centroids(xa_PND, xm_PND, xsq_PN, w_PN, key, *, n_clusters, plan, n_real, init="sampled"):
    """k-means++-lite (see module docstring): greedy k-means++ seeds, then D^2-weighted doubling batches.

    The squared distance to the chosen seeds is updated incrementally (each batch measures distances to its
    new seeds only), so the batches together cost about one full assignment pass.
    """
    P, N, D = xa_PND.shape
    C = n_clusters
    valid_PN = w_PN > 0
    sizes = init_schedule(C)
    n_greedy = min(C, N_GREEDY_SEEDS)
    trials = 2 + int(math.log(C))
    logw_PN = jnp.log(jnp.maximum(w_PN, 1e-30))
    rows = jnp.arange(P)[:, None]

    # seed 0: drawn with probability ~ weight
    no_PN = jnp.zeros((P, N), bool)
    ones_PN = jnp.ones((P, N), jnp.float32)
    idx0 = _draw(jax.random.fold_in(key, 0), logw_PN, ones_PN, valid_PN, no_PN, 1, n_real, init)[:, 0]
    c0_PD = xa_PND[jnp.arange(P), idx0]
    d_PN = jnp.maximum(jnp.sum((xa_PND - c0_PD[:, None, :]) ** 2, axis=-1), 0.0)
    chosen_PN = no_PN.at[jnp.arange(P), idx0].set(True)
    idx_PC = jnp.zeros((P, C), jnp.int32).at[:, 0].set(idx0)

    def greedy_step(s, carry):
        """Draw `trials` D^2-weighted candidates, keep the one that lowers the potential most."""
        idx_PC, d_PN, chosen_PN = carry
        cand_PT = _draw(jax.random.fold_in(key, s), logw_PN, d_PN, valid_PN, chosen_PN, trials, n_real, init)
        cand_PTD = jnp.take_along_axis(xa_PND, cand_PT[..., None], axis=1)
        dot_PTN = jnp.einsum(
            "ptd,pnd->ptn", cand_PTD.astype(xm_PND.dtype), xm_PND, preferred_element_type=jnp.float32
        )
        dist_PTN = jnp.maximum(xsq_PN[:, None, :] + jnp.sum(cand_PTD**2, -1)[..., None] - 2.0 * dot_PTN, 0.0)
        new_PTN = jnp.minimum(d_PN[:, None, :], dist_PTN)
        best_P = jnp.argmin(jnp.sum(new_PTN * w_PN[:, None, :], axis=-1), axis=1)
        pick_P = jnp.take_along_axis(cand_PT, best_P[:, None], axis=1)[:, 0]
        d_PN = jnp.take_along_axis(new_PTN, best_P[:, None, None], axis=1)[:, 0]
        idx_PC = idx_PC.at[:, s].set(pick_P)
        chosen_PN = chosen_PN.at[jnp.arange(P), pick_P].set(True)
        return idx_PC, d_PN, chosen_PN

    idx_PC, d_PN, chosen_PN = lax.fori_loop(1, n_greedy, greedy_step, (idx_PC, d_PN, chosen_PN))

    start = n_greedy
    for r, m in enumerate(sizes[n_greedy:]):
        new_PM = _draw(jax.random.fold_in(key, C + r), logw_PN, d_PN, valid_PN, chosen_PN, m, n_real, init)
        idx_PC = lax.dynamic_update_slice_in_dim(idx_PC, new_PM, start, axis=1)
        chosen_PN = chosen_PN.at[rows, new_PM].set(True)
        start += m
        if start < C:
            _, d_new = _assign(
                xm_PND, xsq_PN, jnp.take_along_axis(xa_PND, new_PM[..., None], axis=1), None, plan
            )
            d_PN = jnp.minimum(d_PN, d_new)
    return jnp.take_along_axis(xa_PND, idx_PC[..., None], axis=1)


@functools.partial(jax.jit, static_argnames=("n_steps", "plan"))
def _lloyd_steps(xa_PND, xm_PND, xsq_PN, w_PN, c_PCD, prev_obj_P, tol, *, n_steps, plan):
    """Up to `n_steps` Lloyd iterations (assign, fill empty clusters, update) until all problems converge."""
    P, C, _ = c_PCD.shape
    valid_PN = w_PN > 0

    def cond(state):
        _, i, _, _, done = state
        return (i < n_steps) & ~done

    def body(state):
        c, i, prev, hist, _ = state
        a, d = _assign(xm_PND, xsq_PN, c, None, plan)
        obj = jnp.sum(w_PN * d, axis=1)
        a = _fill_empty(a, d, valid_PN, C)
        c = _weighted_means(xa_PND, w_PN, a, C, c)
        hist = hist.at[:, i].set(obj)
        done = jnp.all(jnp.isfinite(prev) & (prev - obj <= tol * jnp.abs(prev)))
        return c, i + 1, obj, hist, done

    hist0 = jnp.zeros((P, n_steps), jnp.float32)
    state = (c_PCD, jnp.int32(0), prev_obj_P, hist0, jnp.bool_(False))
    c, steps, obj, hist, done = lax.while_loop(cond, body, state)
    return c, steps, obj, hist, done


@functools.partial(jax.jit, static_argnames=("plan",))
def _finalize(x_PND, xa_PND, xm_PND, xsq_PN, w_PN, c_PCD, *, plan):
    """Final assignment (+ empty fill), raw-space means, sizes and the exact objective of that clustering."""
    P, N, D = xa_PND.shape
    C = c_PCD.shape[1]
    valid_PN = w_PN > 0
    a, d = _assign(xm_PND, xsq_PN, c_PCD, None, plan)
    a = _fill_empty(a, d, valid_PN, C)
    sizes = _counts(a, valid_PN, C)
    chunk = plan.pad_multiple
    ca = _weighted_means(xa_PND, w_PN, a, C, c_PCD)
    raw = _weighted_means(x_PND, w_PN, a, C, jnp.zeros((P, C, D), jnp.float32))

    def body(i, acc):
        start = i * chunk
        xs = lax.dynamic_slice_in_dim(xa_PND, start, chunk, axis=1)
        ai = lax.dynamic_slice_in_dim(a, start, chunk, axis=1)
        wi = lax.dynamic_slice_in_dim(w_PN, start, chunk, axis=1)
        diff = xs - jnp.take_along_axis(ca, ai[..., None], axis=1)
        return acc + jnp.sum(wi * jnp.sum(diff * diff, axis=-1), axis=1)

    obj = lax.fori_loop(0, N // chunk, body, jnp.zeros((P,), jnp.float32))
    return raw, a, sizes, obj


# ------------------------------------------------------------------------------------------------- public API


def check_init(init: str, n_restarts: int) -> None:
    """The seeding is one of INITS; the systematic one is deterministic, so restarts would all be the same."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
    if init == "systematic" and n_restarts != 1:
        raise ValueError(f"init='systematic' is deterministic, every restart would be the same: n_restarts "
                         f"must be 1, got {n_restarts}")


def _validate(x_PND, n_clusters, iters, tol, metric, chunk, n_restarts, weights_PN, init_PCD):
    if not hasattr(x_PND, "ndim") or x_PND.ndim != 3:
        raise ValueError(
            f"kmeans expects points x_PND of rank 3 [P, N, D], got shape {getattr(x_PND, 'shape', None)}"
        )
    if not jnp.issubdtype(x_PND.dtype, jnp.floating):
        raise TypeError(f"kmeans points must be floating point, got dtype {x_PND.dtype}")
    P, N, D = x_PND.shape
    if min(P, N, D) < 1:
        raise ValueError(f"kmeans points must be non-empty, got shape {x_PND.shape}")
    if not isinstance(n_clusters, int | np.integer) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if n_clusters > N:
        raise ValueError(f"n_clusters ({n_clusters}) exceeds the number of points ({N})")
    if not isinstance(iters, int | np.integer) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if chunk is not None and (not isinstance(chunk, int | np.integer) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    if not isinstance(n_restarts, int | np.integer) or n_restarts < 1:
        raise ValueError(f"n_restarts must be an int >= 1, got {n_restarts!r}")
    if weights_PN is not None:
        if tuple(weights_PN.shape) != (P, N):
            raise ValueError(f"weights_PN must have shape {(P, N)}, got {tuple(weights_PN.shape)}")
        w = jnp.asarray(weights_PN, jnp.float32)
        if not bool(jnp.all(jnp.isfinite(w) & (w >= 0))):
            raise ValueError("weights_PN must be finite and >= 0")
        n_pos = int(jnp.min(jnp.sum(w > 0, axis=1)))
        if n_pos < n_clusters:
            raise ValueError(
                f"some problem has only {n_pos} points of positive weight, fewer than "
                f"n_clusters ({n_clusters})"
            )
    if init_PCD is not None and tuple(init_PCD.shape) != (P, n_clusters, D):
        raise ValueError(f"init_PCD must have shape {(P, n_clusters, D)}, got {tuple(init_PCD.shape)}")
    if not bool(jnp.all(jnp.isfinite(x_PND))):
        raise ValueError("kmeans points contain NaN or inf")


def resolve_impl(assign_impl: str, head_dim: int) -> str:
    """ "auto": the fused Pallas kernel on GPU if the head dim suits Triton (power of two >= 16), else XLA."""
    if assign_impl not in ASSIGN_IMPLS:
        raise ValueError(f"assign_impl must be one of {ASSIGN_IMPLS}, got {assign_impl!r}")
    if assign_impl != "auto":
        return assign_impl
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return "pallas" if jax.default_backend() == "gpu" and pow2 else "xla"


def kmeans(
    x_PND: jax.Array,
    n_clusters: int,
    *,
    key: jax.Array,
    iters: int = 20,
    tol: float = 1e-4,
    metric: str = "cosine",
    chunk: int | None = None,
    n_restarts: int = 1,
    init: str = "sampled",
    weights_PN: jax.Array | None = None,
    init_PCD: jax.Array | None = None,
    matmul_dtype: str = "float32",
    assign_impl: str = "auto",
    max_chunk_bytes: int = 1 << 30,
    progress: bool = False,
    progress_every: int = 5,
) -> KMeansResult:
    """Cluster each of the P point sets `x_PND[p]` into `n_clusters` clusters (batched Lloyd K-means).

    key: PRNG key for the initialisation (restart r uses `fold_in(key, r)`).
    iters / tol: at most `iters` Lloyd updates; stop once every problem's relative objective decrease
        is <= tol.
    chunk: points per distance block of the XLA path (None: the largest power of two keeping `[P, chunk, C]`
        f32 under `max_chunk_bytes`). matmul_dtype: "bfloat16" for GPU speed (f32 accumulation), "float32".
    assign_impl: "auto" (fused Pallas kernel on GPU, XLA elsewhere), "xla", "pallas", "pallas_interpret".
    weights_PN: optional point weights (e.g. cluster sizes for a coarse level); weight 0 = ignored point.
    init_PCD: optional initial centroids (raw space; normalised / centred like the points), skips the init.
    n_restarts: independent runs; each problem keeps the run of lowest objective.
    init: "sampled" (k-means++-lite with PRNG draws from `key`) or "systematic" (the same D^2 weighting with
        the draws replaced by evenly spaced quantiles over the points in index order: no randomness, the
        result does not depend on `key`, so `n_restarts` must be 1).
    progress: show a tqdm bar, running the loop from Python in blocks of `progress_every` iterations.
    """
    _validate(x_PND, n_clusters, iters, tol, metric, chunk, n_restarts, weights_PN, init_PCD)
    check_init(init, n_restarts)
    if str(jnp.dtype(matmul_dtype)) not in ("float32", "bfloat16"):
        raise ValueError(f"matmul_dtype must be float32 or bfloat16, got {matmul_dtype!r}")
    P, N, D = x_PND.shape
    C = int(n_clusters)
    chunk = int(chunk) if chunk is not None else auto_chunk(P, N, C, max_chunk_bytes)
    plan = AssignPlan(
        chunk=min(chunk, N), mm_dtype=str(jnp.dtype(matmul_dtype)), impl=resolve_impl(assign_impl, D)
    )
    n_pad = -(-N // plan.pad_multiple) * plan.pad_multiple
    w = jnp.ones((P, N), jnp.float32) if weights_PN is None else jnp.asarray(weights_PN, jnp.float32)
    x, w, xa, xm, xsq = _prepare(jnp.asarray(x_PND), w, n_pad=n_pad, metric=metric, mm_dtype=plan.mm_dtype)

    best: KMeansResult | None = None
    for r in range(n_restarts):
        if init_PCD is not None:
            c0 = _init_to_space(jnp.asarray(init_PCD), x, w, metric)
        else:
            c0 = _init_centroids(
                xa, xm, xsq, w, jax.random.fold_in(key, r), n_clusters=C, plan=plan, n_real=N, init=init
            )
        res = _run(x, xa, xm, xsq, w, c0, iters, tol, plan, progress, progress_every, N)
        best = res if best is None else _keep_best(best, res)
    assert best is not None
    return best


@functools.partial(jax.jit, static_argnames=("n_pad", "metric", "mm_dtype"))
def _prepare(x_PND, w_PN, *, n_pad: int, metric: str, mm_dtype: str):
    """Pad N (padded points get weight 0: never counted, moved or chosen), map to the assignment space."""
    N = x_PND.shape[1]
    x = jnp.pad(x_PND, ((0, 0), (0, n_pad - N), (0, 0)))
    w = jnp.pad(w_PN, ((0, 0), (0, n_pad - N)))
    xa = _to_assignment_space(x, w, metric)
    xsq = jnp.sum(xa * xa, axis=-1)
    return x, w, xa, xa.astype(mm_dtype), xsq


def _init_to_space(init_PCD, x_PND, w_PN, metric: str) -> jax.Array:
    """Map user-given initial centroids into the assignment space exactly like the points."""
    c = init_PCD.astype(jnp.float32)
    if metric == "cosine":
        return c / jnp.maximum(jnp.sqrt(jnp.sum(c * c, axis=-1, keepdims=True)), _NORM_EPS)
    x = x_PND.astype(jnp.float32)
    mean_PD = jnp.einsum("pn,pnd->pd", w_PN, x) / jnp.maximum(jnp.sum(w_PN, axis=1), 1e-30)[:, None]
    return c - mean_PD[:, None, :]


def _run(x, xa, xm, xsq, w, c, iters, tol, plan, progress, progress_every, n_real) -> KMeansResult:
    P = x.shape[0]
    prev = jnp.full((P,), jnp.inf, jnp.float32)
    hist_parts, done_steps = [], 0
    step_block = max(1, int(progress_every)) if progress else max(1, iters)
    bar = None
    if progress and iters > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=iters, desc="kmeans", unit="it", leave=False)
    while done_steps < iters:
        n = min(step_block, iters - done_steps)
        c, steps, prev, hist, done = _lloyd_steps(
            xa, xm, xsq, w, c, prev, jnp.float32(tol), n_steps=n, plan=plan
        )
        steps = int(steps)
        hist_parts.append(hist[:, :steps])
        done_steps += steps
        if bar is not None:
            bar.update(steps)
        if bool(done) or steps < n:
            break
    if bar is not None:
        bar.close()
    raw, a, sizes, obj = _finalize(x, xa, xm, xsq, w, c, plan=plan)
    hist = jnp.concatenate(hist_parts, axis=1) if hist_parts else jnp.zeros((P, 0), jnp.float32)
    if hist.shape[1] < iters:  # repeat the final objective after convergence
        hist = jnp.concatenate([hist, jnp.broadcast_to(obj[:, None], (P, iters - hist.shape[1]))], axis=1)
    return KMeansResult(
        centroids_PCD=raw,
        assign_PN=a[:, :n_real],
        sizes_PC=sizes,
        objective_P=obj,
        n_iters=jnp.int32(done_steps),
        history_PI=hist,
    )


def _keep_best(a: KMeansResult, b: KMeansResult) -> KMeansResult:
    take_b = b.objective_P < a.objective_P

    def pick(x, y):
        if x.ndim == 0:
            return jnp.maximum(x, y)
        return jnp.where(take_b.reshape((-1,) + (1,) * (x.ndim - 1)), y, x)

    return jax.tree.map(pick, a, b)
