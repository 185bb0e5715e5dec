"""The attention kernels lower to Triton for an H100 target on a machine without a GPU.

Lowering runs the Pallas -> Triton IR step (power-of-two shapes, supported ops, dot dims); the PTX step
needs a real GPU and is exercised by benchmarks/bench_sparse_attention.py on the device machine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.common import compiler_params, has_triton_call, lower_for_h100
from pallas_kernels.sparse_decode import dense_decode, sparse_decode
from pallas_kernels.sparse_prefill import sparse_prefill

S = jax.ShapeDtypeStruct
LAYOUT = dict(n_fixed=1000, fixed_pad=1024, n_clustered=7000)


@pytest.mark.parametrize(
    "G,D,dtype,block_k,P,splits",
    [
        (4, 128, jnp.bfloat16, 16, 8, None),
        (1, 128, jnp.bfloat16, 16, 4, 8),
        (3, 64, jnp.float32, 32, 2, 3),
        (8, 64, jnp.bfloat16, 64, 1, 1),
        (128, 128, jnp.bfloat16, 16, 8, None),  # all_keys_attention's 128-row tiles
    ],
)
def test_sparse_decode_lowers(G, D, dtype, block_k, P, splits):
    B, H, N, M = 2, 8, 8192, 100
    text = lower_for_h100(
        sparse_decode,
        S((B, H, G, D), dtype),
        S((H, N, D), dtype),
        S((H, N, D), dtype),
        S((B, H, M), jnp.int32),
        S((B, H), jnp.int32),
        block_k=block_k,
        blocks_per_step=P,
        num_splits=splits,
        interpret=False,
        **LAYOUT,
    )
    assert has_triton_call(text)


@pytest.mark.parametrize("G,D,dtype,U", [(4, 128, jnp.bfloat16, 512), (1, 64, jnp.float32, 0)])
def test_dense_decode_lowers(G, D, dtype, U):
    B, H, N = 1, 8, 8192
    user = [S((B, U, H, D), dtype), S((B, U, H, D), dtype), S((B,), jnp.int32)] if U else []
    text = lower_for_h100(
        lambda q, k, v, *u: dense_decode(q, k, v, interpret=False, **dict(zip(("k_user_BUHD", "v_user_BUHD",
                                                                              "user_len_B"), u)), **LAYOUT),
        S((B, H, G, D), dtype), S((H, N, D), dtype), S((H, N, D), dtype), *user)
    assert has_triton_call(text)


@pytest.mark.parametrize("G,D,dtype,U", [(4, 128, jnp.bfloat16, 512), (3, 64, jnp.float32, 1000)])
def test_sparse_decode_with_user_tokens_lowers(G, D, dtype, U):
    B, H, N, M = 2, 8, 8192, 100
    text = lower_for_h100(
        lambda q, k, v, ids, cnt, ku, vu, lens: sparse_decode(
            q, k, v, ids, cnt, k_user_BUHD=ku, v_user_BUHD=vu, user_len_B=lens, interpret=False, **LAYOUT),
        S((B, H, G, D), dtype),
        S((H, N, D), dtype),
        S((H, N, D), dtype),
        S((B, H, M), jnp.int32),
        S((B, H), jnp.int32),
        S((B, U, H, D), dtype),
        S((B, U, H, D), dtype),
        S((B,), jnp.int32),
    )
    assert has_triton_call(text)


@pytest.mark.parametrize(
    "T,G,D,dtype,block_q,rows,warps",
    [
        (1000, 4, 128, jnp.bfloat16, 64, 128, 8),
        (1024, 1, 128, jnp.bfloat16, 128, None, 4),
        (77, 3, 64, jnp.float32, 16, None, 4),
    ],
)
def test_sparse_prefill_lowers(T, G, D, dtype, block_q, rows, warps):
    B, H, N, M = 1, 8, 8192, 64
    nQ = -(-T // block_q)
    text = lower_for_h100(
        sparse_prefill,
        S((B, H, T, G, D), dtype),
        S((H, N, D), dtype),
        S((H, N, D), dtype),
        S((B, H, nQ, M), jnp.int32),
        S((B, H, nQ), jnp.int32),
        block_q=block_q,
        block_rows=rows,
        num_warps=warps,
        interpret=False,
        **LAYOUT,
    )
    assert has_triton_call(text)


def test_lowering_check_catches_non_power_of_two_arrays():
    """The helper really lowers through Triton: a kernel with a 3-element array must fail there."""

    def bad_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] + jnp.arange(3, dtype=jnp.float32)[:, None]

    def f(x):
        return pl.pallas_call(
            bad_kernel,
            out_shape=jax.ShapeDtypeStruct((3, 16), jnp.float32),
            compiler_params=compiler_params(4, 1),
            interpret=False,
        )(x)

    def good_kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def g(x):
        return pl.pallas_call(
            good_kernel,
            out_shape=jax.ShapeDtypeStruct((4, 16), jnp.float32),
            compiler_params=compiler_params(4, 1),
            interpret=False,
        )(x)

    assert has_triton_call(lower_for_h100(g, S((4, 16), jnp.float32)))
    with pytest.raises(Exception, match="power of 2|power of two"):
        lower_for_h100(f, S((3, 16), jnp.float32))
