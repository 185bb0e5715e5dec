"""Fused block selection: cluster scores -> block scores -> top-k blocks -> sorted block ids, in one kernel.

The unfused path (`selection.block_scores` then `selection.select_topk`) is a scatter, a running max, a few
gathers and an XLA sort or top-k: several launches whose fixed costs exceed the attention kernel's own time
at 1/8 of a 128K context. Here one Triton program per (row, KV head) does all of it on a vector of block
scores held in registers:

1. block score = max of the scores of the clusters that overlap the block (clusters are contiguous runs of
   the reordered key axis, so the overlapping clusters of block b are a contiguous index range
   [lo_b, hi_b], computed once per index by `block_cluster_ranges`); fixed blocks score +inf;
2. the k-th largest block score by bisection on the value (halvings of the score range, each a count over
   the block vector) until exactly k blocks lie above the lower bound, at most `BISECT_ITERS` halvings (which
   reach adjacent floats for log-probability scores; only ties at the k-th score need them all);
3. the chosen blocks (all above the cutoff, ties at the cutoff to the lower block index) are compacted in
   ascending order with a prefix sum and written with one permutation store; the tail carries the last id.

Same result and format as `select_topk(block_scores(...), k, capacity)`: exactly min(k, #blocks with a
finite or +inf score) blocks; when no block has a score the selection is block 0 alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import compiler_params, next_pow2, resolve_interpret
from pallas_kernels.selection import select_topk

BISECT_ITERS = 32
_NEG_INF = float("-inf")


def block_cluster_ranges(cluster_start_HC: jax.Array, cluster_size_HC: jax.Array, *, n_blocks: int,
                         block_k: int) -> tuple[jax.Array, jax.Array]:
    """Per key block, the contiguous range [lo, hi] of cluster indices that overlap it: (lo_HB, hi_HB) int32.

    Clusters are ordered by start and contiguous, so the overlapping clusters are those whose end is past the
    block's first key and whose start is before the block's end. lo > hi means no cluster (fixed or padding
    blocks). Depends on the index only: compute it once per index, outside the decode loop.
    """
    start = cluster_start_HC.astype(jnp.int32)
    end = start + cluster_size_HC.astype(jnp.int32)
    first_B = jnp.arange(n_blocks, dtype=jnp.int32) * block_k
    lo = jax.vmap(lambda e: jnp.searchsorted(e, first_B, side="right"))(end)
    hi = jax.vmap(lambda s: jnp.searchsorted(s, first_B + block_k, side="left"))(start) - 1
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _select_kernel(k_ref, s_ref, size_ref, lo_ref, hi_ref, ids_ref, cnt_ref, *, n_blocks: int, nb_pad: int,
                   fixed_blocks: int, capacity: int):
    blk = lax.broadcasted_iota(jnp.int32, (nb_pad,), 0)
    lo = lo_ref[...]
    hi = hi_ref[...]
    real = blk < n_blocks
    span = jnp.max(jnp.where(real, hi - lo + 1, 0))

    def gather_max(j, acc):
        c = lo + j
        ok = real & (c <= hi)
        c_safe = jnp.where(ok, c, 0)
        s = plgpu.load(s_ref.at[c_safe], mask=ok, other=_NEG_INF).astype(jnp.float32)
        n = plgpu.load(size_ref.at[c_safe], mask=ok, other=0)
        return jnp.where(ok & (n > 0), jnp.maximum(acc, s), acc)

    score = lax.fori_loop(0, span, gather_max, jnp.full((nb_pad,), _NEG_INF, jnp.float32))
    score = jnp.where(real & (blk < fixed_blocks), jnp.inf, score)

    valid = score > _NEG_INF
    n_valid = jnp.sum(valid.astype(jnp.int32))
    k = jnp.clip(k_ref[...], 1, capacity)
    kk = jnp.minimum(k, n_valid)
    finite = valid & (score < jnp.inf)
    f_max = jnp.max(jnp.where(finite, score, _NEG_INF))
    f_min = jnp.min(jnp.where(finite, score, jnp.inf))
    any_finite = jnp.sum(finite.astype(jnp.int32)) > 0
    f_max = jnp.where(any_finite, f_max, 0.0)
    f_min = jnp.where(any_finite, f_min, 0.0)
    big = f_max + 1.0
    t = jnp.where(score == jnp.inf, big, score)  # +inf (fixed) blocks rank above every finite one

    def unresolved(state):
        it, _, _, count_a = state
        return (it < BISECT_ITERS) & (count_a != kk)

    def bisect(state):
        it, a, b, count_a = state
        mid = 0.5 * (a + b)
        c = jnp.sum((t >= mid).astype(jnp.int32))
        go_up = c >= kk
        return it + 1, jnp.where(go_up, mid, a), jnp.where(go_up, b, mid), jnp.where(go_up, c, count_a)

    # Invariant: count(t >= a) >= kk > count(t >= b). Stops as soon as count(t >= a) == kk (then {t >= a} is
    # the top kk exactly); only ties at the k-th score run all BISECT_ITERS halvings.
    _, a, b, _ = lax.while_loop(unresolved, bisect, (jnp.int32(0), f_min, big + 1.0, n_valid))
    gt = valid & (t >= b)
    eq = valid & (t >= a) & (t < b)
    need = kk - jnp.sum(gt.astype(jnp.int32))
    eq_i = eq.astype(jnp.int32)
    eq_before = jnp.cumsum(eq_i) - eq_i
    take = gt | (eq & (eq_before < need))
    take_i = take.astype(jnp.int32)
    count = jnp.sum(take_i)
    last = jnp.where(count > 0, jnp.max(jnp.where(take, blk, -1)), 0)
    # A permutation of the slots: chosen blocks to [0, count) in block order, the rest to [count, nb_pad)
    # carrying `last` as padding. One store, no two lanes on one address.
    slot = jnp.where(take, jnp.cumsum(take_i) - 1, count + jnp.cumsum(1 - take_i) - 1)
    plgpu.store(ids_ref.at[slot], jnp.where(take, blk, last))
    cnt_ref[...] = jnp.maximum(count, 1)


def _check(scores_BHC, cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks):
    if scores_BHC.ndim != 3:
        raise ValueError(f"scores_BHC must be [B, H, C], got {scores_BHC.shape}")
    B, H, C = scores_BHC.shape
    if cluster_size_HC.shape != (H, C):
        raise ValueError(f"cluster_size_HC must be [{H}, {C}], got {cluster_size_HC.shape}")
    for name, x in (("lo_HB", lo_HB), ("hi_HB", hi_HB)):
        if x.shape != (H, n_blocks):
            raise ValueError(f"{name} must be [{H}, n_blocks={n_blocks}], got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must be integer, got {x.dtype}")
    if k_BH.shape != (B, H) or not jnp.issubdtype(k_BH.dtype, jnp.integer):
        raise ValueError(f"k_BH must be an integer [{B}, {H}] array, got {k_BH.dtype}{list(k_BH.shape)}")
    if not 1 <= capacity <= n_blocks:
        raise ValueError(f"capacity must be in [1, n_blocks={n_blocks}], got {capacity}")
    if not 0 <= fixed_blocks <= n_blocks:
        raise ValueError(f"fixed_blocks must be in [0, n_blocks={n_blocks}], got {fixed_blocks}")


@functools.partial(jax.jit, static_argnames=("n_blocks", "capacity", "fixed_blocks", "num_warps", "interpret"))
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
    num_warps: int = 8,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Top-k key blocks per (row, head) straight from cluster scores: (block_ids[B, H, capacity], count[B, H]).

    `scores_BHC`: per-cluster scores (e.g. `centroid_scores`); `lo_HB, hi_HB` from `block_cluster_ranges`;
    `k_BH`: blocks to keep (fixed blocks included), clipped to [1, capacity]. Ids ascending, padded with the
    last. Clusters of size 0 are ignored.
    """
    _check(scores_BHC, cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks)
    B, H, C = scores_BHC.shape
    nb_pad = next_pow2(n_blocks)
    lo = jnp.pad(lo_HB.astype(jnp.int32), ((0, 0), (0, nb_pad - n_blocks)), constant_values=1)
    hi = jnp.pad(hi_HB.astype(jnp.int32), ((0, 0), (0, nb_pad - n_blocks)), constant_values=0)
    kernel = functools.partial(_select_kernel, n_blocks=n_blocks, nb_pad=nb_pad, fixed_blocks=fixed_blocks,
                               capacity=capacity)
    ids, count = pl.pallas_call(
        kernel,
        grid=(B, H),
        in_specs=[
            pl.BlockSpec((None, None), lambda b, h: (b, h)),
            pl.BlockSpec((None, None, C), lambda b, h: (b, h, 0)),
            pl.BlockSpec((None, C), lambda b, h: (h, 0)),
            pl.BlockSpec((None, nb_pad), lambda b, h: (h, 0)),
            pl.BlockSpec((None, nb_pad), lambda b, h: (h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, nb_pad), lambda b, h: (b, h, 0)),
            pl.BlockSpec((None, None), lambda b, h: (b, h)),
        ],
        out_shape=[jax.ShapeDtypeStruct((B, H, nb_pad), jnp.int32), jax.ShapeDtypeStruct((B, H), jnp.int32)],
        compiler_params=compiler_params(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="squeeze_select_blocks",
    )(k_BH.astype(jnp.int32), scores_BHC, cluster_size_HC.astype(jnp.int32), lo, hi)
    return ids[..., :capacity], count


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
    num_warps: int = 8,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference: block score = max over each block's cluster range (a gather per range offset), then
    `select_topk`. Memory O(rows x blocks), so it also checks 512K-key contexts."""
    del num_warps, interpret
    _check(scores_BHC, cluster_size_HC, lo_HB, hi_HB, k_BH, n_blocks, capacity, fixed_blocks)
    B, H, C = scores_BHC.shape
    s_BHC = jnp.where(cluster_size_HC[None] > 0, scores_BHC.astype(jnp.float32), _NEG_INF)
    span = jnp.max(hi_HB - lo_HB + 1)

    def one_offset(j, acc_BHB):
        c_HB = lo_HB + j
        ok_HB = c_HB <= hi_HB
        got = jnp.take_along_axis(s_BHC, jnp.broadcast_to(jnp.clip(c_HB, 0, C - 1)[None], (B, H, n_blocks)), axis=2)
        return jnp.where(ok_HB[None], jnp.maximum(acc_BHB, got), acc_BHB)

    bs_BHB = lax.fori_loop(0, jnp.maximum(span, 0), one_offset, jnp.full((B, H, n_blocks), _NEG_INF, jnp.float32))
    bs_BHB = jnp.where((jnp.arange(n_blocks) < fixed_blocks)[None, None], jnp.inf, bs_BHB)
    return select_topk(bs_BHB, k_BH, capacity)
