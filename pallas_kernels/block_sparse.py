"""Block-sparse causal prefill attention over listed key blocks (Pallas, Triton backend).

Causal self-attention of one long prompt where every block of `block_q` queries attends only the key
blocks listed for it: `block_ids[B, H, nQ, M]` (ascending, `block_count[B, H, nQ]` valid entries). The
index is per KV head, so one program holds the whole GQA group: its rows are `tokens x heads` of a query
block (G padded to a power of two, rows cut into tiles of `block_rows` <= 128 by default) and every K/V
tile it loads serves all G query heads. A program walks its block list flash-style in two loops: the
leading blocks that lie entirely below the query tile need no mask, the rest (the diagonal block, or a
block past the valid length) are masked `key <= query`. Query blocks are launched heaviest first.

`masked_attention_ref` (dense attention with per-row key multiplicities) is the reference that both this
file and `vertical_slash` reduce to.
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
    MIN_ROWS,
    cdiv,
    check_head_dim,
    compiler_params,
    default_scale,
    is_pow2,
    next_pow2,
    pad_axis,
    resolve_interpret,
)

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Default rows of one program's query tile (tokens x heads of the GQA group).
DEFAULT_TILE_ROWS = 128

_STATIC = ("block_q", "block_k", "causal", "scale", "block_rows", "interpret", "num_warps", "num_stages")

Carry = tuple[jax.Array, jax.Array, jax.Array]


# ----------------------------------------------------------------------------------------------------
# Pieces shared with vertical_slash.py (in-kernel flash step, query packing, checks)
# ----------------------------------------------------------------------------------------------------


def flash_update(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, carry: Carry, qk_scale: float
) -> Carry:
    """One online-softmax step (base-2 logits) of a `[R, D]` query tile over a `[K, D]` key tile.

    `mask[R, K]` (or None: every key visible) hides keys with `-inf`; a row that has seen only hidden
    keys keeps `m = -inf, l = 0, acc = 0` (its max is replaced by 0 before subtracting).
    """
    acc, m_prev, l_prev = carry
    exact = q.dtype == jnp.float32
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=False if exact else None) * qk_scale
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    m_use = m_next if mask is None else jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_use)
    p = jnp.exp2(s - m_use[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=False if exact else None)
    return acc * alpha[:, None] + pv, m_next, l_next


def flash_init(rows: int, head_dim: int) -> Carry:
    """Empty accumulator, running max and denominator for `rows` query rows."""
    return (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def flash_finish(carry: Carry) -> tuple[jax.Array, jax.Array]:
    """Normalised output and natural-log LSE; rows without a visible key give zeros and `-inf`."""
    acc, m, l_sum = carry
    seen = l_sum > 0.0
    out = acc / jnp.where(seen, l_sum, 1.0)[:, None]
    lse = jnp.where(seen, (m + jnp.log2(jnp.where(seen, l_sum, 1.0))) * LN2, -jnp.inf)
    return out, lse


def query_tile_positions(program: jax.Array, *, block_q: int, rows: int, heads: int) -> jax.Array:
    """Token position of each row of query tile number `program` (rows are token-major, `heads` per token)."""
    tiles_per_block = block_q * heads // rows
    qi = lax.div(program, tiles_per_block)
    first = qi * block_q + (program - qi * tiles_per_block) * (rows // heads)
    return first + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), heads)


def tile_layout(block_q: int, groups: int, block_rows: int | None) -> tuple[int, int, int]:
    """(padded heads per token, rows per program, programs per query block) for a GQA group of `groups`."""
    gp = next_pow2(groups)
    if block_q * gp < MIN_ROWS:
        gp = MIN_ROWS // block_q
    per_block = block_q * gp
    rows = min(per_block, DEFAULT_TILE_ROWS) if block_rows is None else int(block_rows)
    if not is_pow2(rows) or rows < MIN_ROWS or per_block % rows or rows < gp:
        raise ValueError(
            f"block_rows must be a power of two >= {MIN_ROWS} and >= the padded group {gp} that divides "
            f"block_q * padded G = {per_block}, got {block_rows}"
        )
    return gp, rows, per_block // rows


def pack_queries(q_BHTGD: jax.Array, t_pad: int, gp: int) -> jax.Array:
    """[B, H, T, G, D] -> [B, H, t_pad * gp, D] token-major rows (pads T and G only where needed)."""
    B, H, _, _, D = q_BHTGD.shape
    q = pad_axis(pad_axis(q_BHTGD, 2, t_pad), 3, gp)
    return q.reshape(B, H, t_pad * gp, D)


def unpack_outputs(
    o: jax.Array, lse: jax.Array, shape: tuple[int, ...], t_pad: int, gp: int
) -> tuple[jax.Array, jax.Array]:
    """Inverse of `pack_queries` for the output rows and their LSE."""
    B, H, T, G, D = shape
    o = o.reshape(B, H, t_pad, gp, o.shape[-1])[:, :, :T, :G, :D]
    lse = lse.reshape(B, H, t_pad, gp)[:, :, :T, :G]
    return o, lse


def default_num_warps(rows: int, head_dim: int, num_warps: int | None) -> int:
    """8 warps for 128x128 tiles and larger, 4 below."""
    if num_warps is not None:
        return num_warps
    return 8 if rows * head_dim >= 128 * 128 else 4


def check_qkv(q_BHTGD: jax.Array, k_BHTD: jax.Array, v_BHTD: jax.Array, block_q: int, block_k: int) -> None:
    """Shape/dtype checks shared by the prefill kernels (raise before any work)."""
    if q_BHTGD.ndim != 5:
        raise ValueError(f"q must be [B, H, T, G, D], got shape {q_BHTGD.shape}")
    B, H, T, G, D = q_BHTGD.shape
    if k_BHTD.shape != (B, H, T, D) or v_BHTD.shape != (B, H, T, D):
        raise ValueError(f"k and v must be [B, H, T, D] = {(B, H, T, D)}, got {k_BHTD.shape}, {v_BHTD.shape}")
    if not (q_BHTGD.dtype == k_BHTD.dtype == v_BHTD.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q_BHTGD.dtype}, {k_BHTD.dtype}, {v_BHTD.dtype}")
    if q_BHTGD.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
        raise TypeError(f"q/k/v dtype must be bfloat16, float16 or float32, got {q_BHTGD.dtype}")
    if T < 1 or G < 1:
        raise ValueError(f"q needs T >= 1 and G >= 1, got shape {q_BHTGD.shape}")
    check_head_dim(D)
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not is_pow2(b) or b < MIN_ROWS:
            raise ValueError(f"{name} must be a power of two >= {MIN_ROWS}, got {b}")


def check_index_array(name: str, x: jax.Array, lead: tuple[int, ...], trailing: int) -> None:
    """An integer index array whose leading dims broadcast to `lead` ([B, H, nQ]) plus `trailing` axes."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got {x.dtype}")
    core = x.shape[: x.ndim - trailing] if trailing else x.shape
    if x.ndim < 1 + trailing or x.ndim > len(lead) + trailing or core[-1:] != lead[-1:]:
        raise ValueError(
            f"{name} must be [B, H, nQ{', M' if trailing else ''}] with nQ = {lead[-1]}, got shape {x.shape}"
        )
    try:
        jnp.broadcast_shapes(core, lead)
    except ValueError:
        raise ValueError(f"{name} leading dims {core} do not broadcast to [B, H, nQ] = {lead}") from None


def broadcast_index(x: jax.Array, lead: tuple[int, ...], trailing: int) -> jax.Array:
    """Broadcasts an index array to `lead + its trailing axes`, as int32."""
    shape = lead + x.shape[x.ndim - trailing :] if trailing else lead
    return jnp.broadcast_to(x.astype(jnp.int32), shape)


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------


def _block_sparse_kernel(
    meta_ref,
    ids_ref,
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
    causal: bool,
    seq_len: int,
):
    """One (KV head, batch row, query tile) program: flash accumulation over the block's key list."""
    rows, D = q_ref.shape
    program = n_programs - 1 - pl.program_id(2)  # heaviest (latest) query tiles first
    q_pos = query_tile_positions(program, block_q=block_q, rows=rows, heads=heads)
    count = meta_ref[0]
    n_unmasked = meta_ref[1]
    q = q_ref[...]

    def step(j, carry, masked):
        start = pl.multiple_of(ids_ref[j] * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        mask = None
        if masked:
            k_pos = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            if causal:
                mask = k_pos[None, :] <= q_pos[:, None]
            else:
                mask = jnp.broadcast_to((k_pos < seq_len)[None, :], (rows, block_k))
        return flash_update(q, k, v, mask, carry, qk_scale)

    carry = lax.fori_loop(0, n_unmasked, functools.partial(step, masked=False), flash_init(rows, D))
    carry = lax.fori_loop(n_unmasked, count, functools.partial(step, masked=True), carry)
    out, lse = flash_finish(carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _check_block_index(q_BHTGD, block_ids, block_count, block_q):
    B, H, T = q_BHTGD.shape[:3]
    lead = (B, H, cdiv(T, block_q))
    check_index_array("block_ids", block_ids, lead, 1)
    check_index_array("block_count", block_count, lead, 0)
    if block_ids.shape[-1] < 1:
        raise ValueError(f"block_ids needs a capacity M >= 1, got shape {block_ids.shape}")
    return lead


def unmasked_prefix(
    ids: jax.Array, count: jax.Array, *, block_q: int, block_k: int, causal: bool, seq_len: int
) -> jax.Array:
    """Number of leading listed blocks that every row of the query block sees completely (no mask)."""
    nq = ids.shape[-2]
    q_first = (jnp.arange(nq, dtype=jnp.int32) * block_q)[:, None]
    key_last = (ids + 1) * block_k - 1
    ok = key_last < seq_len
    if causal:
        ok &= key_last <= q_first
    ok &= jnp.arange(ids.shape[-1]) < count[..., None]
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=_STATIC)
def block_sparse_prefill(
    q_BHTGD: jax.Array,
    k_BHTD: jax.Array,
    v_BHTD: jax.Array,
    block_ids: jax.Array,
    block_count: jax.Array,
    *,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = True,
    scale: float | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Causal prefill where query block i attends the key blocks `block_ids[..., i, :block_count[..., i]]`.

    `q_BHTGD` (query head h*G+g uses KV head h), `k_BHTD`, `v_BHTD`; `block_ids[B, H, nQ, M]` key-block
    ids of `block_k` keys (ascending is fastest; entries past the count are ignored) and
    `block_count[B, H, nQ]`, nQ = ceil(T / block_q); leading index dims may be broadcast (e.g. `[nQ, M]`).
    A key listed twice is counted twice. Returns `out_BHTGD` (q's dtype) and `lse_BHTG` (float32, natural
    log, `-inf` for a row that sees no key). `block_rows` (power of two) sets the rows of one program.
    """
    check_qkv(q_BHTGD, k_BHTD, v_BHTD, block_q, block_k)
    lead = _check_block_index(q_BHTGD, block_ids, block_count, block_q)
    B, H, T, G, D = q_BHTGD.shape
    nq = lead[2]
    t_pad = nq * block_q
    t_keys = cdiv(t_pad, block_k) * block_k
    n_kb = t_keys // block_k
    gp, rows, tiles = tile_layout(block_q, G, block_rows)
    n_programs = nq * tiles

    ids = jnp.clip(broadcast_index(block_ids, lead, 1), 0, n_kb - 1)
    count = jnp.clip(broadcast_index(block_count, lead, 0), 0, ids.shape[-1])
    n_unmasked = unmasked_prefix(ids, count, block_q=block_q, block_k=block_k, causal=causal, seq_len=T)
    meta = jnp.stack([count, n_unmasked], axis=-1)
    M = ids.shape[-1]

    q = pack_queries(q_BHTGD, t_pad, gp)
    k = pad_axis(k_BHTD, 2, t_keys)
    v = pad_axis(v_BHTD, 2, t_keys)
    kernel = functools.partial(
        _block_sparse_kernel,
        block_q=block_q,
        block_k=block_k,
        heads=gp,
        n_programs=n_programs,
        qk_scale=default_scale(D, scale) * LOG2E,
        causal=causal,
        seq_len=T,
    )
    last = n_programs - 1
    o, lse = pl.pallas_call(
        kernel,
        grid=(H, B, n_programs),
        in_specs=[
            pl.BlockSpec((None, None, None, 2), lambda h, b, p: (b, h, (last - p) // tiles, 0)),
            pl.BlockSpec((None, None, None, M), lambda h, b, p: (b, h, (last - p) // tiles, 0)),
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
        name="block_sparse_prefill",
    )(meta, ids, q, k, v)
    return unpack_outputs(o, lse, q_BHTGD.shape, t_pad, gp)


# ----------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------


def masked_attention_ref(
    q_BHTGD: jax.Array,
    k_BHSD: jax.Array,
    v_BHSD: jax.Array,
    key_mult_BHTS: jax.Array,
    q_pos_T: jax.Array,
    *,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense float32 attention where key s counts `key_mult[b, h, t, s]` times for query row t.

    `q_pos_T` gives each query row's token position (causal: keys with position > it are hidden).
    Returns `out` in q's dtype and `lse_BHTG` (natural log, `-inf` where no key is visible).
    """
    D = q_BHTGD.shape[-1]
    hp = lax.Precision.HIGHEST
    s = jnp.einsum(
        "bhtgd,bhsd->bhtgs", q_BHTGD.astype(jnp.float32), k_BHSD.astype(jnp.float32), precision=hp
    ) * default_scale(D, scale)
    mult = key_mult_BHTS.astype(jnp.float32)
    if causal:
        visible = jnp.arange(k_BHSD.shape[2])[None, :] <= q_pos_T[:, None]
        mult = jnp.where(visible, mult, 0.0)
    s = jnp.where(
        mult[:, :, :, None, :] > 0, s + jnp.log(jnp.maximum(mult, 1e-30))[:, :, :, None, :], -jnp.inf
    )
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum(
        "bhtgs,bhsd->bhtgd", p / jnp.where(denom > 0, denom, 1.0), v_BHSD.astype(jnp.float32), precision=hp
    )
    lse = jnp.where(
        denom[..., 0] > 0, jnp.log(jnp.where(denom[..., 0] > 0, denom[..., 0], 1.0)) + m[..., 0], -jnp.inf
    )
    return out.astype(q_BHTGD.dtype), lse


def scatter_counts(pos: jax.Array, weight: jax.Array, size: int) -> jax.Array:
    """`out[..., j] = sum of weight[..., m] where pos[..., m] == j` (positions outside [0, size) dropped)."""
    lead = pos.shape[:-1]
    pos2 = pos.reshape(-1, pos.shape[-1])
    rows = jnp.arange(pos2.shape[0])[:, None]
    out = jnp.zeros((pos2.shape[0], size), jnp.int32)
    out = out.at[rows, pos2].add(weight.reshape(pos2.shape).astype(jnp.int32), mode="drop")
    return out.reshape(*lead, size)


@functools.partial(jax.jit, static_argnames=("seq_len", "block_k"))
def block_key_counts(
    block_ids: jax.Array, block_count: jax.Array, seq_len: int, *, block_k: int
) -> jax.Array:
    """How many times each key position is listed for each query block: int32 `[..., nQ, seq_len]`."""
    n_kb = cdiv(seq_len, block_k)
    ids = jnp.clip(block_ids.astype(jnp.int32), 0, n_kb - 1)
    valid = jnp.arange(ids.shape[-1]) < block_count.astype(jnp.int32)[..., None]
    per_block = scatter_counts(ids, valid, n_kb)
    return jnp.repeat(per_block, block_k, axis=-1)[..., :seq_len]


@functools.partial(jax.jit, static_argnames=_STATIC)
def block_sparse_prefill_ref(
    q_BHTGD: jax.Array,
    k_BHTD: jax.Array,
    v_BHTD: jax.Array,
    block_ids: jax.Array,
    block_count: jax.Array,
    *,
    block_q: int = 64,
    block_k: int = 64,
    causal: bool = True,
    scale: float | None = None,
    block_rows: int | None = None,
    interpret: bool | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `block_sparse_prefill` (same signature; tiling arguments are ignored)."""
    del block_rows, interpret, num_warps, num_stages
    check_qkv(q_BHTGD, k_BHTD, v_BHTD, block_q, block_k)
    lead = _check_block_index(q_BHTGD, block_ids, block_count, block_q)
    T = q_BHTGD.shape[2]
    mult = block_key_counts(
        broadcast_index(block_ids, lead, 1), broadcast_index(block_count, lead, 0), T, block_k=block_k
    )
    rows_to_block = jnp.arange(T) // block_q
    return masked_attention_ref(
        q_BHTGD, k_BHTD, v_BHTD, mult[:, :, rows_to_block], jnp.arange(T), causal=causal, scale=scale
    )
