"""Sparse flash-decoding over selected key blocks of the fixed context (Pallas, Triton backend).

One program per (batch row, KV head, split). The whole GQA group (G query heads, padded to 16 rows) is one
tile, so every K/V byte is read once for all G heads. A program walks its share of the selected key
blocks `blocks_per_step` at a time: the rows of those blocks are gathered by index (each row is D
contiguous elements, so loads stay coalesced) into one `[blocks_per_step * block_k, D]` tile for the MMA.
The valid entries `[0, block_count)` are spread evenly over the `num_splits` programs of a head; partial
results are merged by log-sum-exp outside the kernel (same jit).
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
# Programs the default split count aims for (about two per SM of an H100).
TARGET_PROGRAMS = 264

_STATIC = (
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


def _decode_kernel(
    ids_ref,
    count_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
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
    """One (b, h, split) program: flash accumulation over this split's share of the selected blocks.

    The q/out blocks have R >= groups rows over arrays of `groups` rows: rows past `groups` are masked
    on load and store (no padding copies outside the kernel).
    """
    P = blocks_per_step
    R, D = q_ref.shape
    n_blocks = k_ref.shape[0] // block_k
    split = pl.program_id(2)
    count = jnp.clip(count_ref[...], 0, capacity)
    # Entries per split: the valid count spread evenly, in whole steps.
    chunk = ((count + num_splits - 1) // num_splits + P - 1) // P * P
    start = split * chunk
    stop = jnp.minimum(start + chunk, count)
    n_steps = (jnp.maximum(stop - start, 0) + P - 1) // P

    rows_ok = jnp.arange(R, dtype=jnp.int32) < groups
    q = q_ref[...] if R == groups else plgpu.load(q_ref, mask=rows_ok[:, None], other=0.0)

    def body(i, carry):
        entry0 = start + i * P
        k, v, ok = gather_step(
            ids_ref, k_ref, v_ref, entry0, count,
            block_k=block_k, blocks_per_step=P, n_blocks=n_blocks,
            n_fixed=n_fixed, fixed_pad=fixed_pad, n_clustered=n_clustered,
        )
        return flash_step(q, k, v, ok, carry, qk_scale)

    carry = (
        jnp.zeros((R, D), jnp.float32),
        jnp.full((R,), -jnp.inf, jnp.float32),
        jnp.zeros((R,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(0, n_steps, body, carry)
    out, lse = finish(acc, m, denom)
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


def default_num_splits(batch: int, heads: int, capacity: int, blocks_per_step: int) -> int:
    """Splits per (b, h) so that the grid has about TARGET_PROGRAMS programs (at most one step each)."""
    want = cdiv(TARGET_PROGRAMS, batch * heads)
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
) -> tuple[jax.Array, jax.Array]:
    """Attention of one decode token per (batch row, query head) over the selected key blocks.

    `q_BHGD` (query head h*G+g), `k_HND`/`v_HND` shared by the batch, `block_ids[B, H, M]` sorted block
    ids (block j = positions [j*block_k, (j+1)*block_k)), `block_count[B, H]` in [1, M]. Valid key
    positions are `[0, n_fixed) ∪ [fixed_pad, fixed_pad + n_clustered)`. Returns `out_BHGD` (q's dtype)
    and `lse_BHG` (float32, natural log of the scaled logits; -inf if no valid key was selected).
    """
    _check_inputs(q_BHGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered, block_k,
                  blocks_per_step)
    B, H, G, D = q_BHGD.shape
    M = block_ids.shape[2]
    P = blocks_per_step
    S = default_num_splits(B, H, M, P) if num_splits is None else int(num_splits)
    if S < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    R = padded_rows(G)
    M_pad = round_up(M, P)
    ids = pad_axis(block_ids.astype(jnp.int32), 2, M_pad, mode="edge")
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
    )
    N = k_HND.shape[1]
    o_BHSGD, lse_BHSG = pl.pallas_call(
        kernel,
        grid=(B, H, S),
        in_specs=[
            pl.BlockSpec((None, None, M_pad), lambda b, h, s: (b, h, 0)),
            pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
            pl.BlockSpec((None, None, R, D), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, N, D), lambda b, h, s: (h, 0, 0)),
            pl.BlockSpec((None, N, D), lambda b, h, s: (h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, R, D), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, R), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, S, G, D), jnp.float32),
            jax.ShapeDtypeStruct((B, H, S, G), jnp.float32),
        ],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="sparse_decode",
    )(ids, count, q_BHGD, k_HND, v_HND)
    if S == 1:
        return o_BHSGD[:, :, 0].astype(q_BHGD.dtype), lse_BHSG[:, :, 0]
    out, lse = combine_partials(o_BHSGD, lse_BHSG, axis=2)
    return out.astype(q_BHGD.dtype), lse


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
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `sparse_decode` (same signature; tiling arguments are ignored)."""
    del num_splits, interpret, num_warps, num_stages
    _check_inputs(q_BHGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered, block_k,
                  blocks_per_step)
    D = q_BHGD.shape[-1]
    n_blocks = k_HND.shape[1] // block_k
    ids = jnp.clip(block_ids.astype(jnp.int32), 0, n_blocks - 1)
    pos_BHK, ok_BHK = selected_positions(ids, block_count.astype(jnp.int32), block_k, n_fixed, fixed_pad,
                                         n_clustered)
    s = default_scale(D, scale)

    def one_head(q_GD, k_ND, v_ND, pos_K, ok_K):
        return masked_attention_ref(q_GD, k_ND[pos_K], v_ND[pos_K], ok_K, s)

    per_batch = jax.vmap(one_head, in_axes=(0, 0, 0, 0, 0))
    out, lse = jax.vmap(per_batch, in_axes=(0, None, None, 0, 0))(q_BHGD, k_HND, v_HND, pos_BHK, ok_BHK)
    return out.astype(q_BHGD.dtype), lse
