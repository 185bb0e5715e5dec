"""Shared helpers for the Pallas (Triton backend) kernels.

Compiler parameters, the interpret-mode default, power-of-two padding, and a helper that lowers a
function for an H100 target on a machine without a GPU (to catch Triton lowering errors in CPU tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

# Device kind string of the H100 the kernels are tuned for; used by `lower_for_h100`.
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
# Custom-call targets a Triton `pallas_call` lowers to (jaxlib <= 0.10.2 and newer jaxlibs).
TRITON_CALL_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call")
# Smallest dimension of an operand of `plgpu.dot`.
MIN_DOT_DIM = 16
# Streaming multiprocessors of an H100 / H200 SXM: the launch heuristics size grids in whole waves of these.
SM_COUNT = 132
# Rows that the GQA group (or a query tile) is padded to at least.
MIN_ROWS = 16


def compiler_params(num_warps: int, num_stages: int) -> plgpu.CompilerParams:
    """Triton compiler parameters, always explicit (some jax versions otherwise pick Mosaic GPU)."""
    if num_warps < 1 or not is_pow2(num_warps):
        raise ValueError(f"num_warps must be a positive power of two, got {num_warps}")
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def has_gpu() -> bool:
    """Whether a CUDA/ROCm GPU backend is available to this process."""
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret=None` means: interpret on CPU (no GPU present), compile for the GPU otherwise."""
    if interpret is None:
        return not has_gpu()
    return bool(interpret)


def is_pow2(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"next_pow2 needs n >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def padded_rows(n: int, minimum: int = MIN_ROWS) -> int:
    """Rows an in-kernel tile of `n` real rows is padded to: a power of two, at least `minimum`."""
    return max(minimum, next_pow2(n))


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints."""
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    """`a` rounded up to a multiple of `b`."""
    return cdiv(a, b) * b


def pad_axis(x: jax.Array, axis: int, size: int, mode: str = "constant") -> jax.Array:
    """Pads `x` along `axis` (at the end) to `size`; a no-op when it already has that size."""
    cur = x.shape[axis]
    if cur == size:
        return x
    if cur > size:
        raise ValueError(f"cannot pad axis {axis} of size {cur} down to {size}")
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - cur)
    return jnp.pad(x, widths, mode=mode)


def default_scale(head_dim: int, scale: float | None) -> float:
    """Softmax scale: 1/sqrt(D) unless given."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_head_dim(head_dim: int) -> None:
    """In-kernel arrays must be powers of two and dot dims >= 16."""
    if not is_pow2(head_dim) or head_dim < MIN_DOT_DIM:
        raise ValueError(f"head dim D must be a power of two >= {MIN_DOT_DIM}, got {head_dim}")


def check_fixed_layout(n_keys: int, n_fixed: int, fixed_pad: int, n_clustered: int) -> None:
    """Validates the static context-index layout ints against the key array length."""
    if n_keys % 64:
        raise ValueError(f"key axis N must be a multiple of 64, got {n_keys}")
    if n_fixed < 0 or n_clustered < 0:
        raise ValueError(f"n_fixed and n_clustered must be >= 0, got {n_fixed}, {n_clustered}")
    if fixed_pad < n_fixed:
        raise ValueError(f"fixed_pad ({fixed_pad}) must be >= n_fixed ({n_fixed})")
    if fixed_pad + n_clustered > n_keys:
        raise ValueError(
            f"fixed_pad + n_clustered = {fixed_pad + n_clustered} exceeds the key axis N = {n_keys}"
        )


def check_row_head_mask(active_BH: jax.Array | None, B: int, H: int) -> None:
    """A per-(row, head) on/off mask must be a bool or integer [B, H] array (None: all on)."""
    if active_BH is None:
        return
    if active_BH.shape != (B, H):
        raise ValueError(f"active_BH must be [B, H] = [{B}, {H}], got shape {list(active_BH.shape)}")
    if not (jnp.issubdtype(active_BH.dtype, jnp.integer) or active_BH.dtype == jnp.bool_):
        raise TypeError(f"active_BH must be a bool or integer array, got dtype {active_BH.dtype}")


def row_head_mask_i32(active_BH: jax.Array | None, B: int, H: int) -> jax.Array:
    """The (row, head) on/off mask as the int32 [B, H] kernel input (all on when None)."""
    return jnp.ones((B, H), jnp.int32) if active_BH is None else active_BH.astype(jnp.int32)


def check_block_k(block_k: int, n_keys: int) -> None:
    """Key blocks are powers of two that tile the key axis."""
    if not is_pow2(block_k):
        raise ValueError(f"block_k must be a power of two, got {block_k}")
    if n_keys % block_k:
        raise ValueError(f"key axis N = {n_keys} is not a multiple of block_k = {block_k}")


def valid_key_mask(pos: jax.Array, n_fixed: int, fixed_pad: int, n_clustered: int) -> jax.Array:
    """True where a key position is a real key of the context-index layout (works in and out of kernels)."""
    return (pos < n_fixed) | ((pos >= fixed_pad) & (pos < fixed_pad + n_clustered))


def lower_for_h100(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Lowers `fn(*args, **kwargs)` for a CUDA H100 target without a GPU and returns the StableHLO text.

    Traces under an abstract mesh whose device kind is an H100 and lowers with
    `lowering_platforms=('cuda',)`. Pallas power-of-two and unsupported-op errors surface here; the
    Triton -> PTX step only happens on a real GPU. `args` may be arrays or `jax.ShapeDtypeStruct`s.
    Keyword arguments are bound statically (closed over).
    """
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))
    try:
        device = jax.sharding.AbstractDevice(
            device_kind=H100_DEVICE_KIND, num_cores=None, platform="cuda"
        )
        mesh = jax.sharding.AbstractMesh(
            (1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device
        )
    except (AttributeError, TypeError):  # older/newer jax without abstract devices: plain lowering
        mesh = None
    if mesh is None:
        lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
    else:
        with jax.sharding.use_abstract_mesh(mesh):
            lowered = jitted.trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def has_triton_call(hlo_text: str) -> bool:
    """Whether lowered text contains a Triton kernel custom call."""
    return any(t in hlo_text for t in TRITON_CALL_TARGETS)


def valid_blocks(n_fixed: int, fixed_pad: int, n_clustered: int, block_k: int) -> np.ndarray:
    """Ids of the key blocks that hold at least one valid key, ascending (host-side, numpy)."""
    fixed = np.arange(cdiv(n_fixed, block_k))
    clustered = np.arange(fixed_pad // block_k, cdiv(fixed_pad + n_clustered, block_k))
    return np.unique(np.concatenate([fixed, clustered])).astype(np.int32)


def random_block_selection(
    rng: np.random.Generator,
    lead_shape: tuple[int, ...],
    candidates: np.ndarray,
    counts: np.ndarray | int,
    capacity: int,
    always: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic selection in the kernels' format (host-side, for tests and benchmarks).

    For each index of `lead_shape`: the blocks `always` plus distinct random `candidates` up to
    `counts` blocks in all, sorted ascending and padded to `capacity` with the last id. Returns
    `(block_ids[*lead_shape, capacity], block_count[*lead_shape])` as int32.
    """
    always = np.zeros((0,), np.int32) if always is None else np.asarray(always, np.int32)
    pool = np.setdiff1d(np.asarray(candidates, np.int32), always)
    counts = np.broadcast_to(np.asarray(counts, np.int64), lead_shape)
    lo, hi = max(1, len(always)), min(capacity, len(always) + len(pool))
    if counts.size and (counts.min() < lo or counts.max() > hi):
        raise ValueError(f"counts must lie in [{lo}, {hi}] (always-selected blocks, capacity, candidates)")
    ids = np.empty(lead_shape + (capacity,), np.int32)
    for idx in np.ndindex(*lead_shape):
        c = int(counts[idx])
        chosen = np.sort(np.concatenate([always, rng.choice(pool, c - len(always), replace=False)]))
        ids[idx + (slice(None),)] = np.concatenate([chosen, np.full(capacity - c, chosen[-1], np.int32)])
    return ids, counts.astype(np.int32)
