"""Optional coarse level over the fine clusters, with fine clusters ordered by coarse parent.

The coarse level is a weighted K-means over the fine centroids (weight = fine cluster size, so a coarse
centroid is the mean of all raw keys under it). Fine clusters are then sorted by coarse parent, so a coarse
cluster is a contiguous run of fine clusters (`coarse_first`, `coarse_count`) and, after the layout, of keys.

Online kernels loop over the fine clusters of a selected coarse cluster with a static trip count, so the
number of fine clusters per coarse cluster is capped at `max_fine_per_coarse`: fine clusters beyond the cap
(the farthest from their coarse centroid) move to the nearest coarse cluster that still has room. The coarse
count never drops to zero (the closest members always stay), so every coarse cluster keeps >= 1 fine cluster.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from squeeze_jax.index.kmeans import kmeans


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "coarse_centroids_PCcD",
        "coarse_of_fine_PC",
        "fine_order_PC",
        "coarse_first_PCc",
        "coarse_count_PCc",
    ],
    meta_fields=["max_fine_per_coarse"],
)
@dataclasses.dataclass
class Hierarchy:
    """Coarse level of one batch of problems.

    coarse_centroids_PCcD: f32 weighted mean of the raw fine centroids (= mean of the raw keys under it).
    coarse_of_fine_PC: coarse parent of every fine cluster, indexed by the ORIGINAL fine cluster id.
    fine_order_PC: new fine position -> original fine cluster id (fine clusters sorted by coarse parent).
    coarse_first_PCc / coarse_count_PCc: first new fine position and number of fine clusters per coarse one.
    """

    coarse_centroids_PCcD: jax.Array
    coarse_of_fine_PC: jax.Array
    fine_order_PC: jax.Array
    coarse_first_PCc: jax.Array
    coarse_count_PCc: jax.Array
    max_fine_per_coarse: int


def max_fine_per_coarse(n_fine: int, n_coarse: int, cap_factor: float) -> int:
    """Static cap on fine clusters per coarse cluster: `cap_factor` x the average, at least the average."""
    if n_coarse < 1 or n_fine < n_coarse:
        raise ValueError(f"need 1 <= n_coarse ({n_coarse}) <= n_fine ({n_fine})")
    if cap_factor < 1.0:
        raise ValueError(f"cap_factor must be >= 1, got {cap_factor}")
    avg = math.ceil(n_fine / n_coarse)
    return int(min(n_fine, max(avg, math.ceil(cap_factor * n_fine / n_coarse))))


def _rank_within_groups(group_C: jax.Array, key_C: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Order by (group, key) and each item's rank inside its group (0 = smallest key)."""
    o1 = jnp.argsort(key_C, stable=True)
    order = o1[jnp.argsort(group_C[o1], stable=True)]
    g_sorted = group_C[order]
    rank_sorted = jnp.arange(group_C.shape[0]) - jnp.searchsorted(g_sorted, g_sorted, side="left")
    return order, jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)


def _cap_one(pts_CD: jax.Array, w_C: jax.Array, assign_C: jax.Array, n_coarse: int, cap: int) -> jax.Array:
    """Move fine clusters out of over-full coarse clusters into the nearest ones with room.

    Each over-full coarse cluster keeps its `cap` members closest to its centroid; the others propose to their
    nearest coarse cluster that still has room, each cluster accepts the closest proposals that fit, and the
    rejected ones propose again (every round places at least one, since n_coarse * cap >= n_fine).
    """
    Cc = n_coarse
    sums = jax.ops.segment_sum(pts_CD * w_C[:, None], assign_C, num_segments=Cc)
    cent = sums / jnp.maximum(jax.ops.segment_sum(w_C, assign_C, num_segments=Cc), 1e-30)[:, None]
    dist_CCc = jnp.maximum(
        jnp.sum(pts_CD**2, -1)[:, None] - 2.0 * pts_CD @ cent.T + jnp.sum(cent**2, -1)[None, :], 0.0
    )
    d_own = jnp.take_along_axis(dist_CCc, assign_C[:, None], axis=1)[:, 0]
    _, rank = _rank_within_groups(assign_C, d_own)
    assign = jnp.where(rank < cap, assign_C, -1)

    def room_of(a):
        return cap - jax.ops.segment_sum((a >= 0).astype(jnp.int32), jnp.maximum(a, 0), num_segments=Cc)

    def body(a):
        pending = a < 0
        d = jnp.where(room_of(a)[None, :] > 0, dist_CCc, jnp.inf)
        target = jnp.argmin(d, axis=1).astype(jnp.int32)
        best = jnp.take_along_axis(d, target[:, None], axis=1)[:, 0]
        group = jnp.where(pending, target, Cc)
        _, rank = _rank_within_groups(group, jnp.where(pending, best, jnp.inf))
        accept = pending & (rank < room_of(a)[jnp.minimum(group, Cc - 1)])
        return jnp.where(accept, target, a)

    return lax.while_loop(lambda a: jnp.any(a < 0), body, assign)


@functools.partial(jax.jit, static_argnames=("n_coarse", "cap", "metric"))
def _cap_assignments(centroids_PCD, sizes_PC, assign_PC, *, n_coarse: int, cap: int, metric: str):
    pts = centroids_PCD.astype(jnp.float32)
    if metric == "cosine":
        pts = pts / jnp.maximum(jnp.linalg.norm(pts, axis=-1, keepdims=True), 1e-12)
    w = sizes_PC.astype(jnp.float32)
    return jax.vmap(lambda p, w_, a: _cap_one(p, w_, a, n_coarse, cap))(pts, w, assign_PC)


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
    init: str = "sampled",
    matmul_dtype: str = "float32",
    assign_impl: str = "auto",
) -> Hierarchy:
    """Weighted K-means over the fine centroids, capped coarse clusters, fine clusters ordered by parent."""
    if centroids_PCD.ndim != 3 or sizes_PC.shape != centroids_PCD.shape[:2]:
        raise ValueError(
            f"expected centroids [P, C, D] and sizes [P, C], got {centroids_PCD.shape} and {sizes_PC.shape}"
        )
    C = centroids_PCD.shape[1]
    cap = max_fine_per_coarse(C, n_coarse, cap_factor)
    res = kmeans(
        centroids_PCD,
        n_coarse,
        key=key,
        iters=iters,
        tol=tol,
        metric=metric,
        weights_PN=sizes_PC.astype(jnp.float32),
        init=init,
        matmul_dtype=matmul_dtype,
        assign_impl=assign_impl,
    )
    assign = res.assign_PN
    if int(jnp.max(jax.vmap(lambda a: jnp.bincount(a, length=n_coarse))(assign))) > cap:
        assign = _cap_assignments(centroids_PCD, sizes_PC, assign, n_coarse=n_coarse, cap=cap, metric=metric)
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
    return Hierarchy(
        coarse_centroids_PCcD=coarse,
        coarse_of_fine_PC=assign_PC.astype(jnp.int32),
        fine_order_PC=order,
        coarse_first_PCc=first,
        coarse_count_PCc=count,
        max_fine_per_coarse=cap,
    )
