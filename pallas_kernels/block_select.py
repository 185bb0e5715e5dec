"""Fused block selection: cluster scores -> block scores -> top-k blocks -> sorted block ids, in one kernel.

The unfused path (`selection.block_scores` then `selection.select_topk`) is a scatter, a running max, a few
gathers and an XLA sort or top-k: several launches whose fixed costs exceed the attention kernel's own time
at 1/8 of a 128K context. Here one Triton program per (row, KV head) does all of it on a vector of block
scores held in registers:

1. block score = max of the scores of the clusters that overlap the block (clusters are contiguous runs of
   the reordered key axis, so the overlapping clusters of block b are a contiguous index range
   [lo_b, hi_b], computed once per index by `block_cluster_ranges`); fixed blocks score +inf;
2. the k-th largest block score by a search on the value: each step counts the blocks above the two inner
   third points of the range in one block-wide reduction (the two counts packed in one int32) and keeps the
   third holding the k-th score, until exactly k blocks lie above the lower bound, at most `SEARCH_ITERS` steps
   (which reach adjacent floats for log-probability scores; only ties at the k-th score need them all). On
   the H200 a step costs about 1 us; a [blocks, P] compare reduced over the blocks (P points per step) cost
   several times more per step than the fewer steps saved, for P = 4..32;
3. the chosen blocks (all above the cutoff, ties at the cutoff to the lower block index) are compacted in
   ascending order with a prefix sum and written with one permutation store; the tail carries the last id.

Same result and format as `select_topk(block_scores(...), k, capacity)`: exactly min(k, #blocks with a
finite or +inf score) blocks; when no block has a score the selection is block 0 alone.

With `chunk_blocks` the same selection is two launches over (row, KV head, chunk) programs, for when one program
per (row, KV head) would leave most SMs idle (8 KV heads at 512K keys): step 1 and per-edge counts over fixed
score edges in the first, the search (started in the band between two edges) and the chunk's share of step 3 in
the second. `default_chunk_blocks` picks it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.centroid_lookup import ClusterLogits, lse_from_partials, scores_from_logits
from pallas_kernels.common import (
    SM_COUNT,
    check_row_head_mask,
    compiler_params,
    is_pow2,
    next_pow2,
    resolve_interpret,
    row_head_mask_i32,
)
from pallas_kernels.selection import select_topk

# Most blocks per head: the search packs two block counts into one int32, c1 + c2 * 2**16 (each below 2**16; the
# sum wraps past 2**31 and is unpacked with a logical shift).
MAX_BLOCKS = 2**16 - 1
# Steps of the k-th-score search; each keeps a third of the range: 3**21 > 2**33, as fine as 33 halvings.
SEARCH_ITERS = 21
# Step after which the search also stops on a band holding one (tied) value (>= SEARCH_ITERS: never): the k-th
# block score is usually tied (a cluster spanning several blocks gives them one score), and then the search ran
# all SEARCH_ITERS steps. The check costs two reductions and pays only once the band is narrow enough to hold the
# tie alone. H200, 1/8 kept, whole decode step, check at step 11 / 8 / never: GQA 32K 29.9 / 34.6 / 33.5 us,
# GQA 128K 65.1 / 63.8 / 71.0, MHA 32K 54.3 / 59.3 / 55.2, MHA 128K 134.6 / 137.3 / 139.8.
TIE_CHECK = 11
# Warps per program: the selection is a chain of block-wide reductions on one program per (row, KV head), so
# more warps per program shorten each one (H100, 128K keys in 16-key blocks, 8 KV heads: 27.2 / 23.8 / 20.0 us
# at 8 / 16 / 32 warps).
NUM_WARPS = 32
# Chunked selection (`chunk_blocks` > 0): the fixed score edges whose per-chunk counts start every program's
# search in a band BAND_STEP wide instead of the whole score range.
CHUNK_BLOCKS = 0
BAND_EDGES = 128
BAND_STEP = 0.25
# Warps of the chunked selection's first launch (a chunk's gather and edge counts, no long reduction chain).
SCORE_WARPS = 4
_NEG_INF = float("-inf")


# `default_chunk_blocks`: programs of 32 warps that fill one wave (one per SM of an H100 / H200), the fewest blocks
# per program and the fewest chunks per head worth a second launch. H100, 512K keys in 16-key blocks, 1/8 kept,
# whole decode step: GQA (8 heads) 233.9 us at 16 chunks of 2048 vs 278.8 us one program per head (512: 296.8,
# 1024: 247.2); MHA (32 heads) one program per head 673.7 us vs 730.4 at 16 chunks; 128K GQA 16 chunks of 512
# 75.7 vs 77.2 us (256 per chunk: 89.0).
ONE_WAVE_PROGRAMS = SM_COUNT
MIN_CHUNK_BLOCKS = 512
MIN_CHUNKS = 8


def default_chunk_blocks(n_blocks: int, programs: int) -> int:
    """`chunk_blocks` for a selection over `n_blocks` blocks per head with `programs` (rows x KV heads) selections:
    chunks that fill one wave, at least MIN_CHUNK_BLOCKS each, or 0 (one program per row and head) when fewer
    than MIN_CHUNKS chunks per head fit."""
    nb_pad = next_pow2(n_blocks)
    per_head = max(1, ONE_WAVE_PROGRAMS // max(1, programs))
    n_chunks = min(1 << (per_head.bit_length() - 1), max(1, nb_pad // MIN_CHUNK_BLOCKS))
    return nb_pad // n_chunks if n_chunks >= MIN_CHUNKS else 0


def block_cluster_ranges(cluster_start_HC: jax.Array, cluster_size_HC: jax.Array, *, n_blocks: int,
                         block_k: int, pad_pow2: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per key block, the contiguous range [lo, hi] of cluster indices that overlap it: (lo_HB, hi_HB) int32.

    Clusters are ordered by start and contiguous, so the overlapping clusters are those whose end is past the
    block's first key and whose start is before the block's end. lo > hi means no cluster (fixed or padding
    blocks). Depends on the index only: compute it once per index, outside the decode loop. `pad_pow2`: the
    tables padded to `next_pow2(n_blocks)` blocks without a cluster, the width the selection kernel reads (it
    then pads nothing per call).
    """
    start = cluster_start_HC.astype(jnp.int32)
    end = start + cluster_size_HC.astype(jnp.int32)
    first_B = jnp.arange(n_blocks, dtype=jnp.int32) * block_k
    lo = jax.vmap(lambda e: jnp.searchsorted(e, first_B, side="right"))(end).astype(jnp.int32)
    hi = (jax.vmap(lambda s: jnp.searchsorted(s, first_B + block_k, side="left"))(start) - 1).astype(jnp.int32)
    return _pad_ranges(lo, hi, next_pow2(n_blocks)) if pad_pow2 else (lo, hi)


def _pad_ranges(lo_HB: jax.Array, hi_HB: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Block tables padded to `width` blocks with empty ranges (lo 1 > hi 0); unchanged when that wide."""
    if lo_HB.shape[1] == width:
        return lo_HB.astype(jnp.int32), hi_HB.astype(jnp.int32)
    pad = ((0, 0), (0, width - lo_HB.shape[1]))
    return (jnp.pad(lo_HB.astype(jnp.int32), pad, constant_values=1),
            jnp.pad(hi_HB.astype(jnp.int32), pad, constant_values=0))


def _cluster_score_fn(s_ref, m_ref, l_ref, *, n_rows: int, agg: str):
    """`cluster_score(c_safe, ok)`: the clusters' scores, read from `s_ref` [C] or (n_rows > 0) finished from the
    lookup's logits [n_rows, C] and its partial normalisers (the lookup's finish done in the gather)."""
    if not n_rows:
        return lambda c_safe, ok: plgpu.load(s_ref.at[c_safe], mask=ok, other=_NEG_INF).astype(jnp.float32)
    lse = lse_from_partials(m_ref, l_ref)
    row = lax.broadcasted_iota(jnp.int32, lse.shape, 0)
    lse_r = [jnp.sum(jnp.where(row == r, lse, 0.0)) for r in range(n_rows)]

    def cluster_score(c_safe, ok):
        x = [plgpu.load(s_ref.at[r, c_safe], mask=ok, other=0.0) - lse_r[r] for r in range(n_rows)]
        m = functools.reduce(jnp.maximum, x)
        if agg == "max":
            return m
        m_safe = jnp.where(m > _NEG_INF, m, 0.0)
        return m_safe + jnp.log(functools.reduce(jnp.add, [jnp.exp(v - m_safe) for v in x])) - math.log(n_rows)

    return cluster_score


def _block_scores(cluster_score, size_ref, lo, hi, blk, prior_ref, active, *, n_blocks: int, fixed_blocks: int,
                  gather_unroll: int):
    """Scores of the blocks `blk` (their cluster ranges `lo, hi`): the max over the range's clusters (size > 0)
    and the prior; fixed blocks +inf, blocks past `n_blocks` -inf. An inactive row reads nothing: 0 for every
    block with a cluster range."""
    real = blk < n_blocks
    span = jnp.where(active, jnp.max(jnp.where(real, hi - lo + 1, 0)), 0)

    def gather_max(j, acc):
        # `gather_unroll` range offsets per step, their loads issued before the first is used (fewer memory
        # latencies, more live registers).
        got = []
        for u in range(gather_unroll):
            c = lo + (j * gather_unroll + u)
            ok = real & (c <= hi)
            c_safe = jnp.where(ok, c, 0)
            n = plgpu.load(size_ref.at[c_safe], mask=ok, other=0)
            got.append((ok & (n > 0), cluster_score(c_safe, ok)))
        for ok, s in got:
            acc = jnp.where(ok, jnp.maximum(acc, s), acc)
        return acc

    score = lax.fori_loop(0, (span + gather_unroll - 1) // gather_unroll, gather_max,
                          jnp.full(blk.shape, _NEG_INF, jnp.float32))
    if prior_ref is not None:
        score = jnp.maximum(score, plgpu.load(prior_ref, mask=real & active, other=_NEG_INF).astype(jnp.float32))
    score = jnp.where(active, score, jnp.where(lo <= hi, 0.0, _NEG_INF))
    return jnp.where(real & (blk < fixed_blocks), jnp.inf, jnp.where(real, score, _NEG_INF))


def _pack(x, y):
    """Two boolean indicators as one int32, x + y * 2**16: a sum or prefix sum of it counts both at once (each
    count <= MAX_BLOCKS < 2**16; the int32 wraps past 2**31, `_unpack` reads it back)."""
    return x.astype(jnp.int32) + (y.astype(jnp.int32) << 16)


def _unpack(packed):
    """(x count, y count) from sums of `_pack`."""
    return packed & 0xFFFF, lax.shift_right_logical(packed, jnp.int32(16))


def _score_stats(score, k_ref, capacity: int):
    """(valid, n_valid, kk, f_min, f_max): blocks with a score and their count, how many to take (k clipped to
    [1, capacity] and to the valid count), and the range of the finite scores (0 when there are none)."""
    valid = score > _NEG_INF
    finite = valid & (score < jnp.inf)
    # the valid and the finite counts in one reduction
    n_valid, n_finite = _unpack(jnp.sum(_pack(valid, finite)))
    any_finite = n_finite > 0
    kk = jnp.minimum(jnp.clip(k_ref[...], 1, capacity), n_valid)
    f_max = jnp.max(jnp.where(finite, score, _NEG_INF))
    f_min = jnp.min(jnp.where(finite, score, jnp.inf))
    return valid, n_valid, kk, jnp.where(any_finite, f_min, 0.0), jnp.where(any_finite, f_max, 0.0)


def _search(t, kk, a, b, count_a, count_b, search_iters: int, tie_check: int):
    """Narrow the band [a, b) holding the kk-th largest of `t` (count(t >= a) = count_a >= kk > count_b =
    count(t >= b)) by thirds until exactly kk values lie above a, at most `search_iters` steps. After
    `tie_check` steps (if < search_iters) it also stops when every value in the band is the same (a tie at the
    k-th score, which no later step would split: the same blocks are taken). Returns (a, b, count_b)."""

    def unresolved(state, last):
        it, _, _, ca, _ = state
        return (it < last) & (ca != kk)

    def third(state):
        # Counts at the two inner third points in one reduction, packed in one int32 (the block-wide reduction,
        # not the compares, is the cost).
        it, a, b, ca, cb = state
        m1 = a + (b - a) / 3.0
        m2 = a + (b - a) * (2.0 / 3.0)
        c1, c2 = _unpack(jnp.sum(_pack(t >= m1, t >= m2)))
        up1, up2 = c1 >= kk, c2 >= kk  # up2 implies up1 (c2 <= c1)
        a_new = jnp.where(up2, m2, jnp.where(up1, m1, a))
        ca_new = jnp.where(up2, c2, jnp.where(up1, c1, ca))
        b_new = jnp.where(up2, b, jnp.where(up1, m2, m1))
        cb_new = jnp.where(up2, cb, jnp.where(up1, c2, c1))
        return it + 1, a_new, b_new, ca_new, cb_new

    state = (jnp.int32(0), a, b, count_a, count_b)
    if tie_check < search_iters:
        state = lax.while_loop(functools.partial(unresolved, last=tie_check), third, state)
        _, a, b, ca, _ = state
        in_band = (t >= a) & (t < b)
        top = jnp.max(jnp.where(in_band, t, _NEG_INF))
        # every band value equals the band's largest: the blocks at or above it are all count_a of them
        tied = jnp.sum((t >= top).astype(jnp.int32)) == ca
        state = lax.while_loop(lambda st: unresolved(st, last=search_iters) & ~tied, third, state)
    else:
        state = lax.while_loop(functools.partial(unresolved, last=search_iters), third, state)
    _, a, b, _, count_b = state
    return a, b, count_b


def _take(t, valid, a, b, need, before=0):
    """Blocks taken from `t` (in block order): every one with t >= b and the first `need` (by index) of the band
    [a, b), `before` (packed: above-band + in-band << 16) counted in earlier blocks. One prefix sum over both
    indicators, packed like the counts, gives each block's rank in the band and its slot. Returns (take,
    taken_through: blocks taken up to and including each one)."""
    gt = valid & (t >= b)
    eq = valid & (t >= a) & (t < b)
    eq_i = eq.astype(jnp.int32)
    gt_through, eq_through = _unpack(jnp.cumsum(_pack(gt, eq)) + before)
    take = gt | (eq & (eq_through - eq_i < need))
    return take, gt_through + jnp.minimum(eq_through, need)


def _select_kernel(k_ref, act_ref, s_ref, *refs, n_blocks: int, nb_pad: int, fixed_blocks: int, capacity: int,
                   search_iters: int, tie_check: int, gather_unroll: int, prior: bool, n_rows: int, agg: str):
    """One program per (row, KV head): block scores, the k-th by a search over the whole range, compaction.
    `s_ref`: cluster scores [C], or (n_rows > 0) the lookup's logits [n_rows, C] with its partial normalisers in
    the two refs after it."""
    m_ref, l_ref, *refs = refs if n_rows else (None, None, *refs)
    size_ref, lo_ref, hi_ref, *refs = refs
    prior_ref, ids_ref, cnt_ref = refs if prior else (None, *refs)
    blk = lax.broadcasted_iota(jnp.int32, (nb_pad,), 0)
    score = _block_scores(_cluster_score_fn(s_ref, m_ref, l_ref, n_rows=n_rows, agg=agg), size_ref, lo_ref[...],
                          hi_ref[...], blk, prior_ref, act_ref[...] != 0, n_blocks=n_blocks,
                          fixed_blocks=fixed_blocks, gather_unroll=gather_unroll)
    valid, n_valid, kk, f_min, f_max = _score_stats(score, k_ref, capacity)
    big = f_max + 1.0
    t = jnp.where(score == jnp.inf, big, score)  # +inf (fixed) blocks rank above every finite one
    # Stops as soon as count_a == kk (then {t >= a} is the top kk exactly); only ties at the k-th score run all
    # `search_iters` steps.
    a, b, count_b = _search(t, kk, f_min, big + 1.0, n_valid, jnp.int32(0), search_iters, tie_check)
    take, taken_through = _take(t, valid, a, b, kk - count_b)
    count = kk
    last = jnp.where(count > 0, jnp.max(jnp.where(take, blk, -1)), 0)
    # A permutation of the slots: chosen blocks to [0, count) in block order, the rest to [count, nb_pad)
    # carrying `last` as padding (unchosen before block b: b - chosen before b). One store, no two lanes on one
    # address.
    slot = jnp.where(take, taken_through - 1, count + blk - taken_through)
    plgpu.store(ids_ref.at[slot], jnp.where(take, blk, last))
    cnt_ref[...] = jnp.maximum(count, 1)


def _band_edges() -> jax.Array:
    """The chunked selection's fixed score edges, BAND_STEP apart, the top one at 0 (log-probabilities lie
    below 0, so for the lookup's scores the k-th score is usually between two edges)."""
    return (lax.broadcasted_iota(jnp.int32, (BAND_EDGES,), 0) - (BAND_EDGES - 1)).astype(jnp.float32) * BAND_STEP


def _chunk_scores_kernel(act_ref, s_ref, *refs, chunk: int, n_blocks: int, fixed_blocks: int, gather_unroll: int,
                         prior: bool, n_rows: int, agg: str):
    """Chunked selection, launch 1, one program per (row, KV head, chunk of blocks): the chunk's block scores
    and, per band edge, how many of them score at or above it."""
    m_ref, l_ref, *refs = refs if n_rows else (None, None, *refs)
    size_ref, lo_ref, hi_ref, *refs = refs
    prior_ref, score_ref, edge_ref = refs if prior else (None, *refs)
    blk = pl.program_id(2) * chunk + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    score = _block_scores(_cluster_score_fn(s_ref, m_ref, l_ref, n_rows=n_rows, agg=agg), size_ref, lo_ref[...],
                          hi_ref[...], blk, prior_ref, act_ref[...] != 0, n_blocks=n_blocks,
                          fixed_blocks=fixed_blocks, gather_unroll=gather_unroll)
    score_ref[...] = score
    edge_ref[...] = jnp.sum((score[:, None] >= _band_edges()[None, :]).astype(jnp.int32), axis=0)


def _pick(x, i):
    """x[i] for a traced scalar i inside a kernel (a masked reduction: no dynamic register indexing)."""
    return jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, x.shape, 0) == i, x, 0))


def _chunk_compact_kernel(k_ref, score_ref, own_ref, edge_ref, ids_ref, cnt_ref, *, chunk: int, nb_pad: int,
                          capacity: int, search_iters: int, tie_check: int):
    """Chunked selection, launch 2, one program per (row, KV head, chunk): the k-th score from the band edges'
    counts and a search inside the band (every program of a head reaches the same band), then the chunk's
    taken blocks written to their slots; the program holding the last taken block writes the padding."""
    c = pl.program_id(2)
    score = score_ref[...]
    blk = lax.broadcasted_iota(jnp.int32, (nb_pad,), 0)
    valid, n_valid, kk, f_min, f_max = _score_stats(score, k_ref, capacity)
    big = jnp.maximum(f_max, 0.0) + 1.0  # above every finite score and every edge
    t = jnp.where(score == jnp.inf, big, score)
    # count(t >= edge_j) over the head, non-increasing in j; the band starts between the last edge that keeps
    # >= kk blocks and the next one (or the score range's ends)
    at_edge = jnp.sum(edge_ref[...], axis=0)
    edges = _band_edges()
    j = jnp.sum((at_edge >= kk).astype(jnp.int32))
    a = jnp.where(j > 0, _pick(edges, j - 1), f_min)
    count_a = jnp.where(j > 0, _pick(at_edge, j - 1), n_valid)
    b = jnp.where(j < BAND_EDGES, _pick(edges, j), big + 1.0)
    count_b = jnp.where(j < BAND_EDGES, _pick(at_edge, j), 0)
    a, b, count_b = _search(t, kk, a, b, count_a, count_b, search_iters, tie_check)
    need = kk - count_b
    start = c * chunk
    gt_b4 = valid & (t >= b) & (blk < start)
    eq_b4 = valid & (t >= a) & (t < b) & (blk < start)
    before = jnp.sum(_pack(gt_b4, eq_b4))
    gt_b4_n, eq_b4_n = _unpack(before)
    taken_b4 = gt_b4_n + jnp.minimum(eq_b4_n, need)
    own = own_ref[...]
    own_blk = start + lax.broadcasted_iota(jnp.int32, (chunk,), 0)
    take, taken_through = _take(jnp.where(own == jnp.inf, big, own), own > _NEG_INF, a, b, need, before)
    # taken blocks to their slots; the rest to this store's own scratch lanes past nb_pad (sliced off)
    plgpu.store(ids_ref.at[jnp.where(take, taken_through - 1, nb_pad + own_blk - start)], own_blk)
    taken_here = jnp.max(taken_through) - taken_b4
    writes_pad = ((taken_here > 0) & (taken_b4 + taken_here == kk)) | ((kk == 0) & (c == 0))
    last = jnp.where(kk > 0, jnp.max(jnp.where(take, own_blk, -1)), 0)
    plgpu.store(ids_ref.at[pl.ds(0, nb_pad)], jnp.full((nb_pad,), last, jnp.int32), mask=writes_pad & (blk >= kk))
    cnt_ref[...] = jnp.maximum(kk, 1)


def _check(scores_BHC, cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks, prior_BHB=None,
           active_BH=None, *, kernel: bool = True):
    if scores_BHC.ndim != 3:
        raise ValueError(f"scores_BHC must be [B, H, C], got {scores_BHC.shape}")
    B, H, C = scores_BHC.shape
    if prior_BHB is not None and (prior_BHB.shape != (B, H, n_blocks)
                                  or not jnp.issubdtype(prior_BHB.dtype, jnp.floating)):
        raise ValueError(f"prior_BHB must be a float [{B}, {H}, n_blocks={n_blocks}] array, got "
                         f"{prior_BHB.dtype}{list(prior_BHB.shape)}")
    if cluster_size_HC.shape != (H, C):
        raise ValueError(f"cluster_size_HC must be [{H}, {C}], got {cluster_size_HC.shape}")
    for name, x in (("lo_HB", lo_HB), ("hi_HB", hi_HB)):
        if x.shape not in ((H, n_blocks), (H, next_pow2(n_blocks))):
            raise ValueError(f"{name} must be [{H}, n_blocks={n_blocks}] (or padded to [{H}, "
                             f"{next_pow2(n_blocks)}] by block_cluster_ranges(..., pad_pow2=True)), got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be integer, got {x.dtype}")
    if k_BH.shape != (B, H) or not jnp.issubdtype(k_BH.dtype, jnp.integer):
        raise ValueError(f"k_BH must be an integer [{B}, {H}] array, got {k_BH.dtype}{list(k_BH.shape)}")
    check_row_head_mask(active_BH, B, H)
    if kernel and n_blocks > MAX_BLOCKS:
        raise ValueError(f"select_blocks handles at most {MAX_BLOCKS} blocks per head, got n_blocks={n_blocks}; use "
                         "selection.block_scores + select_topk")
    if not 1 <= capacity <= n_blocks:
        raise ValueError(f"capacity must be in [1, n_blocks={n_blocks}], got {capacity}")
    if not 0 <= fixed_blocks <= n_blocks:
        raise ValueError(f"fixed_blocks must be in [0, n_blocks={n_blocks}], got {fixed_blocks}")


_STATIC = ("n_blocks", "capacity", "fixed_blocks", "num_warps", "interpret", "search_iters", "tie_check",
           "gather_unroll", "chunk_blocks")


def _check_search(search_iters: int, gather_unroll: int, chunk_blocks: int, tie_check: int) -> None:
    if not 0 <= search_iters <= SEARCH_ITERS:
        raise ValueError(f"search_iters must be in [0, {SEARCH_ITERS}], got {search_iters}")
    if not isinstance(tie_check, int) or tie_check < 0:
        raise ValueError(f"tie_check must be an int >= 0 (a step of the search), got {tie_check!r}")
    if gather_unroll not in (1, 2, 4):
        raise ValueError(f"gather_unroll must be 1, 2 or 4, got {gather_unroll}")
    if chunk_blocks and (chunk_blocks < 16 or not is_pow2(chunk_blocks)):
        raise ValueError(f"chunk_blocks must be 0 (one program per row and head) or a power of two >= 16, got "
                         f"{chunk_blocks}")


def _row_spec(x: jax.Array) -> pl.BlockSpec:
    """The whole [..] of one (row, KV head) of a [B, H, ..] array, for a (B, H) or (B, H, chunk) grid."""
    tail = x.shape[2:]
    return pl.BlockSpec((None, None, *tail), lambda b, h, *_: (b, h, *(0,) * len(tail)))


def _select_call(source: list[jax.Array], cluster_size_HC, lo_HB, hi_HB, k_BH, prior_BHB, active_BH, *, B: int,
                 H: int, n_blocks: int, capacity: int, fixed_blocks: int, num_warps: int, interpret: bool | None,
                 search_iters: int, tie_check: int, gather_unroll: int, chunk_blocks: int, n_rows: int,
                 agg: str) -> tuple[jax.Array, jax.Array]:
    """The selection launch(es) over the given score source ([B, H, ..] arrays): grid (B, H), one program per row
    and KV head; or, with `chunk_blocks`, two launches over (B, H, chunks)."""
    C = cluster_size_HC.shape[1]
    nb_pad = next_pow2(n_blocks)
    chunk = min(chunk_blocks, nb_pad) if chunk_blocks else nb_pad
    lo, hi = _pad_ranges(lo_HB, hi_HB, nb_pad)
    k_spec = pl.BlockSpec((None, None), lambda b, h, *_: (b, h))
    chunk_row = pl.BlockSpec((None, chunk), lambda b, h, *c: (h, *c) if c else (h, 0))
    chunk_bh = pl.BlockSpec((None, None, chunk), lambda b, h, *c: (b, h, *c) if c else (b, h, 0))
    in_specs = [k_spec, *map(_row_spec, source), pl.BlockSpec((None, C), lambda b, h, *_: (h, 0)), chunk_row,
                chunk_row]
    args = [row_head_mask_i32(active_BH, B, H), *source, cluster_size_HC.astype(jnp.int32), lo, hi]
    if prior_BHB is not None:  # padded blocks are masked on load
        in_specs.append(chunk_bh)
        args.append(jnp.pad(prior_BHB, ((0, 0), (0, 0), (0, nb_pad - n_blocks)), constant_values=_NEG_INF))
    shared = dict(n_blocks=n_blocks, fixed_blocks=fixed_blocks, gather_unroll=gather_unroll,
                  prior=prior_BHB is not None, n_rows=n_rows, agg=agg)
    count_out = (jax.ShapeDtypeStruct((B, H), jnp.int32), k_spec)
    if not chunk_blocks:
        kernel = functools.partial(_select_kernel, nb_pad=nb_pad, capacity=capacity, search_iters=search_iters,
                                   tie_check=tie_check, **shared)
        ids, count = pl.pallas_call(
            kernel,
            grid=(B, H),
            in_specs=[k_spec, *in_specs],
            out_specs=[chunk_bh, count_out[1]],
            out_shape=[jax.ShapeDtypeStruct((B, H, nb_pad), jnp.int32), count_out[0]],
            compiler_params=compiler_params(num_warps=num_warps, num_stages=1),
            interpret=resolve_interpret(interpret),
            name="squeeze_select_blocks",
        )(k_BH.astype(jnp.int32), *args)
        return ids[..., :capacity], count
    n_chunks = nb_pad // chunk
    score_BHN, edges_BHKE = pl.pallas_call(
        functools.partial(_chunk_scores_kernel, chunk=chunk, **shared),
        grid=(B, H, n_chunks),
        in_specs=in_specs,
        out_specs=[chunk_bh, pl.BlockSpec((None, None, None, BAND_EDGES), lambda b, h, c: (b, h, c, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, H, nb_pad), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, n_chunks, BAND_EDGES), jnp.int32)],
        compiler_params=compiler_params(num_warps=SCORE_WARPS, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="squeeze_select_chunk_scores",
    )(*args)
    # ids get nb_pad scratch lanes past the row (the untaken blocks' writes land there; sliced off)
    ids_out = jax.ShapeDtypeStruct((B, H, 2 * nb_pad), jnp.int32)
    ids, count = pl.pallas_call(
        functools.partial(_chunk_compact_kernel, chunk=chunk, nb_pad=nb_pad, capacity=capacity,
                          search_iters=search_iters, tie_check=tie_check),
        grid=(B, H, n_chunks),
        in_specs=[k_spec, _row_spec(score_BHN), chunk_bh, _row_spec(edges_BHKE)],
        out_specs=[_row_spec(ids_out), count_out[1]],
        out_shape=[ids_out, count_out[0]],
        compiler_params=compiler_params(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="squeeze_select_chunk_compact",
    )(k_BH.astype(jnp.int32), score_BHN, score_BHN, edges_BHKE)
    return ids[..., :capacity], count


@functools.partial(jax.jit, static_argnames=_STATIC)
def select_blocks(
    scores_BHC: jax.Array,
    cluster_size_HC: jax.Array,
    lo_HB: jax.Array,
    hi_HB: jax.Array,
    k_BH: jax.Array,
    *,
    n_blocks: int,
    capacity: int,
    fixed_blocks: int,
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
    search_iters: int = SEARCH_ITERS,
    tie_check: int = TIE_CHECK,
    prior_BHB: jax.Array | None = None,
    active_BH: jax.Array | None = None,
    gather_unroll: int = 1,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> tuple[jax.Array, jax.Array]:
    """Top-k key blocks per (row, head) straight from cluster scores: (block_ids[B, H, capacity], count[B, H]).

    `scores_BHC`: per-cluster scores (e.g. `centroid_scores`); `lo_HB, hi_HB` from `block_cluster_ranges` (with
    `pad_pow2=True` this call pads nothing);
    `k_BH`: blocks to keep (fixed blocks included), clipped to [1, capacity]. Ids ascending, padded with the
    last. Clusters of size 0 are ignored. `prior_BHB` (optional, float): a block's score is the max of its
    clusters' scores and its prior (e.g. the question's exact block log-probabilities; -inf = no prior).
    `gather_unroll` range offsets are gathered per step of the block-score loop; `search_iters` < SEARCH_ITERS
    stops the search early: still exactly k blocks, every block scoring above the final band [a, b) (width
    range / 3**search_iters) and the lowest-index blocks inside it (0 = the first k blocks with a score: the
    search's fixed cost, for profiling). `tie_check`: the step after which a band of one tied value ends the
    search (the same blocks, fewer steps). `chunk_blocks` > 0 (a power of two >= 16): the two-launch chunked form,
    the same ids (`default_chunk_blocks` says when it pays). `active_BH` (optional, bool or int [B, H]): a row
    where it is 0 reads no score, prior or cluster size: every block with a cluster range scores 0 (for rows whose
    k keeps every block, e.g. a budget of 1: the same blocks without the gather).
    """
    _check(scores_BHC, cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks, prior_BHB, active_BH)
    _check_search(search_iters, gather_unroll, chunk_blocks, tie_check)
    B, H, C = scores_BHC.shape
    return _select_call([scores_BHC], cluster_size_HC, lo_HB, hi_HB, k_BH, prior_BHB, active_BH, B=B, H=H,
                        n_blocks=n_blocks, capacity=capacity, fixed_blocks=fixed_blocks, num_warps=num_warps,
                        interpret=interpret, search_iters=search_iters, tie_check=tie_check,
                        gather_unroll=gather_unroll, chunk_blocks=chunk_blocks, n_rows=0, agg="max")


# Most rows whose logits the fused selection reads per cluster (decode: the GQA group); more rows are cheaper
# through the lookup's own finish launch.
FROM_LOGITS_MAX_ROWS = 8


def _check_logits(cl: ClusterLogits, agg: str) -> None:
    if not isinstance(cl, ClusterLogits):
        raise TypeError(f"expected ClusterLogits (centroid_lookup.centroid_logits), got {type(cl).__name__}")
    if agg not in ("max", "mean"):
        raise ValueError(f"agg must be 'max' or 'mean', got {agg!r}")
    B, H, R, _ = cl.logits_BHRC.shape
    if not 1 <= R <= FROM_LOGITS_MAX_ROWS:
        raise ValueError(f"select_blocks_from_logits reads at most {FROM_LOGITS_MAX_ROWS} rows per cluster, got "
                         f"{R}: use centroid_scores + select_blocks")
    if (cl.m_BHPR.shape != cl.l_BHPR.shape or cl.m_BHPR.ndim != 4 or cl.m_BHPR.shape[:2] != (B, H)
            or cl.m_BHPR.shape[3] < R):
        raise ValueError(f"ClusterLogits partials must be [{B}, {H}, P, >= {R}], got {cl.m_BHPR.shape} and "
                         f"{cl.l_BHPR.shape}")


@functools.partial(jax.jit, static_argnames=_STATIC + ("agg",))
def select_blocks_from_logits(
    cl: ClusterLogits,
    cluster_size_HC: jax.Array,
    lo_HB: jax.Array,
    hi_HB: jax.Array,
    k_BH: jax.Array,
    *,
    n_blocks: int,
    capacity: int,
    fixed_blocks: int,
    agg: str = "max",
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
    search_iters: int = SEARCH_ITERS,
    tie_check: int = TIE_CHECK,
    prior_BHB: jax.Array | None = None,
    active_BH: jax.Array | None = None,
    gather_unroll: int = 1,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> tuple[jax.Array, jax.Array]:
    """`select_blocks(scores_from_logits(cl, ...), ...)` in one launch: the lookup's finish (logit minus the
    row's log-normaliser, aggregated over the rows with `agg`) runs inside the block-score gather, so a decode
    step's lookup + selection is two launches, not three. For few rows (<= FROM_LOGITS_MAX_ROWS)."""
    _check_logits(cl, agg)
    B, H, R, C = cl.logits_BHRC.shape
    _check(cl.logits_BHRC[:, :, 0], cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks,
           prior_BHB, active_BH)
    _check_search(search_iters, gather_unroll, chunk_blocks, tie_check)
    P, Rm = cl.m_BHPR.shape[2:]
    Pp, Rp = next_pow2(P), next_pow2(Rm)
    pad = ((0, 0), (0, 0), (0, Pp - P), (0, Rp - Rm))
    m = jnp.pad(cl.m_BHPR.astype(jnp.float32), pad, constant_values=_NEG_INF)
    l_sum = jnp.pad(cl.l_BHPR.astype(jnp.float32), pad)
    return _select_call([cl.logits_BHRC.astype(jnp.float32), m, l_sum], cluster_size_HC, lo_HB, hi_HB, k_BH,
                        prior_BHB, active_BH, B=B, H=H, n_blocks=n_blocks, capacity=capacity, fixed_blocks=fixed_blocks,
                        num_warps=num_warps, interpret=interpret, search_iters=search_iters, tie_check=tie_check,
                        gather_unroll=gather_unroll, chunk_blocks=chunk_blocks, n_rows=R, agg=agg)


@functools.partial(jax.jit, static_argnames=_STATIC + ("agg",))
def select_blocks_from_logits_ref(
    cl: ClusterLogits,
    cluster_size_HC: jax.Array,
    lo_HB: jax.Array,
    hi_HB: jax.Array,
    k_BH: jax.Array,
    *,
    n_blocks: int,
    capacity: int,
    fixed_blocks: int,
    agg: str = "max",
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
    search_iters: int = SEARCH_ITERS,
    tie_check: int = TIE_CHECK,
    prior_BHB: jax.Array | None = None,
    active_BH: jax.Array | None = None,
    gather_unroll: int = 1,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference: `scores_from_logits` (clusters of size 0 masked), then `select_blocks_ref`."""
    _check_logits(cl, agg)
    mask_HC = jnp.where(cluster_size_HC > 0, 0.0, _NEG_INF)
    return select_blocks_ref(scores_from_logits(cl, mask_HC, agg), cluster_size_HC, lo_HB, hi_HB, k_BH,
                             n_blocks=n_blocks, capacity=capacity, fixed_blocks=fixed_blocks, prior_BHB=prior_BHB,
                             active_BH=active_BH)


@functools.partial(jax.jit, static_argnames=_STATIC)
def select_blocks_ref(
    scores_BHC: jax.Array,
    cluster_size_HC: jax.Array,
    lo_HB: jax.Array,
    hi_HB: jax.Array,
    k_BH: jax.Array,
    *,
    n_blocks: int,
    capacity: int,
    fixed_blocks: int,
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
    search_iters: int = SEARCH_ITERS,
    tie_check: int = TIE_CHECK,
    prior_BHB: jax.Array | None = None,
    active_BH: jax.Array | None = None,
    gather_unroll: int = 1,
    chunk_blocks: int = CHUNK_BLOCKS,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference (exact top-k; `search_iters`, `tie_check`, `gather_unroll` only match the signature):
    block score = max over each block's cluster range (a gather per range offset) and the prior, then
    `select_topk`. Memory O(rows x blocks), so it also checks 512K-key contexts."""
    del num_warps, interpret, search_iters, tie_check, gather_unroll, chunk_blocks
    _check(scores_BHC, cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks, prior_BHB, active_BH,
           kernel=False)
    B, H, C = scores_BHC.shape
    lo_HB, hi_HB = lo_HB[:, :n_blocks], hi_HB[:, :n_blocks]  # the tables may come padded
    s_BHC = jnp.where(cluster_size_HC[None] > 0, scores_BHC.astype(jnp.float32), _NEG_INF)
    span = jnp.max(hi_HB - lo_HB + 1)

    def one_offset(j, acc_BHB):
        c_HB = lo_HB + j
        ok_HB = c_HB <= hi_HB
        got = jnp.take_along_axis(s_BHC, jnp.broadcast_to(jnp.clip(c_HB, 0, C - 1)[None], (B, H, n_blocks)), axis=2)
        return jnp.where(ok_HB[None], jnp.maximum(acc_BHB, got), acc_BHB)

    bs_BHB = lax.fori_loop(0, jnp.maximum(span, 0), one_offset, jnp.full((B, H, n_blocks), _NEG_INF, jnp.float32))
    if prior_BHB is not None:
        bs_BHB = jnp.maximum(bs_BHB, prior_BHB.astype(jnp.float32))
    if active_BH is not None:  # inactive rows: 0 for every block with a cluster range, nothing read
        bs_BHB = jnp.where(active_BH[..., None] != 0, bs_BHB, jnp.where(lo_HB <= hi_HB, 0.0, _NEG_INF)[None])
    bs_BHB = jnp.where((jnp.arange(n_blocks) < fixed_blocks)[None, None], jnp.inf, bs_BHB)
    return select_topk(bs_BHB, k_BH, capacity)
