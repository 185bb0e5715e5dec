"""Centroid lookup kernels vs their jnp references (interpret mode on CPU, compiled on a GPU).

Each distinct static config costs one XLA compile (~2-4 s on CPU), so cases reuse configs where they can.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.centroid_lookup import (
    centroid_scores,
    centroid_scores_ref,
    hierarchical_scores,
    hierarchical_scores_ref,
)
from pallas_kernels.common import has_triton_call, lower_for_h100

# The exactness tests ask for full-f32 dots (by default bf16 queries put the dot on bf16 operands, and the
# GPU runs f32 dots as tf32).
DOT = "float32"
ATOL = 1e-4


def _level(rng, H, C, D, dtype, spread=1.0):
    """Random centroids [H, C, D], log sizes (sizes 1..40) and radii."""
    c = jnp.asarray(spread * rng.normal(size=(H, C, D)), dtype)
    logn = jnp.log(jnp.asarray(rng.integers(1, 41, size=(H, C)), jnp.float32))
    rad = jnp.asarray(rng.uniform(0.0, 3.0, size=(H, C)), jnp.float32)
    return c, logn, rad


def _queries(rng, B, H, R, D, dtype, spread=1.0):
    return jnp.asarray(spread * rng.normal(size=(B, H, R, D)), dtype)


def _assert_scores_close(got, want, atol=ATOL, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float32
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=atol, rtol=rtol)


# (B, H, R, D, C, q dtype, centroid dtype, score, agg, method, block_c, chunks_per_program, dot_dtype)
FLAT_CASES = [
    (1, 1, 1, 64, 37, jnp.float32, jnp.float32, "mean", "max", "logits", 16, None, DOT),
    (2, 2, 3, 128, 100, jnp.bfloat16, jnp.float32, "radius", "mean", "recompute", 32, 2, DOT),
    (1, 2, 4, 64, 75, jnp.bfloat16, jnp.bfloat16, "radius", "max", "auto", None, None, DOT),
    (1, 1, 16, 128, 50, jnp.float32, jnp.float32, "mean", "mean", "recompute", 16, 3, DOT),
    (1, 1, 192, 64, 45, jnp.bfloat16, jnp.float32, "radius", "max", "auto", 16, 2, DOT),
    # Default dot dtype: f32 centroids on bf16 operands, within bf16 rounding of the exact reference.
    (1, 1, 192, 64, 45, jnp.bfloat16, jnp.float32, "mean", "mean", "logits", 32, None, None),
]


def _flat_kw(case):
    *_, score, agg, method, block_c, cpp, dot = case
    return dict(score=score, agg=agg, method=method, block_c=block_c, chunks_per_program=cpp, dot_dtype=dot)


@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda c: f"R{c[2]}-D{c[3]}-C{c[4]}-{c[7]}-{c[8]}-{c[9]}")
def test_flat_matches_ref(case):
    B, H, R, D, C, qdt, cdt = case[:7]
    rng = np.random.default_rng(R * 1000 + C)
    c, logn, rad = _level(rng, H, C, D, cdt)
    logn = logn.at[0, 3].set(-jnp.inf)  # an empty cluster scores -inf
    q = _queries(rng, B, H, R, D, qdt)
    kw = _flat_kw(case)
    got = centroid_scores(q, c, logn, rad, radius_weight=0.7, **kw)
    want = centroid_scores_ref(q, c, logn, rad, radius_weight=0.7, **kw)
    assert got.shape == (B, H, C)
    assert np.isneginf(np.asarray(got)[:, 0, 3]).all()
    _assert_scores_close(got, want, atol=ATOL if kw["dot_dtype"] == "float32" else 0.05)


@pytest.mark.parametrize("method, R, cpp", [("logits", 3, None), ("recompute", 20, 2)])
def test_flat_inactive_rows_read_nothing(method, R, cpp):
    """Rows with active 0 score every non-empty cluster 0 (empty ones -inf); active rows are unchanged."""
    B, H, D, C = 3, 2, 64, 70
    rng = np.random.default_rng(R)
    c, logn, rad = _level(rng, H, C, D, jnp.float32)
    logn = logn.at[1, 5].set(-jnp.inf)
    q = _queries(rng, B, H, R, D, jnp.bfloat16)
    active = jnp.asarray([[True, False], [False, False], [True, True]])
    kw = dict(score="radius", method=method, block_c=16, chunks_per_program=cpp, dot_dtype=DOT, active_BH=active)
    got = np.asarray(centroid_scores(q, c, logn, rad, **kw))
    want = centroid_scores_ref(q, c, logn, rad, **kw)
    _assert_scores_close(got, want)
    full = np.asarray(centroid_scores(q, c, logn, rad, **{**kw, "active_BH": None}))
    np.testing.assert_array_equal(got[0, 0], full[0, 0])
    np.testing.assert_array_equal(got[2], full[2])
    idle = np.where(np.isneginf(np.asarray(logn)), -np.inf, 0.0)
    for b, h in ((0, 1), (1, 0), (1, 1)):
        np.testing.assert_array_equal(got[b, h], idle[h])
    with pytest.raises(ValueError, match="active_BH must be"):
        centroid_scores(q, c, logn, rad, active_BH=active[:2])
    with pytest.raises(TypeError, match="active_BH"):
        centroid_scores(q, c, logn, rad, active_BH=active.astype(jnp.float32))


def _naive_scores(q, c, logn, agg):
    """The paper's formula in float64 without max-subtraction:
    S_j = exp(q.c_j / sqrt d) / sum_i N_i exp(q.c_i / sqrt d)."""
    q = np.asarray(q, np.float64)
    c = np.asarray(c, np.float64)
    n = np.exp(np.asarray(logn, np.float64))
    e = np.exp(np.einsum("bhrd,hcd->bhrc", q, c) / math.sqrt(q.shape[-1]))
    S = e / np.sum(n[None, :, None, :] * e, axis=-1, keepdims=True)
    return np.log(S.max(axis=2) if agg == "max" else S.mean(axis=2))


def test_stable_estimate_equals_naive_formula():
    # Same static config as FLAT_CASES[0] (no recompile); logits small enough for the naive formula.
    case = FLAT_CASES[0]
    B, H, R, D, C, qdt, cdt = case[:7]
    rng = np.random.default_rng(7)
    c, logn, rad = _level(rng, H, C, D, cdt, spread=0.5)
    q = _queries(rng, B, H, R, D, qdt)
    got = centroid_scores(q, c, logn, rad, radius_weight=0.7, **_flat_kw(case))
    np.testing.assert_allclose(np.asarray(got), _naive_scores(q, c, logn, "max"), atol=ATOL, rtol=1e-5)
    # agg="mean" through the reference (the kernel's mean path is covered against it above).
    want = centroid_scores_ref(q, c, logn, rad, agg="mean")
    np.testing.assert_allclose(np.asarray(want), _naive_scores(q, c, logn, "mean"), atol=1e-5, rtol=1e-6)


def test_huge_logits_stay_finite():
    # Keys scaled by 1e4: logits ~1e4, where exp overflows; same config as FLAT_CASES[1].
    case = FLAT_CASES[1]
    B, H, R, D, C, qdt, cdt = case[:7]
    rng = np.random.default_rng(11)
    c, logn, rad = _level(rng, H, C, D, cdt, spread=1e4)
    q = _queries(rng, B, H, R, D, qdt)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        assert not np.isfinite(_naive_scores(q, c, logn, "max")).all()  # the naive formula breaks here
    got = np.asarray(centroid_scores(q, c, logn, rad * 1e4, radius_weight=0.7, **_flat_kw(case)))
    want = np.asarray(centroid_scores_ref(q, c, logn, rad * 1e4, radius_weight=0.7, **_flat_kw(case)))
    assert np.isfinite(got).all()
    assert (got <= 1e-3).all()  # log-probabilities
    # Relative to the logit magnitude (~1e5 here) the two agree to f32 rounding.
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------------------
# Hierarchical
# ---------------------------------------------------------------------------------------------------------


def _hier_index(rng, H, Cc, D, cdt, max_count=9):
    """Coarse runs over fine clusters (sizes 1..max_count), coarse centroid = mean of its fine centroids,
    coarse log size = log of the summed fine sizes. All heads share C (the last run absorbs the slack)."""
    counts = rng.integers(1, max_count + 1, size=(H, Cc))
    C = int(counts.sum(1).max())
    counts[:, -1] += C - counts.sum(1)
    first = np.concatenate([np.zeros((H, 1), np.int64), np.cumsum(counts, 1)[:, :-1]], axis=1)
    c, logn, rad = _level(rng, H, C, D, cdt)
    c32 = np.asarray(c, np.float32)
    ln = np.asarray(logn)
    runs = [list(zip(first[h], counts[h])) for h in range(H)]
    cc = np.stack([np.stack([c32[h, f : f + n].mean(0) for f, n in runs[h]]) for h in range(H)])
    cln = np.stack([[np.logaddexp.reduce(ln[h, f : f + n]) for f, n in runs[h]] for h in range(H)])
    return dict(
        coarse=(
            jnp.asarray(cc, cdt),
            jnp.asarray(cln, jnp.float32),
            jnp.asarray(first, jnp.int32),
            jnp.asarray(counts, jnp.int32),
        ),
        fine=(c, logn, rad),
        C=C,
        max_count=int(counts.max()),
    )


def test_hierarchical_keep_all_equals_flat():
    B, H, R, D, Cc = 1, 2, 4, 64, 12
    rng = np.random.default_rng(3)
    idx = _hier_index(rng, H, Cc, D, jnp.float32)
    q = _queries(rng, B, H, R, D, jnp.bfloat16)
    kw = dict(score="radius", agg="max", dot_dtype=DOT)
    got = hierarchical_scores(
        q,
        *idx["coarse"],
        *idx["fine"],
        coarse_keep=Cc,
        method="recompute",
        max_fine_per_coarse=idx["max_count"],
        **kw,
    )
    flat = centroid_scores_ref(q, *idx["fine"], **kw)
    assert np.isfinite(np.asarray(got)).all()
    _assert_scores_close(got, flat)


@pytest.mark.parametrize(
    "R, agg, method, keep, trunc, cpp, per_group",
    [
        # several groups per program, 2 coarse clusters per group, max_fine_per_coarse below the longest run
        (3, "mean", "logits", 5, 2, 2, 2),
        (192, "max", "auto", 4, 0, None, 1),  # prefill-sized rows (auto -> recompute)
    ],
)
def test_hierarchical_matches_ref(R, agg, method, keep, trunc, cpp, per_group):
    B, H, D, Cc = 2, 2, 64, 13
    rng = np.random.default_rng(R + keep)
    idx = _hier_index(rng, H, Cc, D, jnp.float32)
    q = _queries(rng, B, H, R, D, jnp.bfloat16)
    kw = dict(
        score="radius",
        agg=agg,
        method=method,
        coarse_keep=keep,
        max_fine_per_coarse=idx["max_count"] - trunc,
        dot_dtype=DOT,
        chunks_per_program=cpp,
        coarse_per_group=per_group,
    )
    got = hierarchical_scores(q, *idx["coarse"], *idx["fine"], **kw)
    want = hierarchical_scores_ref(q, *idx["coarse"], *idx["fine"], **kw)
    _assert_scores_close(got, want)
    reached = np.isfinite(np.asarray(want))
    assert 0 < reached.sum() < reached.size  # some, not all, fine clusters reached
    assert (np.asarray(got)[reached] <= 1e-4).all()  # log-probabilities


# ---------------------------------------------------------------------------------------------------------
# Errors and lowering
# ---------------------------------------------------------------------------------------------------------


def _small():
    rng = np.random.default_rng(0)
    c, logn, rad = _level(rng, 2, 20, 64, jnp.float32)
    return _queries(rng, 1, 2, 4, 64, jnp.bfloat16), c, logn, rad


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        (dict(score="max"), ValueError, "score"),
        (dict(agg="sum"), ValueError, "agg"),
        (dict(method="fast"), ValueError, "method"),
        (dict(block_c=48), ValueError, "block_c"),
        (dict(dot_dtype="int8"), ValueError, "dot_dtype"),
        (dict(chunks_per_program=0), ValueError, "chunks_per_program"),
        (dict(radius_weight=float("nan")), ValueError, "radius_weight"),
    ],
)
def test_flat_rejects_bad_options(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        centroid_scores(*_small(), **kw)


def test_flat_rejects_bad_shapes():
    q, c, logn, rad = _small()
    with pytest.raises(ValueError, match="centroids must be"):
        centroid_scores(q, c[:1], logn, rad)
    with pytest.raises(ValueError, match="log_sizes"):
        centroid_scores(q, c, logn[:, :5], rad)
    with pytest.raises(ValueError, match="head dim"):
        centroid_scores(q[..., :48], c[..., :48], logn, rad)
    with pytest.raises(TypeError, match="floating"):
        centroid_scores(q, c.astype(jnp.int32), logn, rad)
    with pytest.raises(ValueError, match="4-D"):
        centroid_scores(q[0], c, logn, rad)


def test_hierarchical_rejects_bad_args():
    q, c, logn, rad = _small()
    cc, cln = c[:, :5], logn[:, :5]
    first = jnp.arange(0, 20, 4, dtype=jnp.int32)[None].repeat(2, 0)
    count = jnp.full((2, 5), 4, jnp.int32)
    with pytest.raises(ValueError, match="coarse_keep"):
        hierarchical_scores(q, cc, cln, first, count, c, logn, rad, coarse_keep=6, max_fine_per_coarse=4)
    with pytest.raises(ValueError, match="coarse_keep"):
        hierarchical_scores(q, cc, cln, first, count, c, logn, rad, coarse_keep=0, max_fine_per_coarse=4)
    with pytest.raises(ValueError, match="max_fine_per_coarse"):
        hierarchical_scores(q, cc, cln, first, count, c, logn, rad, coarse_keep=2, max_fine_per_coarse=0)
    with pytest.raises(TypeError, match="coarse_first_HCc"):
        hierarchical_scores(
            q, cc, cln, first.astype(jnp.float32), count, c, logn, rad, coarse_keep=2, max_fine_per_coarse=4
        )
    with pytest.raises(ValueError, match="coarse_count_HCc"):
        hierarchical_scores(
            q, cc, cln, first, count[:, :3], c, logn, rad, coarse_keep=2, max_fine_per_coarse=4
        )
    with pytest.raises(ValueError, match="coarse_per_group"):
        hierarchical_scores(
            q, cc, cln, first, count, c, logn, rad, coarse_keep=2, max_fine_per_coarse=4, coarse_per_group=3
        )


@pytest.mark.parametrize("method, R", [("logits", 4), ("recompute", 256)])
def test_kernels_lower_to_triton_for_h100(method, R):
    S = jax.ShapeDtypeStruct
    B, H, D, C, Cc = 2, 8, 128, 1000, 200
    q = S((B, H, R, D), jnp.bfloat16)
    fine = (S((H, C, D), jnp.float32), S((H, C), jnp.float32), S((H, C), jnp.float32))
    coarse = (
        S((H, Cc, D), jnp.float32),
        S((H, Cc), jnp.float32),
        S((H, Cc), jnp.int32),
        S((H, Cc), jnp.int32),
    )
    kw = dict(score="radius", method=method, interpret=False)
    txt = lower_for_h100(lambda *a: centroid_scores(*a[:4], active_BH=a[4], **kw), q, *fine, S((B, H), jnp.bool_))
    assert has_triton_call(txt)
    assert "lookup_flat_lse" in txt and ("lookup_flat_scores" in txt) == (method == "recompute")
    txt = lower_for_h100(
        hierarchical_scores,
        q,
        *coarse,
        *fine,
        coarse_keep=20,
        max_fine_per_coarse=12,
        dot_dtype="bfloat16",
        **kw,
    )
    assert has_triton_call(txt) and "lookup_gather_lse" in txt
    assert ("lookup_gather_scores" in txt) == (method == "recompute")
