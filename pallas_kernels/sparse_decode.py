"""Sparse flash-decoding over selected key blocks of the fixed context (Pallas, Triton backend).

One program per (batch row, KV head, split). The whole GQA group (G query heads, padded to 16 rows) is one
tile, so every K/V byte is read once for all G heads. A program walks its share of the selected key
blocks `blocks_per_step` at a time: the rows of those blocks are gathered by index (each row is D
contiguous elements, so loads stay coalesced) into one `[blocks_per_step * block_k, D]` tile for the MMA.
The valid entries `[0, block_count)` are spread evenly over the `num_splits` programs of a head; partial
results are merged by log-sum-exp outside the kernel (same jit).

Optionally the request's own tokens (user prompt + generated, a per-row KV cache `[B, U, H, D]` of which the
first `user_len[b]` entries are valid) are attended in the same launch: extra programs per (b, h), each
over `user_keys_per_split` cache entries, whose partials join the same log-sum-exp combine. That replaces a
separate dense attention + merge (several small launches per layer and token) and reads only the valid
cache entries.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    MIN_DOT_DIM,
    SM_COUNT,
    cdiv,
    check_block_k,
    check_fixed_layout,
    check_head_dim,
    compiler_params,
    default_scale,
    is_pow2,
    pad_axis,
    padded_rows,
    resolve_interpret,
    round_up,
    valid_key_mask,
)
from pallas_kernels.merge import combine_partials

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Programs the default split count aims for at most: two per SM of an H100 / H200 (132 SMs), so the grid
# fills whole waves (a 128-key K + V tile at two stages lets one or two programs share an SM).
TARGET_PROGRAMS = 2 * SM_COUNT

# Cache entries per user-token program (two 128-key steps at the default tile).
USER_KEYS_PER_SPLIT = 256

_STATIC = (
    "user_keys_per_split",
    "n_fixed",
    "fixed_pad",
    "n_clustered",
    "block_k",
    "blocks_per_step",
    "num_splits",
    "scale",
    "interpret",
    "num_warps",
    "num_stages",
)


def flash_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ok: jax.Array,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    qk_scale: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step (base-2 logits) over a gathered key tile; `ok[K]` masks keys.

    Masked keys get `-inf`; a row that has seen only masked keys keeps `m = -inf`, denominator 0 and
    `acc = 0` (the max is replaced by 0 before subtracting, so no `inf - inf`).
    """
    acc, m_prev, d_prev = carry
    # float32 inputs get full-precision dots (Triton would otherwise use tf32).
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = plgpu.dot(q, k, trans_b=True, precision=prec) * qk_scale  # [R, K], log2 units
    s = jnp.where(ok[None, :], s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    d_next = alpha * d_prev + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=prec)
    return acc, m_next, d_next


def finish(acc: jax.Array, m: jax.Array, denom: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalised output and natural-log LSE from the flash state; empty rows give 0 and -inf."""
    seen = denom > 0.0
    safe = jnp.where(seen, denom, 1.0)
    out = acc / safe[:, None]
    lse = jnp.where(seen, (m + jnp.log2(safe)) * LN2, -jnp.inf)
    return out, lse


def gather_step(
    ids_ref,
    k_ref,
    v_ref,
    entry0: jax.Array,
    count: jax.Array,
    *,
    block_k: int,
    blocks_per_step: int,
    n_blocks: int,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gathers the K/V rows of selection entries `[entry0, entry0 + blocks_per_step)` and their mask."""
    P, bk = blocks_per_step, block_k
    ids = ids_ref[pl.ds(pl.multiple_of(entry0, P), P)]
    ids = jnp.clip(ids, 0, n_blocks - 1)
    pos = (ids[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]).reshape(P * bk)
    entry_ok = (entry0 + jnp.arange(P, dtype=jnp.int32)) < count
    ok = jnp.broadcast_to(entry_ok[:, None], (P, bk)).reshape(P * bk)
    ok = ok & valid_key_mask(pos, n_fixed, fixed_pad, n_clustered)
    cols = jnp.arange(k_ref.shape[-1], dtype=jnp.int32)
    k = k_ref[pos[:, None], cols[None, :]]
    v = v_ref[pos[:, None], cols[None, :]]
    return k, v, ok


def contiguous_step(
    k_ref,
    v_ref,
    entry0: jax.Array,
    count: jax.Array,
    *,
    block_k: int,
    blocks_per_step: int,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Blocks `[entry0, entry0 + blocks_per_step)` of the key axis itself (entry j = block j) as one slice.

    The slice start is pulled back so that the tile stays inside the array (the last step of a split may
    reach past it); keys before `entry0`'s first (a previous step's) are masked, like keys past `count`
    blocks."""
    tile = blocks_per_step * block_k
    first = entry0 * block_k
    key0 = jnp.minimum(first, k_ref.shape[0] - tile)
    pos = key0 + jnp.arange(tile, dtype=jnp.int32)
    ok = (pos >= first) & (pos < count * block_k) & valid_key_mask(pos, n_fixed, fixed_pad, n_clustered)
    return k_ref[pl.ds(key0, tile), :], v_ref[pl.ds(key0, tile), :], ok


def user_step(ku_ref, vu_ref, key0: jax.Array, user_len: jax.Array, tile: int) -> tuple[jax.Array, ...]:
    """Rows `[key0, key0 + tile)` of one (row, head) KV cache `[U, D]` and their mask (`< user_len`).

    Values past `user_len` are zeroed: a cache slot not yet written (or left by a longer request) must not
    reach the output even as 0 * inf."""
    pos = key0 + jnp.arange(tile, dtype=jnp.int32)
    ok = pos < user_len
    pos = jnp.clip(pos, 0, ku_ref.shape[0] - 1)
    cols = jnp.arange(ku_ref.shape[-1], dtype=jnp.int32)
    v = vu_ref[pos[:, None], cols[None, :]]
    return ku_ref[pos[:, None], cols[None, :]], jnp.where(ok[:, None], v, jnp.zeros_like(v)), ok


def _decode_kernel(
    ids_ref,
    count_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    user: bool,
    contiguous: bool,
    user_keys_per_split: int,
    qk_scale: float,
    block_k: int,
    blocks_per_step: int,
    num_splits: int,
    groups: int,
    capacity: int,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
):
    """One (b, h, split) program: flash accumulation over this split's share of the selected blocks, or
    (splits past `num_splits`, when `user`) over `user_keys_per_split` entries of the row's KV cache.
    `contiguous`: entry j is block j (the ids are not read) and each step loads one slice of the key axis.

    The q/out blocks have R >= groups rows over arrays of `groups` rows: rows past `groups` are masked
    on load and store (no padding copies outside the kernel).
    """
    if user:
        len_ref, ku_ref, vu_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    P = blocks_per_step
    R, D = q_ref.shape
    n_blocks = k_ref.shape[0] // block_k
    split = pl.program_id(2)
    count = jnp.clip(count_ref[...], 0, capacity)
    # Entries per split: the valid count spread evenly, in whole steps.
    chunk = ((count + num_splits - 1) // num_splits + P - 1) // P * P
    start = split * chunk
    stop = jnp.minimum(start + chunk, count)
    n_steps = jnp.where(split < num_splits, (jnp.maximum(stop - start, 0) + P - 1) // P, 0)

    rows_ok = jnp.arange(R, dtype=jnp.int32) < groups
    q = q_ref[...] if R == groups else plgpu.load(q_ref, mask=rows_ok[:, None], other=0.0)

    def gathered(i, carry):
        k, v, ok = gather_step(
            ids_ref, k_ref, v_ref, start + i * P, count,
            block_k=block_k, blocks_per_step=P, n_blocks=n_blocks,
            n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered,
        )
        return flash_step(q, k, v, ok, carry, qk_scale)

    def sliced(i, carry):
        k, v, ok = contiguous_step(k_ref, v_ref, start + i * P, count, block_k=block_k, blocks_per_step=P,
                                   n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered)
        return flash_step(q, k, v, ok, carry, qk_scale)

    carry = (
        jnp.zeros((R, D), jnp.float32),
        jnp.full((R,), -jnp.inf, jnp.float32),
        jnp.zeros((R,), jnp.float32),
    )
    carry = lax.fori_loop(0, n_steps, sliced if contiguous else gathered, carry)
    if user:
        tile = P * block_k
        key0 = (split - num_splits) * user_keys_per_split
        user_len = len_ref[...]
        n_user = jnp.where(split >= num_splits, (jnp.clip(user_len - key0, 0, user_keys_per_split) + tile - 1) // tile,
                           0)

        def user_body(i, carry):
            k, v, ok = user_step(ku_ref, vu_ref, key0 + i * tile, user_len, tile)
            return flash_step(q, k, v, ok, carry, qk_scale)

        carry = lax.fori_loop(0, n_user, user_body, carry)
    out, lse = finish(*carry)
    if R == groups:
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse
    else:
        plgpu.store(o_ref, out.astype(o_ref.dtype), mask=rows_ok[:, None])
        plgpu.store(lse_ref, lse, mask=rows_ok)


def _check_inputs(q_BHGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered, block_k,
                  blocks_per_step) -> None:
    if q_BHGD.ndim != 4:
        raise ValueError(f"q must be [B, H, G, D], got shape {q_BHGD.shape}")
    if k_HND.ndim != 3 or v_HND.shape != k_HND.shape:
        raise ValueError(f"k and v must both be [H, N, D] of one shape, got {k_HND.shape}, {v_HND.shape}")
    B, H, G, D = q_BHGD.shape
    if k_HND.shape[0] != H or k_HND.shape[2] != D:
        raise ValueError(f"k shape {k_HND.shape} does not match q shape {q_BHGD.shape} (H and D)")
    if not (q_BHGD.dtype == k_HND.dtype == v_HND.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q_BHGD.dtype}, {k_HND.dtype}, {v_HND.dtype}")
    if q_BHGD.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"q/k/v dtype must be bfloat16, float16 or float32, got {q_BHGD.dtype}")
    if block_ids.ndim != 3 or block_ids.shape[:2] != (B, H):
        raise ValueError(f"block_ids must be [B, H, M] = [{B}, {H}, M], got {block_ids.shape}")
    if block_count.shape != (B, H):
        raise ValueError(f"block_count must be [B, H] = [{B}, {H}], got {block_count.shape}")
    if not jnp.issubdtype(block_ids.dtype, jnp.integer) or not jnp.issubdtype(block_count.dtype, jnp.integer):
        raise TypeError(f"block_ids/block_count must be integers, got {block_ids.dtype}, {block_count.dtype}")
    check_head_dim(D)
    check_fixed_layout(k_HND.shape[1], n_fixed, fixed_pad, n_clustered)
    check_block_k(block_k, k_HND.shape[1])
    if not is_pow2(blocks_per_step) or blocks_per_step * block_k < MIN_DOT_DIM:
        raise ValueError(
            f"blocks_per_step must be a power of two with blocks_per_step * block_k >= {MIN_DOT_DIM}, "
            f"got {blocks_per_step} * {block_k}"
        )


def _check_user(q_BHGD, k_user_BUHD, v_user_BUHD, user_len_B, user_keys_per_split, tile) -> bool:
    """Whether the user-token part is given (all three arrays, or none), with shapes checked."""
    given = [x is not None for x in (k_user_BUHD, v_user_BUHD, user_len_B)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("k_user_BUHD, v_user_BUHD and user_len_B go together: pass all three or none")
    B, H, _, D = q_BHGD.shape
    if k_user_BUHD.ndim != 4 or v_user_BUHD.shape != k_user_BUHD.shape:
        raise ValueError(f"k_user/v_user must both be [B, U, H, D] of one shape, got {k_user_BUHD.shape}, "
                         f"{v_user_BUHD.shape}")
    if (k_user_BUHD.shape[0], k_user_BUHD.shape[2], k_user_BUHD.shape[3]) != (B, H, D) or k_user_BUHD.shape[1] < 1:
        raise ValueError(f"k_user shape {k_user_BUHD.shape} does not match q shape {q_BHGD.shape}: expected "
                         f"[{B}, U >= 1, {H}, {D}]")
    if k_user_BUHD.dtype != q_BHGD.dtype or v_user_BUHD.dtype != q_BHGD.dtype:
        raise TypeError(f"k_user/v_user must have q's dtype {q_BHGD.dtype}, got {k_user_BUHD.dtype}, "
                        f"{v_user_BUHD.dtype}")
    if user_len_B.shape != (B,) or not jnp.issubdtype(user_len_B.dtype, jnp.integer):
        raise ValueError(f"user_len_B must be an integer [{B}] array, got {user_len_B.dtype}{list(user_len_B.shape)}")
    if user_keys_per_split < tile or user_keys_per_split % tile:
        raise ValueError(f"user_keys_per_split must be a positive multiple of blocks_per_step * block_k = {tile}, "
                         f"got {user_keys_per_split}")
    return True


def default_num_splits(batch: int, heads: int, capacity: int, blocks_per_step: int) -> int:
    """Splits per (b, h): the most that keep the grid within TARGET_PROGRAMS programs (rounding up would add a
    nearly empty wave: 32 heads x 9 splits = 288 programs is three waves of 132), at least one step each."""
    want = TARGET_PROGRAMS // (batch * heads)
    return max(1, min(want, cdiv(capacity, blocks_per_step)))


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_decode(
    q_BHGD: jax.Array,
    k_HND: jax.Array,
    v_HND: jax.Array,
    block_ids: jax.Array,
    block_count: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_k: int = 16,
    blocks_per_step: int = 8,
    num_splits: int | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_user_BUHD: jax.Array | None = None,
    v_user_BUHD: jax.Array | None = None,
    user_len_B: jax.Array | None = None,
    user_keys_per_split: int = USER_KEYS_PER_SPLIT,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one decode token per (batch row, query head) over the selected key blocks, and
    optionally over the row's own tokens too.

    `q_BHGD` (query head h*G+g), `k_HND`/`v_HND` shared by the batch, `block_ids[B, H, M]` sorted, distinct
    block ids (block j = positions [j*block_k, (j+1)*block_k)), `block_count[B, H]` in [1, M]. Valid key
    positions are `[0, n_fixed) ∪ [fixed_pad, fixed_pad + n_clustered)`. With `k_user_BUHD, v_user_BUHD`
    (a per-row KV cache) and `user_len_B`, the first `user_len_B[b]` cache entries are attended as well and
    the result is over both key sets. Returns `out_BHGD` (q's dtype) and `lse_BHG` (float32, natural log of
    the scaled logits; -inf if no valid key was selected).
    """
    _check_inputs(q_BHGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered, block_k,
                  blocks_per_step)
    user = _check_user(q_BHGD, k_user_BUHD, v_user_BUHD, user_len_B, user_keys_per_split,
                       blocks_per_step * block_k)
    return _launch(q_BHGD, k_HND, v_HND, block_ids, block_count, k_user_BUHD, v_user_BUHD, user_len_B,
                   contiguous=False, user=user, n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered,
                   block_k=block_k, blocks_per_step=blocks_per_step, num_splits=num_splits, scale=scale,
                   interpret=interpret, num_warps=num_warps, num_stages=num_stages,
                   user_keys_per_split=user_keys_per_split)


def _launch(q_BHGD, k_HND, v_HND, block_ids, block_count, k_user_BUHD, v_user_BUHD, user_len_B, *,
            contiguous: bool, user: bool, n_fixed: int, fixed_pad: int, n_clustered: int, block_k: int,
            blocks_per_step: int, num_splits: int | None, scale: float | None, interpret: bool | None,
            num_warps: int, num_stages: int, user_keys_per_split: int) -> tuple[jax.Array, jax.Array]:
    """The decode launch (inputs checked): grid (B, H, splits + user splits), partials combined by LSE."""
    B, H, G, D = q_BHGD.shape
    M = k_HND.shape[1] // block_k if contiguous else block_ids.shape[2]
    P = blocks_per_step
    S = default_num_splits(B, H, M, P) if num_splits is None else int(num_splits)
    if S < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    S_user = cdiv(k_user_BUHD.shape[1], user_keys_per_split) if user else 0
    R = padded_rows(G)
    M_pad = P if contiguous else round_up(M, P)  # contiguous: the ids are not read, a stub of one step
    ids = jnp.zeros((B, H, P), jnp.int32) if contiguous else pad_axis(block_ids.astype(jnp.int32), 2, M_pad,
                                                                      mode="edge")
    count = block_count.astype(jnp.int32)
    kernel = functools.partial(
        _decode_kernel,
        qk_scale=default_scale(D, scale) * LOG2E,
        block_k=block_k,
        blocks_per_step=P,
        num_splits=S,
        groups=G,
        capacity=M,
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=n_clustered,
        user=user,
        contiguous=contiguous,
        user_keys_per_split=user_keys_per_split,
    )
    N = k_HND.shape[1]
    in_specs = [
        pl.BlockSpec((None, None, M_pad), lambda b, h, s: (b, h, 0)),
        pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
        pl.BlockSpec((None, None, R, D), lambda b, h, s: (b, h, 0, 0)),
        pl.BlockSpec((None, N, D), lambda b, h, s: (h, 0, 0)),
        pl.BlockSpec((None, N, D), lambda b, h, s: (h, 0, 0)),
    ]
    args = [ids, count, q_BHGD, k_HND, v_HND]
    if user:
        U = k_user_BUHD.shape[1]
        in_specs += [pl.BlockSpec((None,), lambda b, h, s: (b,))]
        in_specs += [pl.BlockSpec((None, U, None, D), lambda b, h, s: (b, 0, h, 0))] * 2
        args += [user_len_B.astype(jnp.int32), k_user_BUHD, v_user_BUHD]
    S_all = S + S_user
    o_BHSGD, lse_BHSG = pl.pallas_call(
        kernel,
        grid=(B, H, S_all),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, None, R, D), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, S_all, G, D), jnp.float32),
            jax.ShapeDtypeStruct((B, H, S_all, G), jnp.float32),
        ],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="sparse_decode",
    )(*args)
    if S_all == 1:
        return o_BHSGD[:, :, 0].astype(q_BHGD.dtype), lse_BHSG[:, :, 0]
    out, lse = combine_partials(o_BHSGD, lse_BHSG, axis=2)
    return out.astype(q_BHGD.dtype), lse


@functools.partial(jax.jit, static_argnames=_STATIC + ("reference",))
def dense_decode(
    q_BHGD: jax.Array,
    k_HND: jax.Array,
    v_HND: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_k: int = 16,
    blocks_per_step: int = 8,
    num_splits: int | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_user_BUHD: jax.Array | None = None,
    v_user_BUHD: jax.Array | None = None,
    user_len_B: jax.Array | None = None,
    user_keys_per_split: int = USER_KEYS_PER_SPLIT,
    reference: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`sparse_decode` with every block selected, without a block list: each split reads one contiguous range
    of the key axis as slices (on the H100 as fast as the gather over every id, within 1%). The dense policy's
    and the exact pass's decode. Same outputs;
    `reference=True` runs `sparse_decode_ref` over every block. `blocks_per_step` shrinks to fit a short
    context (a step's tile never reaches past the key axis)."""
    B, H = q_BHGD.shape[:2]
    N = k_HND.shape[1]
    check_block_k(block_k, N)
    nb = N // block_k
    P = blocks_per_step
    while P > 1 and P * block_k > N and (P // 2) * block_k >= MIN_DOT_DIM:
        P //= 2
    ids = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (B, H, nb))
    count = jnp.full((B, H), nb, jnp.int32)
    tiling = dict(n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered, block_k=block_k, blocks_per_step=P,
                  num_splits=num_splits, scale=scale, interpret=interpret, num_warps=num_warps,
                  num_stages=num_stages, user_keys_per_split=user_keys_per_split)
    if reference:
        return sparse_decode_ref(q_BHGD, k_HND, v_HND, ids, count, k_user_BUHD=k_user_BUHD, v_user_BUHD=v_user_BUHD,
                                 user_len_B=user_len_B, **tiling)
    _check_inputs(q_BHGD, k_HND, v_HND, ids, count, n_fixed, fixed_pad, n_clustered, block_k, P)
    user = _check_user(q_BHGD, k_user_BUHD, v_user_BUHD, user_len_B, user_keys_per_split, P * block_k)
    if P * block_k > N:
        raise ValueError(f"dense_decode needs a context of at least blocks_per_step * block_k = {P * block_k} "
                         f"keys with block_k={block_k}, got {N}")
    return _launch(q_BHGD, k_HND, v_HND, ids, count, k_user_BUHD, v_user_BUHD, user_len_B, contiguous=True,
                   user=user, **tiling)


def selected_positions(block_ids: jax.Array, block_count: jax.Array, block_k: int, n_fixed: int,
                       fixed_pad: int, n_clustered: int) -> tuple[jax.Array, jax.Array]:
    """Key positions `[..., M * block_k]` of the selected blocks and whether each one is attended."""
    M = block_ids.shape[-1]
    pos = block_ids[..., :, None] * block_k + jnp.arange(block_k, dtype=jnp.int32)
    entry_ok = jnp.arange(M) < block_count[..., None]
    ok = entry_ok[..., None] & valid_key_mask(pos, n_fixed, fixed_pad, n_clustered)
    flat = block_ids.shape[:-1] + (M * block_k,)
    return pos.reshape(flat), ok.reshape(flat)


def masked_attention_ref(q_RD: jax.Array, k_KD: jax.Array, v_KD: jax.Array, ok_K: jax.Array,
                         scale: float) -> tuple[jax.Array, jax.Array]:
    """Float32 softmax attention of rows `q_RD` over keys where `ok_K`; empty rows give 0 and -inf."""
    s = jnp.einsum("rd,kd->rk", q_RD.astype(jnp.float32), k_KD.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    s = jnp.where(ok_K[None, :], s, -jnp.inf)
    m = jnp.max(s, axis=1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=1)
    out = jnp.einsum("rk,kd->rd", p, v_KD.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    out = out / jnp.where(denom > 0, denom, 1.0)[:, None]
    return out, jnp.log(denom) + m[:, 0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_decode_ref(
    q_BHGD: jax.Array,
    k_HND: jax.Array,
    v_HND: jax.Array,
    block_ids: jax.Array,
    block_count: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_k: int = 16,
    blocks_per_step: int = 8,
    num_splits: int | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_user_BUHD: jax.Array | None = None,
    v_user_BUHD: jax.Array | None = None,
    user_len_B: jax.Array | None = None,
    user_keys_per_split: int = USER_KEYS_PER_SPLIT,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `sparse_decode` (same signature; tiling arguments are ignored): the selected
    keys and, when given, the first `user_len_B[b]` cache entries, as one masked softmax."""
    del num_splits, interpret, num_warps, num_stages
    _check_inputs(q_BHGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered, block_k,
                  blocks_per_step)
    user = _check_user(q_BHGD, k_user_BUHD, v_user_BUHD, user_len_B, user_keys_per_split,
                       blocks_per_step * block_k)
    D = q_BHGD.shape[-1]
    n_blocks = k_HND.shape[1] // block_k
    ids = jnp.clip(block_ids.astype(jnp.int32), 0, n_blocks - 1)
    pos_BHK, ok_BHK = selected_positions(ids, block_count.astype(jnp.int32), block_k, n_fixed, fixed_pad,
                                         n_clustered)
    s = default_scale(D, scale)

    B, H = q_BHGD.shape[:2]
    k_BHKD = jnp.broadcast_to(k_HND[None], (B,) + k_HND.shape)
    v_BHKD = jnp.broadcast_to(v_HND[None], (B,) + v_HND.shape)
    k_BHKD = jnp.take_along_axis(k_BHKD, pos_BHK[..., None], axis=2)
    v_BHKD = jnp.take_along_axis(v_BHKD, pos_BHK[..., None], axis=2)
    if user:
        U = k_user_BUHD.shape[1]
        user_ok_BU = jnp.arange(U)[None, :] < user_len_B[:, None]
        v_user_BUHD = jnp.where(user_ok_BU[:, :, None, None], v_user_BUHD, 0)
        k_BHKD = jnp.concatenate([k_BHKD, k_user_BUHD.transpose(0, 2, 1, 3)], axis=2)
        v_BHKD = jnp.concatenate([v_BHKD, v_user_BUHD.transpose(0, 2, 1, 3)], axis=2)
        ok_BHK = jnp.concatenate([ok_BHK, jnp.broadcast_to(user_ok_BU[:, None], (B, H, U))], axis=2)
    out, lse = jax.vmap(jax.vmap(masked_attention_ref, in_axes=(0, 0, 0, 0, None)), in_axes=(0, 0, 0, 0, None))(
        q_BHGD, k_BHKD, v_BHKD, ok_BHK, s)
    return out.astype(q_BHGD.dtype), lse


# Query rows per program of `all_keys_attention` (the tile of one flash step, like a prefill block).
ALL_KEYS_ROWS = 128


def all_keys_attention(
    q_BHRD: jax.Array,
    k_HND: jax.Array,
    v_HND: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_k: int = 16,
    rows_per_program: int | None = None,
    interpret: bool | None = None,
    reference: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Exact attention of R query rows per (row, KV head) over every valid context key: `(out_BHRD, lse_BHR)`.

    For a few dozen rows (a question's exact tail) this is memory-bound, so it runs as `dense_decode` (every
    block, contiguous slices) with the rows as one tile of up to `rows_per_program` (default `ALL_KEYS_ROWS`; more
    rows are folded into the batch axis): K/V are read once per tile instead of per query head, with the split-K
    parallelism of decode. `reference=True` runs the reference on the same inputs.
    """
    B, H, R, D = q_BHRD.shape
    rows = min(rows_per_program or ALL_KEYS_ROWS, padded_rows(R))
    n_chunks = cdiv(R, rows)
    q = pad_axis(q_BHRD, 2, n_chunks * rows).reshape(B, H, n_chunks, rows, D)
    q = q.transpose(0, 2, 1, 3, 4).reshape(B * n_chunks, H, rows, D)
    # a [rows, 128-key] tile per step: 8 warps for the big tiles, as a prefill kernel would use
    o, lse = dense_decode(q, k_HND, v_HND, n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered,
                          block_k=block_k, interpret=interpret, num_warps=8 if rows >= 64 else 4, reference=reference)
    o = o.reshape(B, n_chunks, H, rows, D).transpose(0, 2, 1, 3, 4).reshape(B, H, n_chunks * rows, D)
    lse = lse.reshape(B, n_chunks, H, rows).transpose(0, 2, 1, 3).reshape(B, H, n_chunks * rows)
    return o[:, :, :R], lse[:, :, :R]
