"""Vertical-slash causal prefill attention: key tiles plus gathered key columns (Pallas, Triton backend).

Per block of `block_q` queries the index lists
- key tiles `[tile_start, tile_end)` of at most `block_k` contiguous keys (`tile_count` of them,
  disjoint): the slash diagonals of the pattern merged into ranges and cut into tiles. Tiles may start
  anywhere (not aligned to `block_k`) and are walked in flat loops, so Triton pipelines their loads:
  first the leading tiles that are full and below every query of the block, without a mask, then the
  rest, masked to their extent; a tile that would run past the end of the sequence is loaded shifted
  back and the extra keys masked;
- single key columns `column_index` (`column_count` of them, not inside any tile): the verticals,
  gathered `block_k` rows at a time.
Every tile is masked `key <= query` and to its extent, so any index is causal by construction. As in
`block_sparse`, the index is per KV head and one program holds `tokens x heads` rows of a query block, so
each K/V tile is read once for the whole GQA group; query blocks are launched heaviest first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse import (
    LOG2E,
    broadcast_index,
    check_index_array,
    check_qkv,
    default_num_warps,
    flash_finish,
    flash_init,
    flash_update,
    masked_attention_ref,
    pack_queries,
    query_tile_positions,
    scatter_counts,
    tile_layout,
    unpack_outputs,
)
from pallas_kernels.common import cdiv, compiler_params, default_scale, pad_axis, resolve_interpret, round_up

_STATIC = ("block_q", "block_k", "scale", "block_rows", "interpret", "num_warps", "num_stages")


def _vertical_slash_kernel(
    meta_ref,
    ts_ref,
    te_ref,
    col_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    block_q: int,
    block_k: int,
    heads: int,
    n_programs: int,
    qk_scale: float,
    t_keys: int,
):
    """One (KV head, batch row, query tile) program: key tiles, then columns by row gather."""
    rows, D = q_ref.shape
    program = n_programs - 1 - pl.program_id(2)  # heaviest (latest) query tiles first
    q_pos = query_tile_positions(program, block_q=block_q, rows=rows, heads=heads)
    n_tiles = meta_ref[0]
    n_cols = meta_ref[1]
    n_unmasked = meta_ref[2]
    q = q_ref[...]
    iota_k = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def full_tile_body(j, carry):  # block_k keys, all visible to every row: no mask
        start = ts_ref[j]
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        return flash_update(q, k, v, None, carry, qk_scale)

    def tile_body(j, carry):
        start = ts_ref[j]
        end = te_ref[j]
        t_load = jnp.minimum(start, t_keys - block_k)  # stay in bounds; keys before `start` are masked
        k = k_ref[pl.ds(t_load, block_k), :]
        v = v_ref[pl.ds(t_load, block_k), :]
        k_pos = t_load + iota_k
        in_tile = (k_pos >= start) & (k_pos < end)
        mask = in_tile[None, :] & (k_pos[None, :] <= q_pos[:, None])
        return flash_update(q, k, v, mask, carry, qk_scale)

    def column_body(j, carry):
        first = pl.multiple_of(j * block_k, block_k)
        cols = col_ref[pl.ds(first, block_k)]
        d = lax.broadcasted_iota(jnp.int32, (1, D), 1)
        k = plgpu.load(k_ref.at[cols[:, None], d])
        v = plgpu.load(v_ref.at[cols[:, None], d])
        listed = (first + iota_k) < n_cols
        mask = listed[None, :] & (cols[None, :] <= q_pos[:, None])
        return flash_update(q, k, v, mask, carry, qk_scale)

    carry = lax.fori_loop(0, n_unmasked, full_tile_body, flash_init(rows, D))
    carry = lax.fori_loop(n_unmasked, n_tiles, tile_body, carry)
    carry = lax.fori_loop(0, lax.div(n_cols + (block_k - 1), block_k), column_body, carry)
    out, lse = flash_finish(carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def full_prefix(
    ts: jax.Array, te: jax.Array, count: jax.Array, *, block_q: int, block_k: int, t_keys: int
) -> jax.Array:
    """Leading tiles (`[..., nQ, Mt]`) that are `block_k` wide, in bounds and below every row of their
    query block: the kernel walks them without a mask (the builders list such tiles first)."""
    q_first = (jnp.arange(ts.shape[-2], dtype=jnp.int32) * block_q)[:, None]
    ok = (te - ts == block_k) & (ts + block_k - 1 <= q_first) & (ts <= t_keys - block_k)
    ok &= jnp.arange(ts.shape[-1]) < count[..., None]
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def _check_vs_index(q_BHTGD, tile_start, tile_end, tile_count, column_index, column_count, block_q):
    B, H, T = q_BHTGD.shape[:3]
    lead = (B, H, cdiv(T, block_q))
    check_index_array("tile_start", tile_start, lead, 1)
    check_index_array("tile_end", tile_end, lead, 1)
    check_index_array("tile_count", tile_count, lead, 0)
    check_index_array("column_index", column_index, lead, 1)
    check_index_array("column_count", column_count, lead, 0)
    if tile_start.shape != tile_end.shape:
        raise ValueError(
            f"tile_start and tile_end must share a shape, got {tile_start.shape}, {tile_end.shape}"
        )
    if tile_start.shape[-1] < 1 or column_index.shape[-1] < 1:
        raise ValueError(
            f"tile and column capacities must be >= 1, got {tile_start.shape[-1]}, {column_index.shape[-1]}"
        )
    return lead


@functools.partial(jax.jit, static_argnames=_STATIC)
def vertical_slash_prefill(
    q_BHTGD: jax.Array,
    k_BHTD: jax.Array,
    v_BHTD: jax.Array,
    tile_start: jax.Array,
    tile_end: jax.Array,
    tile_count: jax.Array,
    column_index: jax.Array,
    column_count: jax.Array,
    *,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Causal prefill where query block i attends its key tiles and key columns.

    `q_BHTGD` (query head h*G+g uses KV head h), `k_BHTD`, `v_BHTD`. Per query block (nQ =
    ceil(T / block_q)): `tile_start/tile_end[B, H, nQ, Mt]` with `tile_count[B, H, nQ]` key tiles
    `[start, min(end, start + block_k))`, and `column_index[B, H, nQ, Mc]` with `column_count[B, H, nQ]`
    key positions (in [0, T)); leading index dims may be broadcast. A key covered twice counts twice,
    so tiles must be disjoint and columns outside them (the MInference index builders guarantee both).
    Returns `out_BHTGD` (q's dtype) and `lse_BHTG` (float32, natural log, `-inf` where no key is seen).
    """
    check_qkv(q_BHTGD, k_BHTD, v_BHTD, block_q, block_k)
    lead = _check_vs_index(q_BHTGD, tile_start, tile_end, tile_count, column_index, column_count, block_q)
    B, H, T, G, D = q_BHTGD.shape
    nq = lead[2]
    t_pad = nq * block_q
    t_keys = round_up(max(t_pad, block_k), block_k)
    gp, rows, tiles = tile_layout(block_q, G, block_rows)
    n_programs = nq * tiles

    mt = tile_start.shape[-1]
    ts = jnp.clip(broadcast_index(tile_start, lead, 1), 0, t_keys)
    te = jnp.clip(broadcast_index(tile_end, lead, 1), ts, ts + block_k)
    n_tiles = jnp.clip(broadcast_index(tile_count, lead, 0), 0, mt)
    mc = round_up(column_index.shape[-1], block_k)
    cols = pad_axis(jnp.clip(broadcast_index(column_index, lead, 1), 0, t_keys - 1), 3, mc)
    n_cols = jnp.clip(broadcast_index(column_count, lead, 0), 0, column_index.shape[-1])
    meta = jnp.stack(
        [
            n_tiles,
            n_cols,
            full_prefix(ts, te, n_tiles, block_q=block_q, block_k=block_k, t_keys=t_keys),
            jnp.zeros_like(n_tiles),
        ],
        axis=-1,
    )

    q = pack_queries(q_BHTGD, t_pad, gp)
    k = pad_axis(k_BHTD, 2, t_keys)
    v = pad_axis(v_BHTD, 2, t_keys)
    kernel = functools.partial(
        _vertical_slash_kernel,
        block_q=block_q,
        block_k=block_k,
        heads=gp,
        n_programs=n_programs,
        qk_scale=default_scale(D, scale) * LOG2E,
        t_keys=t_keys,
    )
    last = n_programs - 1
    index_map = lambda h, b, p: (b, h, (last - p) // tiles, 0)
    o, lse = pl.pallas_call(
        kernel,
        grid=(H, B, n_programs),
        in_specs=[
            pl.BlockSpec((None, None, None, 4), index_map),
            pl.BlockSpec((None, None, None, mt), index_map),
            pl.BlockSpec((None, None, None, mt), index_map),
            pl.BlockSpec((None, None, None, mc), index_map),
            pl.BlockSpec((None, None, rows, D), lambda h, b, p: (b, h, last - p, 0)),
            pl.BlockSpec((None, None, t_keys, D), lambda h, b, p: (b, h, 0, 0)),
            pl.BlockSpec((None, None, t_keys, D), lambda h, b, p: (b, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, D), lambda h, b, p: (b, h, last - p, 0)),
            pl.BlockSpec((None, None, rows), lambda h, b, p: (b, h, last - p)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, H, t_pad * gp, D), q_BHTGD.dtype),
            jax.ShapeDtypeStruct((B, H, t_pad * gp), jnp.float32),
        ],
        compiler_params=compiler_params(default_num_warps(rows, D, num_warps), num_stages),
        interpret=resolve_interpret(interpret),
        name="vertical_slash_prefill",
    )(meta, ts, te, cols, q, k, v)
    return unpack_outputs(o, lse, q_BHTGD.shape, t_pad, gp)


@functools.partial(jax.jit, static_argnames=("seq_len", "block_k"))
def vertical_slash_key_counts(
    tile_start: jax.Array,
    tile_end: jax.Array,
    tile_count: jax.Array,
    column_index: jax.Array,
    column_count: jax.Array,
    seq_len: int,
    *,
    block_k: int = 64,
) -> jax.Array:
    """How many times each key position is covered for each query block: int32 `[..., nQ, seq_len]`."""
    starts = jnp.clip(tile_start, 0, seq_len)
    ends = jnp.clip(jnp.minimum(tile_end, tile_start + block_k), starts, seq_len)
    r_ok = (jnp.arange(tile_start.shape[-1]) < tile_count[..., None]) & (ends > starts)
    # +1 at each tile start, -1 at its end, running sum = tiles covering a position (O(T) memory)
    diff = scatter_counts(
        jnp.concatenate([starts, ends], axis=-1),
        jnp.concatenate([r_ok, -r_ok.astype(jnp.int32)], axis=-1),
        seq_len + 1,
    )
    c_ok = jnp.arange(column_index.shape[-1]) < column_count[..., None]
    return jnp.cumsum(diff, axis=-1)[..., :seq_len] + scatter_counts(column_index, c_ok, seq_len)


@functools.partial(jax.jit, static_argnames=_STATIC)
def vertical_slash_prefill_ref(
    q_BHTGD: jax.Array,
    k_BHTD: jax.Array,
    v_BHTD: jax.Array,
    tile_start: jax.Array,
    tile_end: jax.Array,
    tile_count: jax.Array,
    column_index: jax.Array,
    column_count: jax.Array,
    *,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `vertical_slash_prefill` (same signature; tiling arguments are ignored)."""
    del block_rows, interpret, num_warps, num_stages
    check_qkv(q_BHTGD, k_BHTD, v_BHTD, block_q, block_k)
    lead = _check_vs_index(q_BHTGD, tile_start, tile_end, tile_count, column_index, column_count, block_q)
    T = q_BHTGD.shape[2]
    mult = vertical_slash_key_counts(
        broadcast_index(tile_start, lead, 1),
        broadcast_index(tile_end, lead, 1),
        broadcast_index(tile_count, lead, 0),
        broadcast_index(column_index, lead, 1),
        broadcast_index(column_count, lead, 0),
        T,
        block_k=block_k,
    )
    return masked_attention_ref(
        q_BHTGD, k_BHTD, v_BHTD, mult[:, :, jnp.arange(T) // block_q], jnp.arange(T), causal=True, scale=scale
    )
