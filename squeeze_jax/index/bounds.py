"""Per-cluster bounding boxes of a cluster-ordered KV and the box-score table the centroid lookup reads.

A centroid logit q.c_j estimates the *average* key of cluster j, so one strong key inside a large cluster (a
needle, a retrieval head's target) can rank low. The bounding box of the cluster's keys gives the upper bound

    max_{k in j} q.k  <=  sum_d max(q_d lo_jd, q_d hi_jd)  =  q+ . hi_j  +  q- . lo_j

with q+ = max(q, 0), q- = min(q, 0). The box score interpolates between the two with a weight w:

    logit_j = q.c_j + w (bound_j - q.c_j)  =  q+ . (c_j + w (hi_j - c_j))  +  q- . (c_j + w (lo_j - c_j))

(using q = q+ + q-), i.e. an ordinary centroid dot product in 2D dimensions between the signed split of the
query `[q+, q-]` and the table `[c + w (hi - c), c + w (lo - c)]`. So the same lookup kernels serve both
scores; the table is built once per index (2D values per cluster: in bf16 the bytes of f32 centroids).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cluster_boxes(keys_HND: jax.Array, cluster_start_HC: jax.Array,
                  cluster_size_HC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-cluster, per-dimension min and max of the member keys, `(lo_HCD, hi_HCD)` in float32.

    Keys outside every cluster (the fixed sinks/window region, padding) are ignored; an empty cluster gets
    lo = +inf, hi = -inf.
    """
    H, N, D = keys_HND.shape
    if cluster_start_HC.shape != cluster_size_HC.shape or cluster_start_HC.shape[0] != H:
        raise ValueError(f"cluster tables must both be [H={H}, C], got {cluster_start_HC.shape} and "
                         f"{cluster_size_HC.shape}")
    C = cluster_start_HC.shape[1]
    n_N = jnp.arange(N, dtype=jnp.int32)

    def one(k_ND, start_C, size_C):
        owner = jnp.clip(jnp.searchsorted(start_C, n_N, side="right") - 1, 0, C - 1)
        inside = (n_N >= start_C[owner]) & (n_N < start_C[owner] + size_C[owner])
        seg = jnp.where(inside, owner, C)  # outside keys go to a dropped extra segment
        k = k_ND.astype(jnp.float32)
        return jax.ops.segment_min(k, seg, C + 1)[:C], jax.ops.segment_max(k, seg, C + 1)[:C]

    return jax.vmap(one)(keys_HND, cluster_start_HC.astype(jnp.int32), cluster_size_HC.astype(jnp.int32))


def box_table(centroids_HCD: jax.Array, lo_HCD: jax.Array, hi_HCD: jax.Array, box_weight: float,
              dtype=jnp.float32) -> jax.Array:
    """The box-score table `[H, C, 2D]`: `[c + w (hi - c), c + w (lo - c)]`; empty clusters get zeros (their
    log size is -inf or they are never reached, so their score does not matter)."""
    if not 0.0 <= float(box_weight) <= 1.0:
        raise ValueError(f"box_weight must be in [0, 1], got {box_weight}")
    c = centroids_HCD.astype(jnp.float32)
    ok = jnp.all(jnp.isfinite(lo_HCD), axis=-1, keepdims=True) & jnp.all(jnp.isfinite(hi_HCD), axis=-1, keepdims=True)
    up = jnp.where(ok, c + box_weight * (jnp.where(ok, hi_HCD, 0.0) - c), 0.0)
    down = jnp.where(ok, c + box_weight * (jnp.where(ok, lo_HCD, 0.0) - c), 0.0)
    return jnp.concatenate([up, down], axis=-1).astype(dtype)


def index_box_table(keys_HND: jax.Array, centroids_HCD: jax.Array, cluster_start_HC: jax.Array,
                    cluster_size_HC: jax.Array, box_weight: float, dtype=jnp.float32) -> jax.Array:
    """`box_table` of one layer of a context index (boxes from its cluster-ordered keys)."""
    lo, hi = cluster_boxes(keys_HND, cluster_start_HC, cluster_size_HC)
    return box_table(centroids_HCD, lo, hi, box_weight, dtype)


def signed_split(q_BHRD: jax.Array) -> jax.Array:
    """`[q+, q-]` along the last axis (the query side of the box score), `[..., 2D]`."""
    return jnp.concatenate([jnp.maximum(q_BHRD, 0), jnp.minimum(q_BHRD, 0)], axis=-1)
