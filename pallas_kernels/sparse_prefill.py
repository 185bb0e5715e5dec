"""Sparse flash attention of user-token queries over selected key blocks of the fixed context (Pallas).

Each block of `block_q` user tokens has its own selection. One program per (batch row, KV head, query
block, row tile): its rows are the block's tokens times the GQA group (`block_q * G`, padded to a power of
two >= 16, optionally cut into tiles of `block_rows`), and it walks the block's selected key blocks
`blocks_per_step` at a time (row gather by index), accumulating flash-style. The fixed context precedes
every user token, so there is no causal mask here; the user-token part is `merge.dense_attention_lse`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (
    MIN_DOT_DIM,
    MIN_ROWS,
    cdiv,
    check_block_k,
    check_fixed_layout,
    check_head_dim,
    compiler_params,
    default_scale,
    is_pow2,
    next_pow2,
    pad_axis,
    resolve_interpret,
    round_up,
)
from pallas_kernels.sparse_decode import (
    LOG2E,
    finish,
    flash_step,
    gather_step,
    masked_attention_ref,
    selected_positions,
)

_STATIC = (
    "n_fixed",
    "fixed_pad",
    "n_clustered",
    "block_q",
    "block_k",
    "blocks_per_step",
    "block_rows",
    "scale",
    "interpret",
    "num_warps",
    "num_stages",
)


def _prefill_kernel(
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
    capacity: int,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
):
    """One (b, h, query block, row tile) program: flash accumulation over the block's selection."""
    P = blocks_per_step
    R, D = q_ref.shape
    n_blocks = k_ref.shape[0] // block_k
    count = jnp.clip(count_ref[...], 0, capacity)
    n_steps = (jnp.maximum(count, 0) + P - 1) // P
    q = q_ref[...]

    def body(i, carry):
        k, v, ok = gather_step(
            ids_ref, k_ref, v_ref, i * P, count,
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
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _check_inputs(q_BHTGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered,
                  block_q, block_k, blocks_per_step) -> None:
    if q_BHTGD.ndim != 5:
        raise ValueError(f"q must be [B, H, T, G, D], got shape {q_BHTGD.shape}")
    if k_HND.ndim != 3 or v_HND.shape != k_HND.shape:
        raise ValueError(f"k and v must both be [H, N, D] of one shape, got {k_HND.shape}, {v_HND.shape}")
    B, H, T, G, D = q_BHTGD.shape
    if k_HND.shape[0] != H or k_HND.shape[2] != D:
        raise ValueError(f"k shape {k_HND.shape} does not match q shape {q_BHTGD.shape} (H and D)")
    if not (q_BHTGD.dtype == k_HND.dtype == v_HND.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q_BHTGD.dtype}, {k_HND.dtype}, {v_HND.dtype}")
    if q_BHTGD.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"q/k/v dtype must be bfloat16, float16 or float32, got {q_BHTGD.dtype}")
    if block_q < 1:
        raise ValueError(f"block_q must be >= 1, got {block_q}")
    nQ = cdiv(T, block_q)
    if block_ids.ndim != 4 or block_ids.shape[:3] != (B, H, nQ):
        raise ValueError(
            f"block_ids must be [B, H, nQ, M] = [{B}, {H}, {nQ}, M] (nQ = ceil(T / block_q)), "
            f"got {block_ids.shape}"
        )
    if block_count.shape != (B, H, nQ):
        raise ValueError(f"block_count must be [B, H, nQ] = [{B}, {H}, {nQ}], got {block_count.shape}")
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


def tile_rows(block_q: int, groups: int) -> tuple[int, int]:
    """Padded (tokens, heads) of one query block so that tokens * heads is a power of two >= 16."""
    tq, gp = next_pow2(block_q), next_pow2(groups)
    if tq * gp < MIN_ROWS:
        gp = MIN_ROWS // tq
    return tq, gp


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_prefill(
    q_BHTGD: jax.Array,
    k_HND: jax.Array,
    v_HND: jax.Array,
    block_ids: jax.Array,
    block_count: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_q: int,
    block_k: int = 16,
    blocks_per_step: int = 4,
    block_rows: int | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Attention of user-token queries over the key blocks selected for their query block.

    `q_BHTGD` (query head h*G+g), `k_HND`/`v_HND` shared by the batch, `block_ids[B, H, nQ, M]` and
    `block_count[B, H, nQ]` per block of `block_q` tokens (nQ = ceil(T / block_q)). Returns `out_BHTGD`
    (q's dtype) and `lse_BHTG` (float32, natural log; -inf where no valid key was selected).
    `block_rows` (power of two, default min(rows, 128)) cuts a query block's rows into tiles;
    `num_warps` defaults to 4 for tiles of up to 128 rows (fastest on an H100), else 8.
    """
    _check_inputs(q_BHTGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered,
                  block_q, block_k, blocks_per_step)
    B, H, T, G, D = q_BHTGD.shape
    nQ, M = block_ids.shape[2], block_ids.shape[3]
    P = blocks_per_step
    tq, gp = tile_rows(block_q, G)
    R = tq * gp
    rows = min(R, 128) if block_rows is None else int(block_rows)
    if not is_pow2(rows) or rows < MIN_ROWS or R % rows:
        raise ValueError(f"block_rows must be a power of two >= {MIN_ROWS} dividing {R}, got {block_rows}")
    n_tiles = R // rows
    warps = (4 if rows <= 128 else 8) if num_warps is None else num_warps
    # [B, H, T, G, D] -> [B, H, nQ * tq * gp, D]; pads only where the shapes need it.
    q = pad_axis(q_BHTGD, 2, nQ * block_q).reshape(B, H, nQ, block_q, G, D)
    q = pad_axis(pad_axis(q, 3, tq), 4, gp).reshape(B, H, nQ * R, D)
    M_pad = round_up(M, P)
    ids = pad_axis(block_ids.astype(jnp.int32), 3, M_pad, mode="edge")
    count = block_count.astype(jnp.int32)
    kernel = functools.partial(
        _prefill_kernel,
        qk_scale=default_scale(D, scale) * LOG2E,
        block_k=block_k,
        blocks_per_step=P,
        capacity=M,
        n_fixed=n_fixed,
        fixed_pad=fixed_pad,
        n_clustered=n_clustered,
    )
    N = k_HND.shape[1]
    o, lse = pl.pallas_call(
        kernel,
        grid=(B, H, nQ * n_tiles),
        in_specs=[
            pl.BlockSpec((None, None, None, M_pad), lambda b, h, i: (b, h, i // n_tiles, 0)),
            pl.BlockSpec((None, None, None), lambda b, h, i: (b, h, i // n_tiles)),
            pl.BlockSpec((None, None, rows, D), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, N, D), lambda b, h, i: (h, 0, 0)),
            pl.BlockSpec((None, N, D), lambda b, h, i: (h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, D), lambda b, h, i: (b, h, i, 0)),
            pl.BlockSpec((None, None, rows), lambda b, h, i: (b, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, nQ * R, D), q_BHTGD.dtype),
            jax.ShapeDtypeStruct((B, H, nQ * R), jnp.float32),
        ],
        compiler_params=compiler_params(warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="sparse_prefill",
    )(ids, count, q, k_HND, v_HND)
    o = o.reshape(B, H, nQ, tq, gp, D)[:, :, :, :block_q, :G].reshape(B, H, nQ * block_q, G, D)
    lse = lse.reshape(B, H, nQ, tq, gp)[:, :, :, :block_q, :G].reshape(B, H, nQ * block_q, G)
    return o[:, :, :T], lse[:, :, :T]


@functools.partial(jax.jit, static_argnames=_STATIC)
def sparse_prefill_ref(
    q_BHTGD: jax.Array,
    k_HND: jax.Array,
    v_HND: jax.Array,
    block_ids: jax.Array,
    block_count: jax.Array,
    *,
    n_fixed: int,
    fixed_pad: int,
    n_clustered: int,
    block_q: int,
    block_k: int = 16,
    blocks_per_step: int = 4,
    block_rows: int | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `sparse_prefill` (same signature; tiling arguments are ignored)."""
    del block_rows, interpret, num_warps, num_stages
    _check_inputs(q_BHTGD, k_HND, v_HND, block_ids, block_count, n_fixed, fixed_pad, n_clustered,
                  block_q, block_k, blocks_per_step)
    T, D = q_BHTGD.shape[2], q_BHTGD.shape[4]
    n_blocks = k_HND.shape[1] // block_k
    ids = jnp.clip(block_ids.astype(jnp.int32), 0, n_blocks - 1)
    pos_BHQK, ok_BHQK = selected_positions(ids, block_count.astype(jnp.int32), block_k, n_fixed, fixed_pad,
                                           n_clustered)
    qblock_T = jnp.arange(T) // block_q
    pos_BHTK, ok_BHTK = pos_BHQK[:, :, qblock_T], ok_BHQK[:, :, qblock_T]
    s = default_scale(D, scale)

    def one_token(q_GD, k_ND, v_ND, pos_K, ok_K):
        return masked_attention_ref(q_GD, k_ND[pos_K], v_ND[pos_K], ok_K, s)

    per_head = jax.vmap(one_token, in_axes=(0, None, None, 0, 0))  # over T
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0))  # over H
    out, lse = jax.vmap(per_batch, in_axes=(0, None, None, 0, 0))(q_BHTGD, k_HND, v_HND, pos_BHTK, ok_BHTK)
    return out.astype(q_BHTGD.dtype), lse
