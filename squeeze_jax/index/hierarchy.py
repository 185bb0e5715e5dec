"""Optional coarse level over the fine clusters, with fine clusters ordered by coarse parent.

The coarse level is a weighted K-means over the fine centroids (weight = fine cluster size, so a coarse centroid is
the mean of all raw keys under it). Fine clusters are then sorted by coarse parent, so a coarse cluster is a
contiguous run of fine clusters (`coarse_first`, `coarse_count`) and, after the layout, of keys.

Online kernels loop over the fine clusters of a selected coarse cluster with a static trip count, so the number of
fine clusters per coarse cluster is capped at `max_fine_per_coarse`: fine clusters beyond the cap (the farthest
from their coarse centroid) move to the nearest coarse cluster that still has room. The coarse count never drops
to zero (the closest members always stay), so every coarse cluster keeps >= 1 fine cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from squeeze_jax.index.kmeans import kmeans


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coarse_centroids_PCcD", "coarse_of_fine_PC", "fine_order_PC", "coarse_first_PCc",
                 "coarse_count_PCc"],
    meta_fields=["max_fine_per_coarse"],
)
@dataclasses.dataclass
class Hierarchy:
    """Coarse level of one batch of problems.

    coarse_centroids_PCcD: f32 weighted mean of the raw fine centroids (= mean of the raw keys under it).
    coarse_of_fine_PC: coarse parent of every fine cluster, indexed by the ORIGINAL fine cluster id.
    fine_order_PC: new fine position -> original fine cluster id (fine clusters sorted by coarse parent).
    coarse_first_PCc / coarse_count_PCc: first new fine position and number of fine clusters of each coarse one.
    """

    coarse_centroids_PCcD: jax.Array
    coarse_of_fine_PC: jax.Array
    fine_order_PC: jax.Array
    coarse_first_PCc: jax.Array
    coarse_count_PCc: jax.Array
    max_fine_per_coarse: int


def max_fine_per_coarse(n_fine: int, n_coarse: int, cap_factor: float) -> int:
    """Static cap on the fine clusters of one coarse cluster: `cap_factor` x the average, at least the average."""
    if n_coarse < 1 or n_fine < n_coarse:
        raise ValueError(f"need 1 <= n_coarse ({n_coarse}) <= n_fine ({n_fine})")
    if cap_factor < 1.0:
        raise ValueError(f"cap_factor must be >= 1, got {cap_factor}")
    avg = math.ceil(n_fine / n_coarse)
    return int(min(n_fine, max(avg, math.ceil(cap_factor * n_fine / n_coarse))))


def _space(c_PCD: np.ndarray, metric: str) -> np.ndarray:
    c = c_PCD.astype(np.float64)
    if metric == "cosine":
        return c / np.maximum(np.linalg.norm(c, axis=-1, keepdims=True), 1e-12)
    return c


def _cap_one(assign_C: np.ndarray, pts_CD: np.ndarray, w_C: np.ndarray, n_coarse: int, cap: int) -> np.ndarray:
    """Move fine clusters out of over-full coarse clusters into the nearest ones with room (proposal rounds)."""
    assign = assign_C.copy()
    counts = np.bincount(assign, minlength=n_coarse)
    if counts.max() <= cap:
        return assign
    cent = _weighted_centroids(pts_CD, w_C, assign, n_coarse)
    dist_own = np.sum((pts_CD - cent[assign]) ** 2, axis=-1)
    moved = []
    for cc in np.nonzero(counts > cap)[0]:
        members = np.nonzero(assign == cc)[0]
        far_first = members[np.argsort(-dist_own[members], kind="stable")]
        moved.append(far_first[: counts[cc] - cap])
    moved = np.concatenate(moved)
    assign[moved] = -1
    room = cap - np.bincount(assign[assign >= 0], minlength=n_coarse)
    dist = (np.sum(pts_CD[moved] ** 2, -1)[:, None] - 2 * pts_CD[moved] @ cent.T
            + np.sum(cent**2, -1)[None, :])
    pending = np.arange(len(moved))
    while pending.size:
        d = np.where(room[None, :] > 0, dist[pending], np.inf)
        target = np.argmin(d, axis=1)
        best = d[np.arange(pending.size), target]
        order = np.lexsort((best, target))  # by target, closest first
        tgt_sorted = target[order]
        first_of = np.searchsorted(tgt_sorted, tgt_sorted, side="left")
        rank = np.arange(order.size) - first_of
        accept = rank < room[tgt_sorted]
        if not accept.any():  # impossible while n_coarse * cap >= n_fine; guards against an endless loop
            raise RuntimeError("coarse capacity exhausted while re-homing fine clusters")
        acc_items = pending[order[accept]]
        assign[moved[acc_items]] = tgt_sorted[accept]
        np.subtract.at(room, tgt_sorted[accept], 1)
        pending = pending[order[~accept]]
    return assign


def _weighted_centroids(pts_CD, w_C, assign_C, n_coarse):
    sums = np.zeros((n_coarse, pts_CD.shape[1]))
    np.add.at(sums, assign_C, pts_CD * w_C[:, None])
    wsum = np.bincount(assign_C, weights=w_C, minlength=n_coarse)
    return sums / np.maximum(wsum, 1e-30)[:, None]


def build_hierarchy(
    centroids_PCD: jax.Array,
    sizes_PC: jax.Array,
    n_coarse: int,
    *,
    key: jax.Array,
    iters: int = 20,
    tol: float = 1e-4,
    metric: str = "cosine",
    cap_factor: float = 4.0,
    matmul_dtype: str = "float32",
    assign_impl: str = "auto",
) -> Hierarchy:
    """Weighted K-means over the fine centroids, capped coarse clusters, fine clusters ordered by coarse parent."""
    if centroids_PCD.ndim != 3 or sizes_PC.shape != centroids_PCD.shape[:2]:
        raise ValueError(f"expected centroids [P, C, D] and sizes [P, C], got {centroids_PCD.shape} and "
                         f"{sizes_PC.shape}")
    P, C, _ = centroids_PCD.shape
    cap = max_fine_per_coarse(C, n_coarse, cap_factor)
    res = kmeans(centroids_PCD, n_coarse, key=key, iters=iters, tol=tol, metric=metric,
                 weights_PN=sizes_PC.astype(jnp.float32), matmul_dtype=matmul_dtype, assign_impl=assign_impl)
    assign = res.assign_PN
    if int(jnp.max(jax.vmap(lambda a: jnp.bincount(a, length=n_coarse))(assign))) > cap:
        a_np = np.asarray(assign).copy()
        pts = _space(np.asarray(centroids_PCD), metric)
        w = np.asarray(sizes_PC, np.float64)
        for p in range(P):
            a_np[p] = _cap_one(a_np[p], pts[p], w[p], n_coarse, cap)
        assign = jnp.asarray(a_np, jnp.int32)
    return _order_by_parent(centroids_PCD.astype(jnp.float32), sizes_PC, assign, n_coarse, cap)


@functools.partial(jax.jit, static_argnames=("n_coarse", "cap"))
def _order_by_parent(centroids_PCD, sizes_PC, assign_PC, n_coarse: int, cap: int) -> Hierarchy:
    w = sizes_PC.astype(jnp.float32)

    def one(c_CD, w_C, a_C):
        sums = jax.ops.segment_sum(c_CD * w_C[:, None], a_C, num_segments=n_coarse)
        wsum = jax.ops.segment_sum(w_C, a_C, num_segments=n_coarse)
        coarse = sums / jnp.maximum(wsum, 1e-30)[:, None]
        order = jnp.argsort(a_C, stable=True).astype(jnp.int32)
        count = jnp.bincount(a_C, length=n_coarse).astype(jnp.int32)
        first = (jnp.cumsum(count) - count).astype(jnp.int32)
        return coarse, order, first, count

    coarse, order, first, count = jax.vmap(one)(centroids_PCD, w, assign_PC)
    return Hierarchy(coarse_centroids_PCcD=coarse, coarse_of_fine_PC=assign_PC.astype(jnp.int32),
                     fine_order_PC=order, coarse_first_PCc=first, coarse_count_PCc=count, max_fine_per_coarse=cap)
