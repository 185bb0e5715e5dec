"""From cluster scores to key-block lists: the glue between the centroid lookup and the attention kernels.

Pure jnp with static shapes (jit-able, no host sync). Key blocks are aligned runs of `block_k` positions of
the context-index layout; a block's score is the max score of the clusters overlapping it, the fixed region
(sinks + window) scores +inf and blocks no cluster touches score -inf. A selection is
`block_ids[..., capacity]` (int32, ascending, padded with the last valid id) and `block_count[...]` (int32,
>= 1). Ties between equal scores go to the lower block index.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_NEG_INF = float("-inf")
_IMPLS = ("topk", "cutoff")


def _check_int_array(name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {jnp.asarray(x).dtype}")


@functools.partial(jax.jit, static_argnames=("n_blocks", "block_k", "fixed_blocks"))
def block_scores(
    scores_BHC: jax.Array,
    cluster_start_HC: jax.Array,
    cluster_size_HC: jax.Array,
    *,
    n_blocks: int,
    block_k: int,
    fixed_blocks: int,
) -> jax.Array:
    """Score of every key block, [B, H, n_blocks] float32.

    Clusters are contiguous, non-overlapping and ordered by start within a head. The clusters overlapping
    block b are those starting inside it plus at most one that starts before it and covers its first
    position. The first kind is a scatter-max of cluster scores by first block; the second is found by a
    running max of "last cluster index that started in an earlier block" (a cumulative max along the
    blocks), checked to still cover the block's first position. No per-key array is built.
    Clusters of size 0 touch nothing. Blocks [0, fixed_blocks) score +inf.
    """
    if scores_BHC.ndim != 3:
        raise ValueError(f"scores_BHC must be [B, H, C], got shape {scores_BHC.shape}")
    B, H, C = scores_BHC.shape
    for name, t in (("cluster_start_HC", cluster_start_HC), ("cluster_size_HC", cluster_size_HC)):
        if t.shape != (H, C):
            raise ValueError(f"{name} must be [H={H}, C={C}], got shape {t.shape}")
        _check_int_array(name, t)
    if n_blocks < 1 or block_k < 1:
        raise ValueError(f"n_blocks and block_k must be >= 1, got {n_blocks}, {block_k}")
    if not 0 <= fixed_blocks <= n_blocks:
        raise ValueError(f"fixed_blocks must be in [0, n_blocks={n_blocks}], got {fixed_blocks}")

    start = cluster_start_HC.astype(jnp.int32)
    size = cluster_size_HC.astype(jnp.int32)
    nonempty = size > 0
    first_blk = jnp.where(nonempty, start // block_k, n_blocks)  # n_blocks = dropped
    s = jnp.where(nonempty[None], scores_BHC.astype(jnp.float32), _NEG_INF)
    hidx = jnp.arange(H)[:, None]

    # Clusters starting inside each block.
    seg = jnp.full((B, H, n_blocks), _NEG_INF, jnp.float32)
    seg = seg.at[:, hidx, first_blk].max(s, mode="drop")

    # The last non-empty cluster that started in an earlier block; it overlaps the block iff it still
    # covers the block's first position.
    cid = jnp.broadcast_to(jnp.arange(C, dtype=jnp.int32), (H, C))
    started = jnp.full((H, n_blocks), -1, jnp.int32).at[hidx, first_blk].max(cid, mode="drop")
    started = lax.cummax(started, axis=1)
    prev = jnp.concatenate([jnp.full((H, 1), -1, jnp.int32), started[:, :-1]], axis=1)  # [H, NB]
    prev_c = jnp.maximum(prev, 0)
    block_start = jnp.arange(n_blocks, dtype=jnp.int32) * block_k
    end = jnp.take_along_axis(start + size, prev_c, axis=1)
    covers = (prev >= 0) & (end > block_start[None, :])
    carry = jnp.take_along_axis(s, jnp.broadcast_to(prev_c[None], (B, H, n_blocks)), axis=2)
    out = jnp.where(covers[None], jnp.maximum(seg, carry), seg)
    return jnp.where((jnp.arange(n_blocks) < fixed_blocks)[None, None, :], jnp.inf, out)


# Keys per step of `block_logprob_max` (bounds its [B, H, R, keys] float32 logits).
PRIOR_KEY_CHUNK = 4096


@functools.partial(jax.jit, static_argnames=("block_k", "scale"))
def block_logprob_max(q_BHRD: jax.Array, k_HND: jax.Array, lse_BHR: jax.Array, valid_N: jax.Array, *,
                      block_k: int, scale: float) -> jax.Array:
    """Per key block, the largest log-probability any row gives one of its keys, [B, H, N / block_k] float32:
    max over r and the block's keys k of `scale * q_r . k - lse_r`, with `lse_r` the row's log-sum-exp over
    the same keys (so the values are exact attention log-probabilities). Keys where `valid_N` is False count
    as absent; a block with none scores -inf. Chunks of PRIOR_KEY_CHUNK keys bound the memory."""
    B, H, R, D = q_BHRD.shape
    N = k_HND.shape[1]
    if k_HND.shape != (H, N, D) or lse_BHR.shape != (B, H, R) or valid_N.shape != (N,):
        raise ValueError(f"block_logprob_max: q {q_BHRD.shape}, k {k_HND.shape}, lse {lse_BHR.shape}, valid "
                         f"{valid_N.shape} do not match ([B, H, R, D], [H, N, D], [B, H, R], [N])")
    if N % block_k:
        raise ValueError(f"block_logprob_max: N = {N} is not a multiple of block_k = {block_k}")
    nb = N // block_k
    chunk_blocks = max(1, PRIOR_KEY_CHUNK // block_k)
    n_chunks = -(-nb // chunk_blocks)
    pad = n_chunks * chunk_blocks * block_k - N
    k_HCKD = jnp.pad(k_HND, ((0, 0), (0, pad), (0, 0))).reshape(H, n_chunks, chunk_blocks * block_k, D)
    ok_CK = jnp.pad(valid_N, (0, pad)).reshape(n_chunks, chunk_blocks * block_k)
    q = q_BHRD.astype(jnp.float32)
    lse = jnp.where(jnp.isfinite(lse_BHR), lse_BHR, jnp.inf)  # a row with no valid key gives -inf everywhere

    def one_chunk(xs):
        k_HKD, ok_K = xs
        s = jnp.einsum("bhrd,hkd->bhrk", q, k_HKD.astype(jnp.float32), precision=lax.Precision.HIGHEST) * scale
        s = jnp.max(s - lse[..., None], axis=2)
        s = jnp.where(ok_K[None, None], s, _NEG_INF)
        return jnp.max(s.reshape(B, H, chunk_blocks, block_k), axis=-1)

    out = lax.map(one_chunk, (k_HCKD.transpose(1, 0, 2, 3), ok_CK))  # [n_chunks, B, H, chunk_blocks]
    return out.transpose(1, 2, 0, 3).reshape(B, H, n_chunks * chunk_blocks)[..., :nb]


def _finish_selection(vals: jax.Array, ids: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """From top-`capacity` candidates (descending) and a per-row count `k` (1..capacity) to a selection.

    Keeps the first `k` candidates whose score is > -inf, sorts them ascending and pads with the last one.
    With no finite candidate the selection is block 0 alone (the first fixed block of the layout).
    """
    cap = vals.shape[-1]
    slot = jnp.arange(cap, dtype=jnp.int32)
    take = (slot < k[..., None]) & (vals > _NEG_INF)
    count = jnp.sum(take, axis=-1, dtype=jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    ids_sorted = jnp.sort(jnp.where(take, ids.astype(jnp.int32), big), axis=-1)
    last = jnp.take_along_axis(ids_sorted, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    ids_out = jnp.where(slot < count[..., None], ids_sorted, last)
    empty = count == 0
    ids_out = jnp.where(empty[..., None], 0, ids_out)
    return ids_out, jnp.where(empty, 1, count)


def _select_by_cutoff(bscores: jax.Array, k: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Same result as top-k + sort, without sorting (score, index) pairs: find the k-th largest score v
    (a sort of the scores alone), take every block > v and the first (k - #greater) blocks == v in index
    order, and compact the chosen ids in ascending order with a running count (no final sort)."""
    NB = bscores.shape[-1]
    v = jnp.take_along_axis(jnp.sort(bscores, axis=-1), (NB - k)[..., None], axis=-1)  # k-th largest
    gt = bscores > v
    eq = bscores == v
    n_gt = jnp.sum(gt, axis=-1, dtype=jnp.int32)
    eq_before = jnp.cumsum(eq, axis=-1, dtype=jnp.int32) - eq
    take = (gt | (eq & (eq_before < (k - n_gt)[..., None]))) & (bscores > _NEG_INF)
    pos = jnp.cumsum(take, axis=-1, dtype=jnp.int32) - 1
    count = pos[..., -1] + 1
    lead = bscores.shape[:-1]
    idx = tuple(jnp.arange(n).reshape((n,) + (1,) * (len(lead) - i)) for i, n in enumerate(lead))
    ids = jnp.zeros(lead + (capacity,), jnp.int32).at[idx + (jnp.where(take, pos, capacity),)].set(
        jnp.broadcast_to(jnp.arange(NB, dtype=jnp.int32), bscores.shape), mode="drop")
    slot = jnp.arange(capacity, dtype=jnp.int32)
    last = jnp.take_along_axis(ids, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    ids = jnp.where(slot < count[..., None], ids, last)
    empty = count == 0
    return jnp.where(empty[..., None], 0, ids), jnp.where(empty, 1, count)


def _select(bscores: jax.Array, k: jax.Array, capacity: int, impl: str) -> tuple[jax.Array, jax.Array]:
    if impl == "cutoff":
        return _select_by_cutoff(bscores, k, capacity)
    vals, ids = lax.top_k(bscores, capacity)
    return _finish_selection(vals, ids, k)


def _check_selection_args(bscores: jax.Array, capacity: int, impl: str) -> None:
    if bscores.ndim < 1:
        raise ValueError("bscores must have a trailing block axis")
    if not jnp.issubdtype(bscores.dtype, jnp.floating):
        raise TypeError(f"bscores must be floating, got dtype {bscores.dtype}")
    n_blocks = bscores.shape[-1]
    if not isinstance(capacity, int) or not 1 <= capacity <= n_blocks:
        raise ValueError(f"capacity must be an int in [1, n_blocks={n_blocks}], got {capacity!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")


@functools.partial(jax.jit, static_argnames=("capacity", "impl"))
def select_topk(
    bscores: jax.Array, k: int | jax.Array, capacity: int, *, impl: str = "topk"
) -> tuple[jax.Array, jax.Array]:
    """Top-`k` blocks by score per row of `bscores[..., NB]`, as (block_ids[..., capacity], block_count[...]).

    `k` is an int or an int array broadcastable to `bscores.shape[:-1]` (per-(B, H) budgets), clipped to
    [1, capacity]; it counts the fixed (+inf) blocks too. Exactly min(k, #blocks with score > -inf) blocks
    are selected; -inf blocks only when nothing else exists (then block 0 alone). Ids are ascending.
    `impl`: "topk" (lax.top_k of `capacity` candidates, then a sort of the ids) or "cutoff" (k-th largest
    score by a sort of the scores alone, then an ordered compaction); same result, different speed.
    """
    _check_selection_args(bscores, capacity, impl)
    _check_int_array("k", k)
    k_arr = jnp.clip(jnp.broadcast_to(jnp.asarray(k, jnp.int32), bscores.shape[:-1]), 1, capacity)
    return _select(bscores, k_arr, capacity, impl)


@functools.partial(jax.jit, static_argnames=("capacity", "impl"))
def select_threshold(
    bscores: jax.Array, log_threshold: float | jax.Array, capacity: int, *, impl: str = "topk"
) -> tuple[jax.Array, jax.Array]:
    """All blocks with score > `log_threshold` (a scalar or an array broadcastable to `bscores.shape[:-1]`).

    If more than `capacity` blocks pass, the `capacity` highest-scoring ones are kept (ties to the lower
    index); if none passes, the best block alone is kept (block 0 if every block is -inf). Ids ascending.
    `impl` as in `select_topk`.
    """
    _check_selection_args(bscores, capacity, impl)
    thr = jnp.broadcast_to(jnp.asarray(log_threshold, jnp.float32), bscores.shape[:-1])
    n_over = jnp.sum(bscores > thr[..., None], axis=-1, dtype=jnp.int32)
    return _select(bscores, jnp.clip(n_over, 1, capacity), capacity, impl)


# --------------------------------------------------------------------------------------------------------
# numpy references (for tests)
# --------------------------------------------------------------------------------------------------------


def block_scores_ref(scores_BHC, cluster_start_HC, cluster_size_HC, *, n_blocks: int, block_k: int,
                     fixed_blocks: int) -> np.ndarray:
    """numpy reference of `block_scores`: materialises each key position's cluster, then maxes per block."""
    scores = np.asarray(scores_BHC, np.float32)
    start = np.asarray(cluster_start_HC)
    size = np.asarray(cluster_size_HC)
    B, H, C = scores.shape
    out = np.full((B, H, n_blocks), -np.inf, np.float32)
    for h in range(H):
        owner = np.full(n_blocks * block_k, -1)
        for j in range(C):
            owner[start[h, j]:start[h, j] + size[h, j]] = j
        for blk in range(n_blocks):
            js = np.unique(owner[blk * block_k:(blk + 1) * block_k])
            js = js[js >= 0]
            if js.size:
                out[:, h, blk] = scores[:, h, js].max(axis=-1)
    out[:, :, :fixed_blocks] = np.inf
    return out


def select_blocks_ref(bscores, *, capacity: int, k=None, log_threshold=None) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of `select_topk` (pass `k`) and `select_threshold` (pass `log_threshold`)."""
    if (k is None) == (log_threshold is None):
        raise ValueError("pass exactly one of k and log_threshold")
    bs = np.asarray(bscores, np.float32)
    lead = bs.shape[:-1]
    flat = bs.reshape(-1, bs.shape[-1])
    if k is not None:
        ks = np.broadcast_to(np.asarray(k), lead).reshape(-1)
    else:
        thr = np.broadcast_to(np.asarray(log_threshold, np.float32), lead).reshape(-1)
        ks = np.array([(row > t).sum() for row, t in zip(flat, thr)])
    ids_out = np.zeros((flat.shape[0], capacity), np.int32)
    counts = np.zeros(flat.shape[0], np.int32)
    for i, row in enumerate(flat):
        kk = int(np.clip(ks[i], 1, capacity))
        order = np.argsort(-row, kind="stable")  # descending, ties to the lower index
        chosen = [int(b) for b in order[:kk] if row[b] > -np.inf]
        if not chosen:
            chosen = [0]
        chosen.sort()
        ids_out[i, :len(chosen)] = chosen
        ids_out[i, len(chosen):] = chosen[-1]
        counts[i] = len(chosen)
    return ids_out.reshape(lead + (capacity,)), counts.reshape(lead)
