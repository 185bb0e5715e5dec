"""Question prior: the exact question pass's block log-probabilities carried into decode selection."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selection
from squeeze_jax.attention.context import ContextAttention, ContextState, LayerIndex, _valid_keys
from tests.test_block_select import tiny_index


@pytest.mark.parametrize("N,block_k,chunk", [(96, 16, 4096), (200, 8, 64), (64, 4, 16)])
def test_block_logprob_max_matches_numpy(N, block_k, chunk, monkeypatch):
    monkeypatch.setattr(selection, "PRIOR_KEY_CHUNK", chunk)
    rng = np.random.default_rng(N)
    B, H, R, D = 2, 3, 5, 16
    q = rng.normal(size=(B, H, R, D)).astype(np.float32)
    k = rng.normal(size=(H, N, D)).astype(np.float32)
    valid = rng.random(N) < 0.8
    valid[:block_k] = False  # one block with no valid key
    scale = D ** -0.5
    s = np.einsum("bhrd,hnd->bhrn", q, k) * scale
    s = np.where(valid, s, -np.inf)
    lse = np.log(np.sum(np.exp(s - s.max(-1, keepdims=True)), -1)) + s.max(-1)
    got = np.asarray(jax.jit(lambda *a: selection.block_logprob_max(*a, block_k=block_k, scale=scale))(
        q, k, lse, valid))
    want = np.max((s - lse[..., None]).reshape(B, H, R, N // block_k, block_k), axis=(2, 4))
    assert got.shape == (B, H, N // block_k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[..., 0] == -np.inf) and np.all(got[..., 1:][np.isfinite(want[..., 1:])] <= 1e-6)
    with pytest.raises(ValueError, match="multiple of block_k"):
        selection.block_logprob_max(q, k[:, :-1], lse, valid[:-1], block_k=block_k, scale=scale)


def test_question_prior_needs_the_exact_question_pass():
    with pytest.raises(ValueError, match="question_prior"):
        ContextAttention(question_prior=4)
    with pytest.raises(ValueError, match="question_prior"):
        ContextAttention(question_prior=8, exact_tail=4)
    with pytest.raises(ValueError, match="question_prior"):
        ContextAttention(policy="oracle", question_prior=4, exact_tail=4)
    with pytest.raises(ValueError, match="question_prior"):
        ContextAttention(question_prior=-1)
    assert ContextAttention(question_prior=4, exact_tail=4).exact_variant().question_prior == 0


@pytest.mark.parametrize("use_pallas", [False, True])
def test_prefill_prior_reaches_decode_selection(use_pallas):
    """Prefill with question_prior puts the question's block log-probabilities in aux; `after_prefill` moves them
    into the state; a decode step then keeps every block the prior ranks with the fixed ones (+inf) and keeps
    the budget."""
    index, (H, G, D) = tiny_index()
    B, T = 2, 6
    kw = dict(max_budget=0.25, exact_tail=T, question_prior=3, use_pallas=use_pallas,
              interpret=True if use_pallas else None)
    backend = ContextAttention(**kw)
    state_L = ContextState.for_backend(index, jnp.full((1, B), 0.25), backend)
    state = jax.tree.map(lambda a: a[0], state_L)
    idx = LayerIndex.of(state.index)
    key = jax.random.key(0)
    q_pre = jax.random.normal(key, (B, H, T, G, D))
    _, _, aux = backend.context_part(q_pre, jnp.asarray([T, 4]), idx, state)
    prior = aux["_prior_BHN"]
    nb = idx.keys.shape[1] // backend.block_k
    assert prior.shape == (B, H, nb)
    assert np.all(np.asarray(prior) <= 1e-5) and np.isfinite(np.asarray(prior)).any()
    # the prior equals block_logprob_max over the last 3 valid question tokens' exact attention
    new_state, rest = backend.after_prefill(state_L, {k: v[None] for k, v in aux.items()})
    assert "_prior_BHN" not in rest and new_state.prior_LBHN.shape == (1, B, H, nb)
    assert backend.after_prefill(state_L, rest)[0].prior_LBHN is None

    # decode: force, through the prior, a block the step's own selection leaves out (fidelity aux: attended keys)
    dec = dataclasses.replace(backend, fidelity=True)
    base = dataclasses.replace(dec, question_prior=0)
    q_dec = jax.random.normal(jax.random.fold_in(key, 1), (B, H, 1, G, D))
    _, _, aux_0 = base.context_part(q_dec, jnp.asarray([1, 1]), idx, state)
    bk = backend.block_k
    valid_HN = np.asarray(_valid_keys(idx))
    kept_0 = np.asarray(aux_0["_kept_BHTN"])
    target = max(b for b in range(nb) if valid_HN[:, b * bk:(b + 1) * bk].all()
                 and not kept_0[0, 0, 0, b * bk:(b + 1) * bk].any())
    forced = jnp.full((1, B, H, nb), -jnp.inf).at[..., target].set(jnp.inf)
    st = jax.tree.map(lambda a: a[0], dataclasses.replace(state_L, prior_LBHN=forced))
    _, _, aux_d = dec.context_part(q_dec, jnp.asarray([1, 1]), idx, st)
    kept = np.asarray(aux_d["_kept_BHTN"])  # [B, H, 1, N]
    assert kept[:, :, 0, target * bk:(target + 1) * bk].all()
    assert float(aux_d["kept_fraction"]) == pytest.approx(float(aux_0["kept_fraction"]), abs=1e-6)
    bad = jax.tree.map(lambda a: a[0], dataclasses.replace(state_L, prior_LBHN=forced[..., :-1]))
    with pytest.raises(ValueError, match="prior_LBHN"):
        dec.context_part(q_dec, jnp.asarray([1, 1]), idx, bad)


def test_prior_pin_pins_the_questions_top_blocks():
    """prior_pin: +inf on the question's top share of the clustered blocks a decode step keeps, -inf elsewhere;
    at least one block stays the step's own choice."""
    index, (H, G, D) = tiny_index()
    idx = LayerIndex.of(jax.tree.map(lambda a: a[0], index))
    B = 2
    budget = jnp.asarray([0.25, 0.5])
    backend = ContextAttention(max_budget=0.5, exact_tail=4, question_prior=2, prior_pin=0.5)
    k_BH, _ = backend._k_blocks(idx, budget)
    fixed = -(-idx.n_fixed // backend.block_k)
    nb = idx.keys.shape[1] // backend.block_k
    rng = np.random.default_rng(0)
    prior = rng.normal(size=(B, H, nb)).astype(np.float32)
    prior[:, :, :2] = -np.inf  # blocks the question never saw are never pinned
    pins = np.asarray(backend._pin(jnp.asarray(prior), idx, budget))
    assert set(np.unique(pins)) <= {np.inf, -np.inf}
    for b in range(B):
        for h in range(H):
            n_pin = int(np.floor(0.5 * (int(k_BH[b, h]) - fixed)))
            top = set(np.argsort(-prior[b, h])[:n_pin].tolist())
            assert set(np.flatnonzero(pins[b, h] == np.inf).tolist()) == top and n_pin >= 1
            assert n_pin <= int(k_BH[b, h]) - fixed - 1
    with pytest.raises(ValueError, match="prior_pin"):
        ContextAttention(prior_pin=0.5)
    with pytest.raises(ValueError, match="prior_pin"):
        ContextAttention(exact_tail=4, question_prior=2, prior_pin=1.5)


@pytest.mark.parametrize("use_pallas", [False, True])
def test_prior_pin_one_decodes_over_the_questions_selection(use_pallas):
    """prior_pin=1: prefill chooses each row's blocks once (fixed blocks + the question's top prior); decode steps
    attend exactly those blocks, whatever their query, at the budget's block count."""
    index, (H, G, D) = tiny_index()
    B, T = 2, 6
    backend = ContextAttention(max_budget=0.25, exact_tail=T, question_prior=2, prior_pin=1.0, fidelity=True,
                               use_pallas=use_pallas, interpret=True if use_pallas else None)
    state_L = ContextState.for_backend(index, jnp.full((1, B), 0.25), backend)
    state = jax.tree.map(lambda a: a[0], state_L)
    idx = LayerIndex.of(state.index)
    key = jax.random.key(2)
    _, _, aux = backend.context_part(jax.random.normal(key, (B, H, T, G, D)), jnp.asarray([T, 5]), idx, state)
    assert "_prior_BHN" not in aux
    new_L, rest = backend.after_prefill(state_L, {k: v[None] for k, v in aux.items()})
    assert "_question_ids_BHM" not in rest and new_L.prior_LBHN is None
    ids, count = np.asarray(new_L.question_ids_LBHM[0]), np.asarray(new_L.question_count_LBH[0])
    k_BH, _ = backend._k_blocks(idx, jnp.full((B,), 0.25))
    np.testing.assert_array_equal(count, np.asarray(k_BH))
    st = jax.tree.map(lambda a: a[0], new_L)
    bk = backend.block_k
    for s in range(2):
        q_dec = jax.random.normal(jax.random.fold_in(key, 10 + s), (B, H, 1, G, D))
        o, _, aux_d = backend.context_part(q_dec, jnp.asarray([1, 1]), idx, st)
        kept = np.asarray(aux_d["_kept_BHTN"])[:, :, 0]
        for b in range(B):
            for h in range(H):
                want = np.zeros(kept.shape[-1], bool)
                for blk in ids[b, h, : count[b, h]]:
                    want[blk * bk:(blk + 1) * bk] = True
                np.testing.assert_array_equal(kept[b, h], want & np.asarray(_valid_keys(idx))[h])
        assert np.isfinite(np.asarray(o)).all()
