"""Calibration from the queries of the window tokens: a global threshold and per-(layer, KV head) key budgets.

Estimated cluster probability (per query, per cluster j of one KV head; z_j = q . C_j / sqrt(D), N_j = size):

    S_j(q) = exp(z_j) / sum_i N_i exp(z_i),      log S_j = z_j - logsumexp_i(z_i + log N_i)

computed in log space (max-subtraction inside logsumexp), so huge logits never overflow; sum_j N_j S_j = 1,
i.e. S_j estimates the attention probability of one key of cluster j.

(a) Global threshold (the paper's): every key gets the mean over calibration queries (window tokens x the
    G query heads of its KV head) of S of its cluster; the threshold is the `quantile` of these values over
    all layers, heads and keys (cluster values weighted by size), stored as a natural-log threshold.
(b) Budgets: on the calibration queries, the exact attention (softmax over all causally visible context keys,
    real keys) is compared with the online selection rule - key blocks of `block_k` positions ranked by the
    best estimated score of the clusters they overlap, the fixed region first. This gives each (layer, head) a
    recall curve (attention mass kept vs number of blocks). A total budget of `fraction x context_len` kept
    keys per head on average (fixed region included) is then split over heads within [min_share, max_share] x
    the uniform budget, either to maximise the mean recall over (layer, head) (objective "mean": greedy
    water filling, each step gives blocks to the head with the largest recall gain per block, looking ahead
    over non-concave stretches of its curve) or the minimum recall (objective "maxmin": the level every head
    reaches is maximised, leftovers go to the lowest heads).
"""

from __future__ import annotations

import functools
import heapq
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BUDGET_OBJECTIVES = ("mean", "maxmin")


def log_cluster_probs(logits_C: jax.Array, log_sizes_C: jax.Array) -> jax.Array:
    """Stable log S_j = z_j - logsumexp_i(z_i + log N_i) over the last axis."""
    return logits_C - jax.nn.logsumexp(logits_C + log_sizes_C, axis=-1, keepdims=True)


def _cluster_id_N(cluster_start_C, n_pad: int) -> jax.Array:
    """Cluster of every padded position (meaningful inside the clustered region only)."""
    marks = jnp.zeros((n_pad,), jnp.int32).at[cluster_start_C].add(1)
    return jnp.cumsum(marks) - 1


@functools.partial(jax.jit, static_argnames=("n_fixed", "fixed_pad", "n_clustered", "block_k", "q_chunk"))
def layer_calibration_stats(
    keys_HND: jax.Array,
    positions_HN: jax.Array,
    centroids_HCD: jax.Array,
    cluster_start_HC: jax.Array,
    cluster_size_HC: jax.Array,
    q_THqD: jax.Array,
    q_pos_T: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_k: int,
    q_chunk: int = 32,
) -> tuple[jax.Array, jax.Array]:
    """Per layer: mean estimated probability per cluster `[H, C]` and recall curve `[H, NB]`.

    recall_HK[h, k - 1] = mean over calibration tokens (and the G query heads) of the exact attention mass
    inside the k best-scoring key blocks (block score = max over the G heads of the best log S of the clusters
    it overlaps; fixed blocks +inf, padding -inf).
    """
    H, N, D = keys_HND.shape
    T, Hq, _ = q_THqD.shape
    G = Hq // H
    NB = N // block_k
    scale = 1.0 / math.sqrt(D)
    idx_N = jnp.arange(N)
    fixed_N = idx_N < n_fixed
    clustered_N = (idx_N >= fixed_pad) & (idx_N < fixed_pad + n_clustered)
    cid_HN = jax.vmap(lambda s: _cluster_id_N(s, N))(cluster_start_HC)
    cid_HN = jnp.where(clustered_N[None, :], cid_HN, 0)
    log_sizes_HC = jnp.log(cluster_size_HC.astype(jnp.float32))
    keys = keys_HND.astype(jnp.float32)
    cents = centroids_HCD.astype(jnp.float32)

    n_chunks = -(-T // q_chunk)
    t_pad = n_chunks * q_chunk
    q = jnp.pad(q_THqD.astype(jnp.float32), ((0, t_pad - T), (0, 0), (0, 0)))
    q = q.reshape(n_chunks, q_chunk, H, G, D)
    qpos = jnp.pad(q_pos_T, (0, t_pad - T)).reshape(n_chunks, q_chunk)
    qlive = (jnp.arange(t_pad) < T).reshape(n_chunks, q_chunk)

    def chunk_stats(args):
        q_tHGD, pos_t, live_t = args
        z = jnp.einsum("thgd,hcd->hgtc", q_tHGD, cents) * scale
        logs = log_cluster_probs(z, log_sizes_HC[:, None, None, :])
        prob_HC = jnp.sum(jnp.where(live_t[None, None, :, None], jnp.exp(logs), 0.0), axis=(1, 2))
        best_HtC = jnp.max(logs, axis=1)
        pos_score = jnp.take_along_axis(
            best_HtC, jnp.broadcast_to(cid_HN[:, None, :], (H, q_chunk, N)), axis=2
        )
        pos_score = jnp.where(clustered_N, pos_score, -jnp.inf)
        pos_score = jnp.where(fixed_N, jnp.inf, pos_score)
        block_score = jnp.max(pos_score.reshape(H, q_chunk, NB, block_k), axis=-1)

        logits = jnp.einsum("thgd,hnd->hgtn", q_tHGD, keys) * scale
        visible = (positions_HN[:, None, None, :] >= 0) & (
            positions_HN[:, None, None, :] <= pos_t[None, None, :, None]
        )
        logits = jnp.where(visible, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = jnp.where(visible, probs, 0.0)
        mass = jnp.mean(probs, axis=1).reshape(H, q_chunk, NB, block_k).sum(-1)
        order = jnp.argsort(-block_score, axis=-1, stable=True)
        curve = jnp.cumsum(jnp.take_along_axis(mass, order, axis=-1), axis=-1)
        curve_HK = jnp.sum(jnp.where(live_t[None, :, None], curve, 0.0), axis=1)
        return prob_HC, curve_HK

    probs, curves = lax.map(chunk_stats, (q, qpos, qlive))
    return jnp.sum(probs, 0) / (G * T), jnp.sum(curves, 0) / T


def global_log_threshold(mean_prob_LHC: np.ndarray, sizes_LHC: np.ndarray, quantile: float) -> float:
    """log of the size-weighted `quantile` of the per-key mean estimated probability (all layers/heads)."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    v = np.asarray(mean_prob_LHC, np.float64).ravel()
    w = np.asarray(sizes_LHC, np.float64).ravel()
    order = np.argsort(v, kind="stable")
    cw = np.cumsum(w[order]) / np.sum(w)
    i = int(np.searchsorted(cw, quantile, side="right"))
    thr = v[order][min(i, v.size - 1)]
    return float(np.log(max(thr, np.finfo(np.float64).tiny)))


def kept_fraction_at_threshold(mean_prob_LHC, sizes_LHC, log_threshold: float) -> np.ndarray:
    """Fraction of clustered keys per layer whose cluster's mean probability is >= the threshold."""
    v = np.asarray(mean_prob_LHC, np.float64)
    w = np.asarray(sizes_LHC, np.float64)
    kept = np.sum(np.where(np.log(np.maximum(v, 1e-300)) >= log_threshold, w, 0.0), axis=(1, 2))
    return kept / np.sum(w, axis=(1, 2))


def uniform_budget_blocks(fraction: float, context_len: int, n_fixed: int, block_k: int) -> int:
    """Clustered-region blocks per head when `fraction x context_len` keys are kept (fixed ones included)."""
    b = math.floor((fraction * context_len - n_fixed) / block_k)
    if b < 1:
        raise ValueError(
            f"budget fraction {fraction} keeps {fraction * context_len:.0f} of {context_len} keys, "
            f"not more than the {n_fixed} always-kept fixed keys plus one block of {block_k}"
        )
    return b


def allocate_budgets(
    recall_LHK: np.ndarray,
    *,
    fraction: float,
    context_len: int,
    n_fixed: int,
    n_clustered: int,
    block_k: int,
    min_share: float = 0.25,
    max_share: float = 4.0,
    objective: str = "mean",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Split `fraction x context_len` kept keys per head (on average) over (layer, head) by calibration recall.

    objective "mean" maximises the mean recall (greedy water filling), "maxmin" the minimum. Returns budget_LH
    (int32 keys of the clustered region, multiples of block_k; the fixed region comes on top) and a report
    comparing with the uniform split.
    """
    if objective not in BUDGET_OBJECTIVES:
        raise ValueError(f"unknown budget objective {objective!r}; expected one of {BUDGET_OBJECTIVES}")
    recall = np.asarray(recall_LHK, np.float64)
    if recall.ndim != 3:
        raise ValueError(f"recall_LHK must be [L, H, NB], got shape {recall.shape}")
    L, H, NB = recall.shape
    R = _recall_by_clustered_blocks(recall, n_fixed, n_clustered, block_k)
    max_blocks = R.shape[1] - 1
    uni = uniform_budget_blocks(fraction, context_len, n_fixed, block_k)
    uni = min(uni, max_blocks)
    lo = min(max(1, math.floor(min_share * uni)), uni)
    hi = max(min(max_blocks, math.ceil(max_share * uni)), uni)
    total = uni * L * H
    if objective == "mean":
        b = greedy_max_mean(R, np.full(L * H, lo, np.int64), hi, total)
    else:
        b = _max_min(R, lo, hi, total)
    rows = np.arange(L * H)
    budget = (b * block_k).astype(np.int32).reshape(L, H)
    r_alloc = R[rows, b]
    r_uni = R[:, uni]
    report = {
        "fraction": float(fraction),
        "objective": objective,
        "uniform_budget_keys": int(uni * block_k),
        "budget_keys_min": int(budget.min()),
        "budget_keys_max": int(budget.max()),
        "budget_keys_mean": float(budget.mean()),
        "budget_keys_per_layer": [float(x) for x in budget.mean(axis=1)],
        "recall_uniform_mean": float(r_uni.mean()),
        "recall_uniform_min": float(r_uni.min()),
        "recall_allocated_mean": float(r_alloc.mean()),
        "recall_allocated_min": float(r_alloc.min()),
    }
    return budget, report


def _recall_by_clustered_blocks(recall_LHK: np.ndarray, n_fixed: int, n_clustered: int,
                                block_k: int) -> np.ndarray:
    """R[l*H + h, b] = recall with the fixed blocks plus b clustered blocks (b = 0 .. max_blocks), monotone."""
    L, H, NB = recall_LHK.shape
    fixed_blocks = -(-n_fixed // block_k)
    max_blocks = -(-n_clustered // block_k)
    curve = np.concatenate([np.zeros((L * H, 1)), recall_LHK.reshape(L * H, NB)], axis=1)
    R = curve[:, fixed_blocks : fixed_blocks + max_blocks + 1]
    return np.maximum.accumulate(R, axis=1)


def greedy_max_mean(R_PB: np.ndarray, start_P: np.ndarray, hi: int, total: int) -> np.ndarray:
    """Blocks per problem maximising sum_p R[p, b_p] with sum b_p = total (or every b_p = hi), b_p in [start, hi].

    Each step gives the problem with the largest gain per block `(R[p, b + j] - R[p, b]) / j` (best j >= 1,
    so a flat stretch before a jump is crossed) its `j` blocks; ties go to the problem with the fewest blocks.
    Optimal for concave curves. The steps are the segments of each problem's upper concave hull taken in
    decreasing rate from a heap (O(segments x width), seconds for 32 layers x 8 heads x 8K blocks); only the
    last steps, where `total` cuts a segment short, scan every problem.
    """
    R = np.asarray(R_PB, np.float64)
    P, W = R.shape
    hi = min(int(hi), W - 1)
    b = np.minimum(np.asarray(start_P, np.int64).copy(), hi)
    left = int(total) - int(b.sum())

    # each problem's upper concave hull from its start (collinear points kept: the shortest best step)
    hulls = [_upper_hull(R[p], int(b[p]), hi) for p in range(P)]
    pos = [0] * P

    def seg(p: int) -> tuple[float, int]:
        h, i = hulls[p], pos[p]
        return (R[p, h[i + 1]] - R[p, h[i]]) / (h[i + 1] - h[i]), h[i + 1] - h[i]

    def key(p: int) -> tuple[int, int, int]:  # rates equal to 1e-12 tie; ties go to the fewest blocks
        return -round(seg(p)[0] * 1e12), int(b[p]), p

    heap = [key(p) for p in range(P) if len(hulls[p]) > 1]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, _, p = heap[0]
        _, j = seg(p)
        if j > left:  # the best segment no longer fits: finish with bounded steps over every problem
            break
        heapq.heappop(heap)
        b[p] += j
        left -= j
        pos[p] += 1
        if pos[p] + 1 < len(hulls[p]):
            heapq.heappush(heap, key(p))
    return _bounded_greedy_steps(R, b, hi, left)


def _upper_hull(r_W: np.ndarray, lo: int, hi: int) -> list[int]:
    """Indices of the upper concave hull of points (i, r[i]), i in [lo, hi], collinear points kept."""
    h: list[int] = []
    for i in range(lo, hi + 1):
        while len(h) >= 2:
            a, m = h[-2], h[-1]
            if (r_W[m] - r_W[a]) / (m - a) < (r_W[i] - r_W[m]) / (i - m) - 1e-12:
                h.pop()  # m lies strictly below the chord a -> i
            else:
                break
        h.append(i)
    return h


def _bounded_greedy_steps(R: np.ndarray, b: np.ndarray, hi: int, left: int) -> np.ndarray:
    """The greedy's steps with every step bounded by the blocks left (scans all problems per step)."""
    P, W = R.shape
    rows = np.arange(P)
    while left > 0:
        room = np.minimum(hi - b, left)
        J = int(room.max())
        if J <= 0:
            break
        js = np.arange(1, J + 1)
        ahead = np.minimum(b[:, None] + js[None, :], W - 1)
        gain = (R[rows[:, None], ahead] - R[rows, b][:, None]) / js[None, :]
        gain = np.where(js[None, :] <= room[:, None], gain, -np.inf)
        g_P = gain.max(axis=1)
        j_P = np.argmax(gain >= g_P[:, None] - 1e-12, axis=1)
        tied = g_P >= g_P.max() - 1e-12  # ties go to the problem with the fewest blocks: equal curves split evenly
        p = int(np.argmin(np.where(tied, b, np.iinfo(np.int64).max)))
        b[p] += j_P[p] + 1
        left -= j_P[p] + 1
    return b


def _max_min(R: np.ndarray, lo: int, hi: int, total: int) -> np.ndarray:
    """Max-min water filling: the highest recall level every head reaches, leftovers to the lowest heads."""
    P = R.shape[0]

    def blocks_for(level: float) -> np.ndarray:
        reach = R >= level
        b = np.where(reach.any(axis=1), np.argmax(reach, axis=1), hi)
        return np.clip(b, lo, hi)

    lo_lv, hi_lv = 0.0, 1.0 + 1e-9
    for _ in range(60):
        mid = 0.5 * (lo_lv + hi_lv)
        if blocks_for(mid).sum() <= total:
            lo_lv = mid
        else:
            hi_lv = mid
    b = blocks_for(lo_lv)
    left = total - int(b.sum())
    rows = np.arange(P)
    while left > 0:
        room = b < hi
        if not room.any():
            break
        gain_order = np.argsort(np.where(room, R[rows, b], np.inf), kind="stable")
        take = gain_order[: min(left, int(room.sum()))]
        b[take] += 1
        left -= take.size
    return b
