"""Batched K-means: monotone objective, planted clusters, numpy Lloyd reference, degenerate inputs, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeeze_jax.index.kmeans import INITS, AssignPlan, _assign, _systematic_pick, init_schedule, kmeans

P, N, D, C = 2, 256, 8, 8  # one shape for most tests, so the jitted stages compile once
KEY = jax.random.PRNGKey(0)


def _planted(seed: int, metric: str):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(P, C, D))
    if metric == "cosine":
        centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    else:
        centres *= 6.0
    labels = np.stack([rng.permutation(np.arange(N) % C) for _ in range(P)])
    x = centres[np.arange(P)[:, None], labels]
    if metric == "cosine":  # same direction, varied norm: only the direction identifies the cluster
        x = x * rng.uniform(0.5, 20.0, size=(P, N, 1))
    x = x + rng.normal(size=(P, N, D)) * 0.05 * np.linalg.norm(x, axis=-1, keepdims=True)
    return x.astype(np.float32), labels


def _check_valid(res, x_raw: np.ndarray, n_clusters: int, weights=None):
    a = np.asarray(res.assign_PN)
    sizes = np.asarray(res.sizes_PC)
    cent = np.asarray(res.centroids_PCD)
    assert a.min() >= 0 and a.max() < n_clusters
    assert np.all(sizes >= 1), sizes
    assert np.all(sizes.sum(axis=1) == x_raw.shape[1])
    assert np.all(np.isfinite(cent)) and np.all(np.isfinite(np.asarray(res.objective_P)))
    for p in range(x_raw.shape[0]):
        np.testing.assert_array_equal(np.bincount(a[p], minlength=n_clusters), sizes[p])
        w = np.ones(x_raw.shape[1]) if weights is None else weights[p]
        for c in range(n_clusters):
            m = a[p] == c
            want = (x_raw[p][m].astype(np.float64) * w[m, None]).sum(0) / w[m].sum()
            np.testing.assert_allclose(cent[p, c], want, rtol=1e-4, atol=1e-4 * (np.abs(want).max() + 1e-6))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_objective_never_increases(metric):
    x = jax.random.normal(jax.random.PRNGKey(3), (P, N, D))
    res = kmeans(x, C, key=KEY, iters=30, tol=0.0, metric=metric)
    hist = np.asarray(res.history_PI, np.float64)
    n = int(res.n_iters)
    assert n >= 2
    steps = np.diff(hist[:, :n], axis=1)
    assert np.all(steps <= 1e-5 * hist[:, :1]), steps.max()
    assert np.all(np.asarray(res.objective_P) <= hist[:, n - 1] * (1 + 1e-5))
    _check_valid(res, np.asarray(x), C)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_planted_clusters_recovered(metric, init):
    x, labels = _planted(1, metric)
    res = kmeans(jnp.asarray(x), C, key=KEY, iters=30, metric=metric, init=init)
    a = np.asarray(res.assign_PN)
    for p in range(P):
        pairs = {(int(t), int(f)) for t, f in zip(labels[p], a[p])}
        assert len(pairs) == C, f"problem {p}: planted and found clusters do not match one to one"
    _check_valid(res, x, C)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_matches_numpy_lloyd_with_same_init(metric):
    rng = np.random.default_rng(7)
    x = (rng.normal(size=(P, N, D)) + rng.normal(size=(P, 1, D)) * 3).astype(np.float32)
    iters = 30
    init = x[:, :C]
    res = kmeans(jnp.asarray(x), C, key=KEY, iters=iters, tol=0.0, metric=metric, init_PCD=jnp.asarray(init))

    x64 = x.astype(np.float64)
    if metric == "cosine":
        xs = x64 / np.linalg.norm(x64, axis=-1, keepdims=True)
        c = xs[:, :C].copy()
    else:
        mean = x64.mean(axis=1, keepdims=True)
        xs = x64 - mean
        c = init.astype(np.float64) - mean
    for _ in range(iters + 1):
        d = ((xs[:, :, None, :] - c[:, None, :, :]) ** 2).sum(-1)
        a = d.argmin(-1)
        for p in range(P):
            for j in range(C):
                assert (a[p] == j).any(), "reference data must not produce empty clusters"
                c[p, j] = xs[p][a[p] == j].mean(0)
    np.testing.assert_array_equal(np.asarray(res.assign_PN), a)
    raw = np.stack([[x64[p][a[p] == j].mean(0) for j in range(C)] for p in range(P)])
    np.testing.assert_allclose(np.asarray(res.centroids_PCD), raw, rtol=1e-5, atol=1e-5)
    obj = np.array([((xs[p] - c[p][a[p]]) ** 2).sum() for p in range(P)])
    np.testing.assert_allclose(np.asarray(res.objective_P), obj, rtol=1e-4)


def _degenerate_inputs():
    rng = np.random.default_rng(11)
    dup = np.repeat(rng.normal(size=(P, 5, D)), N // 5 + 1, axis=1)[:, :N]  # 5 distinct keys, C = 8
    equal = np.full((P, N, D), 0.37)
    big = rng.normal(size=(P, N, D)) * 1e4
    offset = 1e4 + rng.normal(size=(P, N, D))  # norms ~3e4, spread ~1: tests the centring
    zeros_and_dups = np.concatenate([np.zeros((P, N // 2, D)), dup[:, : N // 2]], axis=1)
    return {
        "duplicates": dup,
        "all_equal": equal,
        "norm_1e4": big,
        "offset_1e4": offset,
        "zero_vectors": zeros_and_dups,
    }


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("case", list(_degenerate_inputs()))
def test_degenerate_inputs_give_nonempty_finite_clusters(case, metric, init):
    x = _degenerate_inputs()[case].astype(np.float32)
    res = kmeans(jnp.asarray(x), C, key=KEY, iters=30, metric=metric, init=init)
    _check_valid(res, x, C)
    assert np.all(np.isfinite(np.asarray(res.history_PI)))


def test_weighted_points_give_weighted_means():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(P, N, D)).astype(np.float32)
    w = rng.integers(1, 50, size=(P, N)).astype(np.float32)
    res = kmeans(jnp.asarray(x), C, key=KEY, iters=30, metric="cosine", weights_PN=jnp.asarray(w))
    _check_valid(res, x, C, weights=w)


def test_restarts_keep_the_lowest_objective():
    x = jax.random.normal(jax.random.PRNGKey(4), (P, N, D))
    one = kmeans(x, C, key=KEY, iters=30)
    three = kmeans(x, C, key=KEY, iters=30, n_restarts=3)
    assert np.all(np.asarray(three.objective_P) <= np.asarray(one.objective_P) + 1e-6)
    _check_valid(three, np.asarray(x), C)


def test_padding_and_progress_loop_do_not_change_the_result():
    x = jax.random.normal(jax.random.PRNGKey(5), (P, N, D))
    base = kmeans(x, C, key=KEY, iters=30)
    other = kmeans(x, C, key=KEY, iters=30, chunk=96, progress=True, progress_every=4)  # N padded to 288
    np.testing.assert_array_equal(np.asarray(base.assign_PN), np.asarray(other.assign_PN))
    np.testing.assert_allclose(
        np.asarray(base.centroids_PCD), np.asarray(other.centroids_PCD), rtol=1e-5, atol=1e-6
    )
    assert int(base.n_iters) == int(other.n_iters)
    np.testing.assert_allclose(np.asarray(base.history_PI), np.asarray(other.history_PI), rtol=1e-5)


def test_fused_pallas_assignment_matches_xla():
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 160, 16))
    c = jax.random.normal(jax.random.PRNGKey(7), (2, 40, 16))
    xsq = jnp.sum(x * x, -1)
    a1, d1 = _assign(x, xsq, c, None, AssignPlan(chunk=160, impl="xla"))
    a2, d2 = _assign(x, xsq, c, None, AssignPlan(chunk=160, impl="pallas_interpret", block_n=32, block_c=16))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    np.testing.assert_allclose(np.asarray(d1), np.asarray(d2), rtol=1e-5, atol=1e-5)


def test_systematic_pick_takes_evenly_spaced_quantiles_of_the_mass():
    rng = np.random.default_rng(8)
    mass = rng.uniform(0.0, 1.0, size=(3, 50)).astype(np.float32)
    mass[:, 7] = 0.0
    chosen = np.zeros((3, 50), bool)
    chosen[:, [3, 20]] = True
    m = 6
    got = np.asarray(_systematic_pick(jnp.asarray(mass), jnp.asarray(chosen), m, 50))
    for p in range(3):
        cum = np.cumsum(np.where(chosen[p], 0.0, mass[p]))
        want = np.searchsorted(cum, (np.arange(m) + 0.5) / m * cum[-1], side="right")
        np.testing.assert_array_equal(got[p], want)  # spacing ~ 1/6 of the mass: no two quantiles share a point
        assert not chosen[p, got[p]].any() and not (mass[p, got[p]] == 0).any()


def test_systematic_pick_moves_repeated_picks_to_distinct_points():
    mass = np.zeros((1, 20), np.float32)
    mass[0, 5] = 100.0  # one point holds nearly all the mass: every quantile falls on it
    mass[0, 12] = 1.0
    got = np.asarray(_systematic_pick(jnp.asarray(mass), jnp.zeros((1, 20), bool), 4, 20))[0]
    assert got[0] == 5 and np.all(np.diff(got) >= 1), got


def test_systematic_init_does_not_depend_on_the_key():
    x, _ = _planted(2, "cosine")
    a = kmeans(jnp.asarray(x), C, key=jax.random.PRNGKey(0), iters=30, init="systematic")
    b = kmeans(jnp.asarray(x), C, key=jax.random.PRNGKey(123), iters=30, init="systematic")
    np.testing.assert_array_equal(np.asarray(a.assign_PN), np.asarray(b.assign_PN))
    np.testing.assert_array_equal(np.asarray(a.centroids_PCD), np.asarray(b.centroids_PCD))
    s0 = kmeans(jnp.asarray(x), C, key=jax.random.PRNGKey(0), iters=30)
    s1 = kmeans(jnp.asarray(x), C, key=jax.random.PRNGKey(123), iters=30)
    assert not np.array_equal(np.asarray(s0.assign_PN), np.asarray(s1.assign_PN))  # the sampled init does


def test_init_schedule_doubles_and_sums_to_c():
    for c in (1, 2, 3, 8, 100, 6547):
        s = init_schedule(c)
        assert sum(s) == c and s[0] == 1
        assert all(b <= max(1, sum(s[:i])) for i, b in enumerate(s))


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((P, N, D))
    with pytest.raises(ValueError, match="rank 3"):
        kmeans(jnp.zeros((N, D)), C, key=KEY)
    with pytest.raises(TypeError, match="floating"):
        kmeans(jnp.zeros((P, N, D), jnp.int32), C, key=KEY)
    with pytest.raises(ValueError, match="exceeds the number of points"):
        kmeans(x, N + 1, key=KEY)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans(x, 0, key=KEY)
    with pytest.raises(ValueError, match="metric"):
        kmeans(x, C, key=KEY, metric="dot")
    with pytest.raises(ValueError, match="NaN"):
        kmeans(x.at[0, 0, 0].set(jnp.nan), C, key=KEY)
    with pytest.raises(ValueError, match="weights_PN must have shape"):
        kmeans(x, C, key=KEY, weights_PN=jnp.ones((P, N + 1)))
    with pytest.raises(ValueError, match="positive weight"):
        kmeans(x, C, key=KEY, weights_PN=jnp.zeros((P, N)).at[:, :3].set(1.0))
    with pytest.raises(ValueError, match="init_PCD"):
        kmeans(x, C, key=KEY, init_PCD=jnp.zeros((P, C + 1, D)))
    with pytest.raises(ValueError, match="assign_impl"):
        kmeans(x, C, key=KEY, assign_impl="cuda")
    with pytest.raises(ValueError, match="matmul_dtype"):
        kmeans(x, C, key=KEY, matmul_dtype="float16")
    with pytest.raises(ValueError, match="unknown init"):
        kmeans(x, C, key=KEY, init="random")
    with pytest.raises(ValueError, match="n_restarts must be 1"):
        kmeans(x, C, key=KEY, init="systematic", n_restarts=2)
