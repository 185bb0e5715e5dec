"""Vertical-slash causal prefill attention: key ranges plus gathered key columns (Pallas, Triton backend).

Per block of `block_q` queries the index lists
- contiguous key ranges `[range_start, range_end)` (`range_count` of them, disjoint): the slash
  diagonals of the pattern merged into ranges; each is walked in tiles of `block_k` keys that may start
  anywhere (not aligned to `block_k`), the last tile of the sequence is shifted back to stay in bounds
  and the keys outside the range are masked;
- single key columns `column_index` (`column_count` of them, not inside any range): the verticals,
  gathered `block_k` rows at a time.
Every tile is masked `key <= query` and to its range, so any index is causal by construction. As in
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
    rs_ref,
    re_ref,
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
    """One (KV head, batch row, query tile) program: ranges tile by tile, then columns by row gather."""
    rows, D = q_ref.shape
    program = n_programs - 1 - pl.program_id(2)  # heaviest (latest) query tiles first
    q_pos = query_tile_positions(program, block_q=block_q, rows=rows, heads=heads)
    n_ranges = meta_ref[0]
    n_cols = meta_ref[1]
    q = q_ref[...]
    iota_k = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

    def range_body(r, carry):
        start = rs_ref[r]
        end = re_ref[r]

        def tile_body(j, carry):
            t = start + j * block_k
            t_load = jnp.minimum(t, t_keys - block_k)  # stay in bounds; keys before t are masked
            k = k_ref[pl.ds(t_load, block_k), :]
            v = v_ref[pl.ds(t_load, block_k), :]
            k_pos = t_load + iota_k
            in_range = (k_pos >= t) & (k_pos < end)
            mask = in_range[None, :] & (k_pos[None, :] <= q_pos[:, None])
            return flash_update(q, k, v, mask, carry, qk_scale)

        n_tiles = lax.div(jnp.maximum(end - start, 0) + (block_k - 1), block_k)
        return lax.fori_loop(0, n_tiles, tile_body, carry)

    def column_body(j, carry):
        first = pl.multiple_of(j * block_k, block_k)
        cols = col_ref[pl.ds(first, block_k)]
        d = lax.broadcasted_iota(jnp.int32, (1, D), 1)
        k = plgpu.load(k_ref.at[cols[:, None], d])
        v = plgpu.load(v_ref.at[cols[:, None], d])
        listed = (first + iota_k) < n_cols
        mask = listed[None, :] & (cols[None, :] <= q_pos[:, None])
        return flash_update(q, k, v, mask, carry, qk_scale)

    carry = lax.fori_loop(0, n_ranges, range_body, flash_init(rows, D))
    carry = lax.fori_loop(0, lax.div(n_cols + (block_k - 1), block_k), column_body, carry)
    out, lse = flash_finish(carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _check_vs_index(q_BHTGD, range_start, range_end, range_count, column_index, column_count, block_q):
    B, H, T = q_BHTGD.shape[:3]
    lead = (B, H, cdiv(T, block_q))
    check_index_array("range_start", range_start, lead, 1)
    check_index_array("range_end", range_end, lead, 1)
    check_index_array("range_count", range_count, lead, 0)
    check_index_array("column_index", column_index, lead, 1)
    check_index_array("column_count", column_count, lead, 0)
    if range_start.shape != range_end.shape:
        raise ValueError(
            f"range_start and range_end must share a shape, got {range_start.shape}, {range_end.shape}"
        )
    if range_start.shape[-1] < 1 or column_index.shape[-1] < 1:
        raise ValueError(
            f"range and column capacities must be >= 1, got {range_start.shape[-1]}, {column_index.shape[-1]}"
        )
    return lead


@functools.partial(jax.jit, static_argnames=_STATIC)
def vertical_slash_prefill(
    q_BHTGD: jax.Array,
    k_BHTD: jax.Array,
    v_BHTD: jax.Array,
    range_start: jax.Array,
    range_end: jax.Array,
    range_count: jax.Array,
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
    """Causal prefill where query block i attends its key ranges and key columns.

    `q_BHTGD` (query head h*G+g uses KV head h), `k_BHTD`, `v_BHTD`. Per query block (nQ =
    ceil(T / block_q)): `range_start/range_end[B, H, nQ, Mr]` with `range_count[B, H, nQ]` key ranges
    `[start, end)`, and `column_index[B, H, nQ, Mc]` with `column_count[B, H, nQ]` key positions (in
    [0, T)); leading index dims may be broadcast. A key covered twice counts twice, so ranges must be
    disjoint and columns outside them (the MInference index builders guarantee both).
    Returns `out_BHTGD` (q's dtype) and `lse_BHTG` (float32, natural log, `-inf` where no key is seen).
    """
    check_qkv(q_BHTGD, k_BHTD, v_BHTD, block_q, block_k)
    lead = _check_vs_index(q_BHTGD, range_start, range_end, range_count, column_index, column_count, block_q)
    B, H, T, G, D = q_BHTGD.shape
    nq = lead[2]
    t_pad = nq * block_q
    t_keys = round_up(max(t_pad, block_k), block_k)
    gp, rows, tiles = tile_layout(block_q, G, block_rows)
    n_programs = nq * tiles

    mr = range_start.shape[-1]
    rs = jnp.clip(broadcast_index(range_start, lead, 1), 0, t_keys)
    re = jnp.clip(broadcast_index(range_end, lead, 1), 0, t_keys)
    n_ranges = jnp.clip(broadcast_index(range_count, lead, 0), 0, mr)
    mc = round_up(column_index.shape[-1], block_k)
    cols = pad_axis(jnp.clip(broadcast_index(column_index, lead, 1), 0, t_keys - 1), 3, mc)
    n_cols = jnp.clip(broadcast_index(column_count, lead, 0), 0, column_index.shape[-1])
    meta = jnp.stack([n_ranges, n_cols], axis=-1)

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
            pl.BlockSpec((None, None, None, 2), index_map),
            pl.BlockSpec((None, None, None, mr), index_map),
            pl.BlockSpec((None, None, None, mr), index_map),
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
    )(meta, rs, re, cols, q, k, v)
    return unpack_outputs(o, lse, q_BHTGD.shape, t_pad, gp)


@functools.partial(jax.jit, static_argnames=("seq_len",))
def vertical_slash_key_counts(
    range_start: jax.Array,
    range_end: jax.Array,
    range_count: jax.Array,
    column_index: jax.Array,
    column_count: jax.Array,
    seq_len: int,
) -> jax.Array:
    """How many times each key position is covered for each query block: int32 `[..., nQ, seq_len]`."""
    r_ok = (jnp.arange(range_start.shape[-1]) < range_count[..., None]) & (range_end > range_start)
    starts = jnp.clip(range_start, 0, seq_len)
    ends = jnp.clip(range_end, 0, seq_len)
    # +1 at each range start, -1 at its end, running sum = ranges covering a position (O(T) memory)
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
    range_start: jax.Array,
    range_end: jax.Array,
    range_count: jax.Array,
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
    lead = _check_vs_index(q_BHTGD, range_start, range_end, range_count, column_index, column_count, block_q)
    T = q_BHTGD.shape[2]
    mult = vertical_slash_key_counts(
        broadcast_index(range_start, lead, 1),
        broadcast_index(range_end, lead, 1),
        broadcast_index(range_count, lead, 0),
        broadcast_index(column_index, lead, 1),
        broadcast_index(column_count, lead, 0),
        T,
    )
    return masked_attention_ref(
        q_BHTGD, k_BHTD, v_BHTD, mult[:, :, jnp.arange(T) // block_q], jnp.arange(T), causal=True, scale=scale
    )
