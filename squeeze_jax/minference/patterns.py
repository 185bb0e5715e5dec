"""Online sparse-index builders for MInference prefill (jit-able, static budgets) and numpy references.

Three per-head patterns, each turned into the compact index its kernel walks:
- **vertical-slash** (`vertical_slash_index`): the last `last_q` queries estimate which key columns
  ("verticals") and which query-key offsets ("slashes") carry attention mass; per block of `block_q`
  queries the slashes become disjoint contiguous key ranges, cut into tiles of `block_k` keys, and the
  verticals not already inside a range become gathered columns (`VerticalSlashIndex`, for
  `pallas_kernels.vertical_slash`).
- **block-sparse** (`block_sparse_index`): mean-pooled blocks score each other; the top key blocks per
  query block, diagonal always kept (`BlockSparseIndex`, for `pallas_kernels.block_sparse`).
- **A-shape** (`a_shape_index`): sinks plus a local window, as a block-sparse index.

Granularity: **one index per KV head**. The estimates sum softmax probabilities over the G query heads of
the group (each head's row sums to one, so every head weighs the same), so a key any head of the group
needs scores high; the kernels then process the whole group in one tile and read each K/V tile once.
For per-query-head indexes, call the builders on `q.reshape(B, H*G, T, 1, D)` with K/V repeated G times.

Budgets (`n_vertical`, `n_slash`, `top_k_blocks`) are static, so index capacities are static and every
builder jits without host syncs; `*_count` arrays say how many entries are valid.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

INT_MAX = np.iinfo(np.int32).max


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def _scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check_pos(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_pow2_block(name: str, value: int) -> None:
    _check_pos(name, value)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")


# ----------------------------------------------------------------------------------------------------
# Index containers
# ----------------------------------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["block_ids", "block_count"],
    meta_fields=["block_q", "block_k", "seq_len"],
)
@dataclasses.dataclass(frozen=True)
class BlockSparseIndex:
    """Key blocks per query block: `block_ids[..., nQ, M]` ascending, padded with the last valid id;
    `block_count[..., nQ]` (>= 1) valid entries. Leading dims are `[B, H]` or absent (shared by all)."""

    block_ids: jax.Array
    block_count: jax.Array
    block_q: int
    block_k: int
    seq_len: int


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["tile_start", "tile_end", "tile_count", "column_index", "column_count"],
    meta_fields=["block_q", "block_k", "seq_len"],
)
@dataclasses.dataclass(frozen=True)
class VerticalSlashIndex:
    """Per query block: key tiles `[tile_start, tile_end)` of at most `block_k` keys (`[..., nQ, Mt]`,
    disjoint, `tile_count[..., nQ]` valid; the slash ranges cut into tiles, full tiles below the block's
    first query first, each group ascending) and key
    columns `column_index[..., nQ, Mc]` outside every tile (ascending, `column_count[..., nQ]` valid;
    `Mc` is a multiple of `block_k`). Padding entries are 0."""

    tile_start: jax.Array
    tile_end: jax.Array
    tile_count: jax.Array
    column_index: jax.Array
    column_count: jax.Array
    block_q: int
    block_k: int
    seq_len: int


# ----------------------------------------------------------------------------------------------------
# Vertical-slash
# ----------------------------------------------------------------------------------------------------


def _check_q_k(q: jax.Array, k: jax.Array, q_name: str) -> None:
    if q.ndim != 5:
        raise ValueError(f"{q_name} must be [B, H, T, G, D], got shape {q.shape}")
    if k.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[4]:
        raise ValueError(f"k must be [B, H, T, D] matching {q_name} {q.shape} in B, H, D; got {k.shape}")
    if k.shape[2] < 1 or q.shape[2] < 1:
        raise ValueError(f"need at least one query and one key, got {q_name} {q.shape}, k {k.shape}")


def _diagonal_sums(a_NRT: jax.Array) -> jax.Array:
    """`out[n, o] = sum_r a[n, r, T - R + r - o]` (row r is query position T - R + r), o in [0, T).

    A shear without gathers: flip the key axis, pad R zeros, and re-read the flat rows with stride
    `T + R - 1` so that row r moves left by `R - 1 - r`.
    """
    N, R, T = a_NRT.shape
    w = T + R
    f = jnp.pad(jnp.flip(a_NRT, axis=-1), ((0, 0), (0, 0), (0, R)))
    flat = f.reshape(N, R * w)[:, R - 1 : R - 1 + R * (w - 1)]
    return jnp.sum(flat.reshape(N, R, w - 1)[:, :, :T], axis=1)


@functools.partial(jax.jit, static_argnames=("last_q", "scale"))
def vertical_slash_scores(
    q_last: jax.Array,
    k: jax.Array,
    n_valid: jax.Array | None = None,
    *,
    last_q: int = 64,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Estimated attention mass per key column and per query-key offset, from the last queries.

    `q_last[B, H, Lq, G, D]` are the queries of the *last* Lq prompt positions (the full q is fine);
    the last `min(last_q, Lq)` are used. `softmax(Q_last K^T * scale)` with the causal corner masked is
    summed over the G heads of each KV group. Returns `vertical[B, H, T]` (column sums) and
    `slash[B, H, T]` (sums along each offset o = query - key), float32.

    Right-padded rows: with `n_valid[B]` (tokens of each row, q must then be the full `[B, H, T, G, D]`)
    the estimate uses the last `last_q` *valid* queries of each row and ignores keys past them.
    """
    _check_q_k(q_last, k, "q_last")
    _check_pos("last_q", last_q)
    B, H, Lq, G, D = q_last.shape
    T = k.shape[2]
    if n_valid is not None:
        if Lq != T or n_valid.shape != (B,):
            raise ValueError(f"with n_valid[B], q must be the full [B, H, T, G, D]; got q {q_last.shape}, "
                             f"k {k.shape}, n_valid {n_valid.shape}")
        return _vs_scores_padded(q_last, k, n_valid.astype(jnp.int32), min(last_q, T), _scale(D, scale))
    R = min(last_q, Lq, T)
    q = q_last[:, :, Lq - R :]
    s = jnp.einsum("bhrgd,bhtd->bhgrt", q, k, preferred_element_type=jnp.float32) * _scale(D, scale)
    visible = jnp.arange(T)[None, :] <= (T - R + jnp.arange(R))[:, None]
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    a = jnp.sum(p, axis=2)  # [B, H, R, T]
    vertical = jnp.sum(a, axis=2)
    slash = _diagonal_sums(a.reshape(B * H, R, T)).reshape(B, H, T)
    return vertical, slash


def _vs_scores_padded(
    q: jax.Array, k: jax.Array, n_B: jax.Array, R: int, scale: float
) -> tuple[jax.Array, jax.Array]:
    """`vertical_slash_scores` for right-padded rows: row r of batch b is query position `n_B[b] - R + r`."""
    B, H, T, G, D = q.shape
    pos_BR = n_B[:, None] - R + jnp.arange(R, dtype=jnp.int32)[None, :]
    ok_BR = pos_BR >= 0
    rows = jnp.take_along_axis(q, jnp.maximum(pos_BR, 0)[:, None, :, None, None], axis=2)
    s = jnp.einsum("bhrgd,bhtd->bhgrt", rows, k, preferred_element_type=jnp.float32) * scale
    visible_BRT = jnp.arange(T)[None, None, :] <= pos_BR[:, :, None]
    p = jax.nn.softmax(jnp.where(visible_BRT[:, None, None], s, -jnp.inf), axis=-1)
    a = jnp.sum(jnp.where(ok_BR[:, None, None, :, None], p, 0.0), axis=2)  # [B, H, R, T]
    vertical = jnp.sum(a, axis=2)
    sheared = _diagonal_sums(a.reshape(B * H, R, T)).reshape(B, H, T)  # offsets as if row r sat at T - R + r
    src_BT = jnp.arange(T)[None, :] + (T - n_B)[:, None]
    slash = jnp.where(src_BT[:, None] < T, jnp.take_along_axis(sheared, jnp.minimum(src_BT, T - 1)[:, None], 2), 0.0)
    return vertical, slash


def _check_vs_budgets(n_vertical: int, n_slash: int, n_sink_cols: int, n_local_diags: int) -> None:
    _check_pos("n_vertical", n_vertical)
    _check_pos("n_slash", n_slash)
    _check_pos("n_sink_cols", n_sink_cols, 0)
    _check_pos("n_local_diags", n_local_diags, 1)  # the main diagonal is always kept
    if n_sink_cols > n_vertical:
        raise ValueError(f"n_vertical ({n_vertical}) must be >= n_sink_cols ({n_sink_cols})")
    if n_local_diags > n_slash:
        raise ValueError(f"n_slash ({n_slash}) must be >= n_local_diags ({n_local_diags})")


@functools.partial(
    jax.jit, static_argnames=("n_vertical", "n_slash", "n_sink_cols", "n_local_diags", "min_mass")
)
def select_vertical_slash(
    vertical: jax.Array,
    slash: jax.Array,
    *,
    n_vertical: int,
    n_slash: int,
    n_sink_cols: int = 30,
    n_local_diags: int = 100,
    min_mass: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Top columns and offsets with the first `n_sink_cols` columns and offsets `[0, n_local_diags)`
    forced in. Returns `columns[..., min(n_vertical, T)]` ascending and `offsets[..., min(n_slash, T)]`
    descending (int32), the order `vertical_slash_index_from_selection` expects.

    `min_mass > 0` also drops (non-forced) picks holding less than that share of the estimated mass: the
    budget becomes a capacity and a head with little structure gets a cheap index. Dropped entries read
    T (a column or offset that selects nothing) and sort last (columns) / first (offsets).
    """
    _check_vs_budgets(n_vertical, n_slash, n_sink_cols, n_local_diags)
    if vertical.shape != slash.shape:
        raise ValueError(f"vertical and slash scores must share a shape, got {vertical.shape}, {slash.shape}")
    if not 0.0 <= min_mass < 1.0:
        raise ValueError(f"min_mass must be in [0, 1), got {min_mass}")
    T = vertical.shape[-1]
    v = vertical.astype(jnp.float32).at[..., : min(n_sink_cols, T)].set(jnp.inf)
    s = slash.astype(jnp.float32).at[..., : min(n_local_diags, T)].set(jnp.inf)
    v_val, cols = lax.top_k(v, min(n_vertical, T))
    s_val, offs = lax.top_k(s, min(n_slash, T))
    cols, offs = cols.astype(jnp.int32), offs.astype(jnp.int32)
    if min_mass > 0.0:
        total = jnp.sum(vertical.astype(jnp.float32), axis=-1, keepdims=True)
        cols = jnp.where(v_val >= min_mass * total, cols, T)
        offs = jnp.where(s_val >= min_mass * total, offs, T)
    return jnp.sort(cols, axis=-1), -jnp.sort(-offs, axis=-1)


@functools.partial(jax.jit, static_argnames=("cap_vertical", "cap_slash"))
def select_vertical_slash_budgets(
    vertical: jax.Array,
    slash: jax.Array,
    n_vertical: jax.Array,
    n_slash: jax.Array,
    n_sink_cols: jax.Array,
    n_local_diags: jax.Array,
    *,
    cap_vertical: int,
    cap_slash: int,
) -> tuple[jax.Array, jax.Array]:
    """`select_vertical_slash` with per-row (traced) budgets under static capacities.

    The four budget arrays broadcast to `vertical.shape[:-1]` (e.g. `[B, H]` from per-head values). Row i
    forces columns `[0, n_sink_cols[i])` and offsets `[0, n_local_diags[i])` (each capped at its budget)
    and keeps the `n_vertical[i]` / `n_slash[i]` best; the other capacity slots read T (select nothing),
    so an A-shape head is `n_vertical = n_sink_cols` sinks and `n_slash = n_local_diags` local diagonals.
    """
    _check_pos("cap_vertical", cap_vertical)
    _check_pos("cap_slash", cap_slash)
    if vertical.shape != slash.shape:
        raise ValueError(f"vertical and slash scores must share a shape, got {vertical.shape}, {slash.shape}")
    lead, T = vertical.shape[:-1], vertical.shape[-1]
    budget = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.int32), lead)[..., None]
    n_v, n_s = budget(n_vertical), budget(n_slash)
    f_v, f_s = jnp.minimum(budget(n_sink_cols), n_v), jnp.minimum(budget(n_local_diags), n_s)
    pos = jnp.arange(T, dtype=jnp.int32)
    v = jnp.where(pos < f_v, jnp.inf, vertical.astype(jnp.float32))
    s = jnp.where(pos < f_s, jnp.inf, slash.astype(jnp.float32))
    _, cols = lax.top_k(v, min(cap_vertical, T))
    _, offs = lax.top_k(s, min(cap_slash, T))
    cols = jnp.where(jnp.arange(cols.shape[-1]) < n_v, cols.astype(jnp.int32), T)
    offs = jnp.where(jnp.arange(offs.shape[-1]) < n_s, offs.astype(jnp.int32), T)
    return jnp.sort(cols, axis=-1), -jnp.sort(-offs, axis=-1)


def vs_capacities(
    n_columns: int, n_offsets: int, seq_len: int, block_q: int, block_k: int
) -> tuple[int, int, int]:
    """Static (merged-range, tile, column) capacities of a vertical-slash index.

    Merged ranges are disjoint and non-adjacent inside [0, T): at most ceil(T / 2) of them and at most
    one per offset. A merged range of m slashes is at most m * block_q wide, so the tiles are at most
    `n_offsets * ceil(block_q / block_k)`, and at most one partial tile per range beyond T / block_k.
    Columns are at most the selected ones, rounded up to `block_k`.
    """
    cap_r = max(1, min(n_offsets, (seq_len + 1) // 2))
    cap_t = max(1, min(n_offsets * _cdiv(block_q, block_k), _cdiv(seq_len, block_k) + cap_r))
    return cap_r, cap_t, _round_up(max(1, min(n_columns, seq_len)), block_k)


def ranges_to_tiles(
    start: jax.Array, end: jax.Array, count: jax.Array, capacity: int, block_k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Cuts ranges `[start, end)` (`[..., M]`, `count` valid) into consecutive tiles of `block_k` keys.

    Returns `tile_start, tile_end [..., capacity]` and `tile_count [...]` (0-padded): range r owns the
    tile slots from the exclusive running sum of tiles per range, filled by a scatter + running max.
    """
    lead, M = start.shape[:-1], start.shape[-1]
    ok = jnp.arange(M) < count[..., None]
    n_t = jnp.where(ok, (jnp.maximum(end - start, 0) + block_k - 1) // block_k, 0).reshape(-1, M)
    first = jnp.cumsum(n_t, axis=-1) - n_t
    rows = jnp.arange(n_t.shape[0])[:, None]
    slot_of = jnp.where(n_t > 0, first, capacity)
    owner = (
        jnp.full((n_t.shape[0], capacity), -1, jnp.int32)
        .at[rows, slot_of]
        .max(jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), n_t.shape), mode="drop")
    )
    owner = jnp.maximum(lax.cummax(owner, axis=1), 0)
    total = jnp.sum(n_t, axis=-1)
    s2, e2 = start.reshape(-1, M), end.reshape(-1, M)
    t_start = (
        jnp.take_along_axis(s2, owner, axis=1)
        + (jnp.arange(capacity) - jnp.take_along_axis(first, owner, axis=1)) * block_k
    )
    t_end = jnp.minimum(t_start + block_k, jnp.take_along_axis(e2, owner, axis=1))
    live = jnp.arange(capacity) < total[:, None]
    shape = lambda x: x.reshape(*lead, capacity)
    return (
        shape(jnp.where(live, t_start, 0)),
        shape(jnp.where(live, t_end, 0)),
        total.reshape(lead).astype(jnp.int32),
    )


def _compact(values: jax.Array, slot: jax.Array, capacity: int, op: str = "set") -> jax.Array:
    """Scatter `values[N, Q, K]` to `out[N, Q, capacity]` at `slot` (slots >= capacity are dropped)."""
    N, Q, _ = values.shape
    n = jnp.arange(N)[:, None, None]
    q = jnp.arange(Q)[None, :, None]
    out = jnp.zeros((N, Q, capacity), jnp.int32).at[n, q, slot]
    return out.set(values, mode="drop") if op == "set" else out.max(values, mode="drop")


def _full_tiles_first(
    ts: jax.Array, te: jax.Array, count: jax.Array, q0: jax.Array, block_k: int
) -> tuple[jax.Array, jax.Array]:
    """Reorders tiles `[N, nQ, Mt]`: full tiles (`block_k` keys, all before the block's first query) first,
    then the rest (partial or crossing the diagonal), each group ascending, so the kernel can walk the
    first group without masks."""
    cap = ts.shape[-1]
    live = jnp.arange(cap) < count[..., None]
    full = live & (te - ts == block_k) & (ts + block_k - 1 <= q0)
    rest = live & ~full
    n_full = jnp.sum(full, axis=-1, keepdims=True, dtype=jnp.int32)
    slot = jnp.where(
        full,
        jnp.cumsum(full, axis=-1, dtype=jnp.int32) - 1,
        jnp.where(rest, n_full + jnp.cumsum(rest, axis=-1, dtype=jnp.int32) - 1, cap),
    )
    return _compact(ts, slot, cap), _compact(te, slot, cap)


@functools.partial(jax.jit, static_argnames=("seq_len", "block_q", "block_k"))
def vertical_slash_index_from_selection(
    columns: jax.Array, offsets: jax.Array, seq_len: int, *, block_q: int = 64, block_k: int = 64
) -> VerticalSlashIndex:
    """Compact per-query-block index from selected columns (ascending) and offsets (descending).

    For query block [q0, q1) an offset o covers keys [max(q0 - o, 0), q1 - o); these ranges come in
    ascending start order for every block, so merging is a running max of their ends (one pass, no sort).
    A column is kept for a block if some row can see it (< q1) and no merged range holds it. The merged
    ranges are then cut into `block_k`-key tiles, the unit the kernel walks in a flat (pipelined) loop;
    full tiles below the block's first query come first (the kernel needs no mask for them).
    """
    _check_pow2_block("block_q", block_q)
    _check_pow2_block("block_k", block_k)
    _check_pos("seq_len", seq_len)
    if columns.shape[:-1] != offsets.shape[:-1]:
        raise ValueError(
            f"columns and offsets need the same leading dims, got {columns.shape}, {offsets.shape}"
        )
    lead = columns.shape[:-1]
    cols = columns.astype(jnp.int32).reshape(-1, columns.shape[-1])
    offs = offsets.astype(jnp.int32).reshape(-1, offsets.shape[-1])
    N = cols.shape[0]
    nq = _cdiv(seq_len, block_q)
    cap_r, cap_t, cap_c = vs_capacities(cols.shape[-1], offs.shape[-1], seq_len, block_q, block_k)

    q0 = (jnp.arange(nq, dtype=jnp.int32) * block_q)[None, :, None]
    q1 = jnp.minimum(q0 + block_q, seq_len)
    o = offs[:, None, :]
    start = jnp.maximum(q0 - o, 0)
    end = q1 - o
    valid = end > 0
    end_m = jnp.where(valid, end, -1)
    run = lax.cummax(end_m, axis=2)
    prev = jnp.concatenate([jnp.full((N, nq, 1), -1, jnp.int32), run[:, :, :-1]], axis=2)
    new = valid & (start > prev)
    seg = jnp.cumsum(new, axis=2, dtype=jnp.int32) - 1
    range_count = jnp.sum(new, axis=2, dtype=jnp.int32)
    range_start = _compact(start, jnp.where(new, seg, cap_r), cap_r)
    range_end = _compact(end_m, jnp.where(valid, seg, cap_r), cap_r, op="max")

    c = jnp.broadcast_to(cols[:, None, :], (N, nq, cols.shape[-1]))
    slots = jnp.arange(cap_r, dtype=jnp.int32)
    starts_sorted = jnp.where(slots < range_count[..., None], range_start, INT_MAX)
    search = jax.vmap(jax.vmap(functools.partial(jnp.searchsorted, side="right")))
    r = search(starts_sorted, c) - 1
    end_at = jnp.take_along_axis(range_end, jnp.maximum(r, 0), axis=2)
    covered = (r >= 0) & (c < end_at)
    keep = (c < q1) & ~covered
    column_count = jnp.sum(keep, axis=2, dtype=jnp.int32)
    slot_c = jnp.where(keep, jnp.cumsum(keep, axis=2, dtype=jnp.int32) - 1, cap_c)
    column_index = _compact(c, slot_c, cap_c)
    tile_start, tile_end, tile_count = ranges_to_tiles(range_start, range_end, range_count, cap_t, block_k)
    tile_start, tile_end = _full_tiles_first(tile_start, tile_end, tile_count, q0, block_k)

    shape = lambda x: x.reshape(*lead, nq, *x.shape[2:])
    return VerticalSlashIndex(
        tile_start=shape(tile_start),
        tile_end=shape(tile_end),
        tile_count=shape(tile_count),
        column_index=shape(column_index),
        column_count=shape(column_count),
        block_q=block_q,
        block_k=block_k,
        seq_len=seq_len,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "n_vertical",
        "n_slash",
        "last_q",
        "n_sink_cols",
        "n_local_diags",
        "block_q",
        "block_k",
        "scale",
        "min_mass",
    ),
)
def vertical_slash_index(
    q_last: jax.Array,
    k: jax.Array,
    *,
    n_vertical: int,
    n_slash: int,
    last_q: int = 64,
    n_sink_cols: int = 30,
    n_local_diags: int = 100,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    min_mass: float = 0.0,
) -> VerticalSlashIndex:
    """Vertical-slash index of a prompt from its last queries (`q_last[B, H, Lq, G, D]`, last positions)
    and all keys `k[B, H, T, D]`: estimate, select with forced sinks/local diagonals (and the optional
    `min_mass` floor, see `select_vertical_slash`), compact."""
    _check_vs_budgets(n_vertical, n_slash, n_sink_cols, n_local_diags)
    vertical, slash = vertical_slash_scores(q_last, k, last_q=last_q, scale=scale)
    cols, offs = select_vertical_slash(
        vertical,
        slash,
        n_vertical=n_vertical,
        n_slash=n_slash,
        n_sink_cols=n_sink_cols,
        n_local_diags=n_local_diags,
        min_mass=min_mass,
    )
    return vertical_slash_index_from_selection(cols, offs, k.shape[2], block_q=block_q, block_k=block_k)


# ----------------------------------------------------------------------------------------------------
# Block-sparse and A-shape
# ----------------------------------------------------------------------------------------------------


def _pool_blocks(x: jax.Array, block: int, axis: int) -> jax.Array:
    """Mean over aligned blocks of `block` tokens along `axis` (the last block averages its real tokens)."""
    T = x.shape[axis]
    nb = _cdiv(T, block)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, nb * block - T)
    xs = jnp.pad(x.astype(jnp.float32), pad)
    xs = xs.reshape(*x.shape[:axis], nb, block, *x.shape[axis + 1 :])
    n_valid = jnp.minimum(block, T - jnp.arange(nb) * block).astype(jnp.float32)
    bshape = [1] * xs.ndim
    bshape[axis] = nb
    return jnp.sum(xs, axis=axis + 1) / n_valid.reshape(bshape[: axis + 1] + bshape[axis + 2 :])


@functools.partial(jax.jit, static_argnames=("top_k_blocks", "block", "scale"))
def block_sparse_index(
    q: jax.Array,
    k: jax.Array,
    n_blocks: jax.Array | None = None,
    *,
    top_k_blocks: int,
    block: int = 64,
    scale: float | None = None,
) -> BlockSparseIndex:
    """Top `top_k_blocks` causal key blocks per query block from mean-pooled q/k blocks (diagonal forced).

    `q[B, H, T, G, D]`, `k[B, H, T, D]`; the pooled scores are softmaxed over the causal key blocks per
    query head and summed over the G heads of the group. Capacity `min(top_k_blocks, nB)`; counts are
    `min(top_k_blocks, i + 1)` for query block i. Optional traced `n_blocks` (broadcasting to `[B, H]`,
    each in [1, top_k_blocks]) keeps fewer blocks per head under the same static capacity.
    """
    _check_q_k(q, k, "q")
    _check_pos("top_k_blocks", top_k_blocks)
    _check_pow2_block("block", block)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same length T, got {q.shape[2]} and {k.shape[2]}")
    T, D = k.shape[2], k.shape[3]
    nb = _cdiv(T, block)
    qp = _pool_blocks(q, block, 2)  # [B, H, nB, G, D]
    kp = _pool_blocks(k, block, 2)  # [B, H, nB, D]
    s = jnp.einsum("bhigd,bhjd->bhgij", qp, kp, precision=lax.Precision.HIGHEST) * _scale(D, scale)
    causal = jnp.arange(nb)[None, :] <= jnp.arange(nb)[:, None]
    p = jnp.sum(jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1), axis=2)
    p = jnp.where(causal, p, -jnp.inf)
    p = jnp.where(jnp.eye(nb, dtype=bool), jnp.inf, p)
    kk = min(top_k_blocks, nb)
    vals, idx = lax.top_k(p, kk)
    valid = vals > -jnp.inf
    if n_blocks is not None:
        n_BH = jnp.broadcast_to(jnp.asarray(n_blocks, jnp.int32), q.shape[:2])
        valid &= jnp.arange(kk) < jnp.maximum(n_BH, 1)[:, :, None, None]
    ids = jnp.sort(jnp.where(valid, idx.astype(jnp.int32), nb), axis=-1)
    count = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(ids, count[..., None] - 1, axis=-1)
    ids = jnp.where(jnp.arange(kk) < count[..., None], ids, last)
    return BlockSparseIndex(block_ids=ids, block_count=count, block_q=block, block_k=block, seq_len=T)


def a_shape_index(seq_len: int, *, n_sink: int, n_local: int, block: int = 64) -> BlockSparseIndex:
    """Sinks + local window as a block-sparse index shared by all heads (`block_ids[nB, M]`).

    Query q needs keys `k < n_sink` and `q - n_local < k <= q`; the index lists every key block holding
    such a key for some query of the block (block granularity: a superset of the token pattern).
    """
    _check_pos("seq_len", seq_len)
    _check_pos("n_sink", n_sink, 0)
    _check_pos("n_local", n_local, 1)
    _check_pow2_block("block", block)
    nb = _cdiv(seq_len, block)
    i = np.arange(nb)
    lo = np.maximum(i * block - n_local + 1, 0) // block
    n_sink_b = np.minimum(_cdiv(n_sink, block), lo)
    count = n_sink_b + (i - lo + 1)
    cap = int(count.max())
    c = np.arange(cap)[None, :]
    ids = np.where(c < n_sink_b[:, None], c, lo[:, None] + c - n_sink_b[:, None])
    ids = np.minimum(ids, i[:, None])  # pads with the last valid id (the diagonal block)
    return BlockSparseIndex(
        block_ids=jnp.asarray(ids, jnp.int32),
        block_count=jnp.asarray(count, jnp.int32),
        block_q=block,
        block_k=block,
        seq_len=seq_len,
    )


def full_causal_index(seq_len: int, *, block: int = 64) -> BlockSparseIndex:
    """Every causal key block (dense causal attention through the block-sparse kernel)."""
    return a_shape_index(seq_len, n_sink=0, n_local=seq_len, block=block)


# ----------------------------------------------------------------------------------------------------
# Conversions and kernel cost
# ----------------------------------------------------------------------------------------------------


def block_sparse_to_vertical_slash(index: BlockSparseIndex) -> VerticalSlashIndex:
    """The same key set as tiles (one per listed block) and no columns, so heads with different patterns
    can share one `vertical_slash_prefill` call."""
    bk, T = index.block_k, index.seq_len
    ids = index.block_ids.astype(jnp.int32)
    lead = ids.shape[:-1]
    valid = jnp.arange(ids.shape[-1]) < index.block_count[..., None]
    return VerticalSlashIndex(
        tile_start=jnp.where(valid, ids * bk, 0),
        tile_end=jnp.where(valid, jnp.minimum((ids + 1) * bk, T), 0),
        tile_count=index.block_count.astype(jnp.int32),
        column_index=jnp.zeros(lead + (bk,), jnp.int32),
        column_count=jnp.zeros(lead, jnp.int32),
        block_q=index.block_q,
        block_k=bk,
        seq_len=T,
    )


def index_cost(index: BlockSparseIndex | VerticalSlashIndex) -> jax.Array:
    """Key tiles of `block_k` keys the kernel visits per query block, int32 `[..., nQ]`."""
    if isinstance(index, BlockSparseIndex):
        return index.block_count.astype(jnp.int32)
    if not isinstance(index, VerticalSlashIndex):
        raise TypeError(f"expected a BlockSparseIndex or VerticalSlashIndex, got {type(index).__name__}")
    bk = index.block_k
    return (index.tile_count + (index.column_count + bk - 1) // bk).astype(jnp.int32)


def dense_causal_tiles(seq_len: int, *, block_q: int = 64, block_k: int = 64) -> int:
    """Key tiles a dense causal flash kernel visits over all query blocks (one head)."""
    q1 = np.minimum(np.arange(_cdiv(seq_len, block_q)) * block_q + block_q, seq_len)
    return int(np.sum(-(-q1 // block_k)))


# ----------------------------------------------------------------------------------------------------
# Numpy references (loops; independent of the vectorised builders above)
# ----------------------------------------------------------------------------------------------------


def vertical_slash_scores_np(
    q_last: np.ndarray,
    k: np.ndarray,
    n_valid: np.ndarray | None = None,
    *,
    last_q: int = 64,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `vertical_slash_scores` (float64)."""
    q_last, k = np.asarray(q_last, np.float64), np.asarray(k, np.float64)
    B, H, Lq, G, D = q_last.shape
    T = k.shape[2]
    R = min(last_q, Lq, T)
    vertical = np.zeros((B, H, T))
    slash = np.zeros((B, H, T))
    for b, h, g, r in np.ndindex(B, H, G, R):
        n = T if n_valid is None else int(n_valid[b])
        pos = n - R + r
        if pos < 0:
            continue
        row = pos if n_valid is not None else Lq - T + pos  # full q (absolute) or the last Lq queries
        s = k[b, h, : pos + 1] @ q_last[b, h, row, g] * _scale(D, scale)
        p = np.exp(s - s.max())
        p /= p.sum()
        vertical[b, h, : pos + 1] += p
        slash[b, h, : pos + 1] += p[::-1]  # key pos - o has offset o
    return vertical, slash


def select_vertical_slash_np(
    vertical: np.ndarray,
    slash: np.ndarray,
    *,
    n_vertical: int,
    n_slash: int,
    n_sink_cols: int = 30,
    n_local_diags: int = 100,
    min_mass: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `select_vertical_slash`."""
    T = vertical.shape[-1]
    cols = np.zeros(vertical.shape[:-1] + (min(n_vertical, T),), np.int32)
    offs = np.zeros(slash.shape[:-1] + (min(n_slash, T),), np.int32)
    for idx in np.ndindex(*vertical.shape[:-1]):
        floor = min_mass * float(np.sum(vertical[idx]))
        for scores, forced, out in ((vertical, n_sink_cols, cols), (slash, n_local_diags, offs)):
            x = np.array(scores[idx], np.float64)
            x[: min(forced, T)] = np.inf
            top = np.argsort(-x, kind="stable")[: out.shape[-1]]
            if min_mass > 0:
                top = np.where(x[top] >= floor, top, T)
            out[idx] = np.sort(top)
        offs[idx] = offs[idx][::-1]
    return cols, offs


def select_vertical_slash_budgets_np(
    vertical: np.ndarray,
    slash: np.ndarray,
    n_vertical: np.ndarray,
    n_slash: np.ndarray,
    n_sink_cols: np.ndarray,
    n_local_diags: np.ndarray,
    *,
    cap_vertical: int,
    cap_slash: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `select_vertical_slash_budgets` (per-row loops)."""
    lead, T = vertical.shape[:-1], vertical.shape[-1]
    budgets = [np.broadcast_to(np.asarray(x), lead) for x in (n_vertical, n_slash, n_sink_cols, n_local_diags)]
    cols = np.full(lead + (min(cap_vertical, T),), T, np.int32)
    offs = np.full(lead + (min(cap_slash, T),), T, np.int32)
    for idx in np.ndindex(*lead):
        n_v, n_s, f_v, f_s = (int(x[idx]) for x in budgets)
        for scores, n, forced, out in ((vertical, n_v, min(f_v, n_v), cols), (slash, n_s, min(f_s, n_s), offs)):
            x = np.array(scores[idx], np.float64)
            x[:forced] = np.inf
            top = np.argsort(-x, kind="stable")[: min(n, out.shape[-1])]
            out[idx][: len(top)] = top
            out[idx] = np.sort(out[idx])
        offs[idx] = offs[idx][::-1]
    return cols, offs


def vertical_slash_index_from_selection_np(
    columns: np.ndarray, offsets: np.ndarray, seq_len: int, *, block_q: int = 64, block_k: int = 64
) -> dict[str, np.ndarray]:
    """Reference of `vertical_slash_index_from_selection` (two-pointer merge per query block, then tiles)."""
    columns, offsets = np.asarray(columns), np.asarray(offsets)
    lead = columns.shape[:-1]
    nq = _cdiv(seq_len, block_q)
    _, cap_t, cap_c = vs_capacities(columns.shape[-1], offsets.shape[-1], seq_len, block_q, block_k)
    out = {
        "tile_start": np.zeros(lead + (nq, cap_t), np.int32),
        "tile_end": np.zeros(lead + (nq, cap_t), np.int32),
        "tile_count": np.zeros(lead + (nq,), np.int32),
        "column_index": np.zeros(lead + (nq, cap_c), np.int32),
        "column_count": np.zeros(lead + (nq,), np.int32),
    }
    for idx in np.ndindex(*lead):
        for i in range(nq):
            q0, q1 = i * block_q, min(i * block_q + block_q, seq_len)
            ranges: list[list[int]] = []
            for o in sorted(offsets[idx].tolist(), reverse=True):
                s, e = max(q0 - o, 0), q1 - o
                if e <= 0:
                    continue
                if ranges and s <= ranges[-1][1]:
                    ranges[-1][1] = max(ranges[-1][1], e)
                else:
                    ranges.append([s, e])
            cols = [
                c for c in sorted(columns[idx].tolist()) if c < q1 and not any(s <= c < e for s, e in ranges)
            ]
            tiles = [(t, min(t + block_k, e)) for s, e in ranges for t in range(s, e, block_k)]
            full = [b - a == block_k and a + block_k - 1 <= q0 for a, b in tiles]
            tiles = [t for t, f in zip(tiles, full) if f] + [t for t, f in zip(tiles, full) if not f]
            n_t, n_c = len(tiles), len(cols)
            key = idx + (i,)
            out["tile_count"][key], out["column_count"][key] = n_t, n_c
            if n_t:
                out["tile_start"][key][:n_t] = [a for a, _ in tiles]
                out["tile_end"][key][:n_t] = [b for _, b in tiles]
            out["column_index"][key][:n_c] = cols
    return out


def block_sparse_index_np(
    q: np.ndarray,
    k: np.ndarray,
    n_blocks: np.ndarray | None = None,
    *,
    top_k_blocks: int,
    block: int = 64,
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `block_sparse_index`: `(block_ids, block_count)`."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, H, T, G, D = q.shape
    nb = _cdiv(T, block)
    kk = min(top_k_blocks, nb)
    ids = np.zeros((B, H, nb, kk), np.int32)
    counts = np.zeros((B, H, nb), np.int32)
    for b, h in np.ndindex(B, H):
        qp = np.stack([q[b, h, j * block : (j + 1) * block].mean(0) for j in range(nb)])  # [nB, G, D]
        kp = np.stack([k[b, h, j * block : (j + 1) * block].mean(0) for j in range(nb)])  # [nB, D]
        for i in range(nb):
            score = np.zeros(i + 1)
            for g in range(G):
                s = kp[: i + 1] @ qp[i, g] * _scale(D, scale)
                p = np.exp(s - s.max())
                score += p / p.sum()
            score[i] = np.inf
            keep = kk if n_blocks is None else min(kk, max(1, int(np.broadcast_to(n_blocks, (B, H))[b, h])))
            chosen = np.sort(np.argsort(-score, kind="stable")[:keep])
            counts[b, h, i] = len(chosen)
            ids[b, h, i] = np.concatenate([chosen, np.full(kk - len(chosen), chosen[-1])])
    return ids, counts


def a_shape_index_np(seq_len: int, *, n_sink: int, n_local: int, block: int = 64) -> list[list[int]]:
    """Reference of `a_shape_index`: per query block, the sorted key blocks holding a needed key
    (brute force over token pairs)."""
    out = []
    for i in range(_cdiv(seq_len, block)):
        need = set()
        for qpos in range(i * block, min(i * block + block, seq_len)):
            for kpos in range(qpos + 1):
                if kpos < n_sink or kpos > qpos - n_local:
                    need.add(kpos // block)
        out.append(sorted(need))
    return out
