"""Decode through ContextAttention: the row's own cache is attended together with the fixed context (one
launch on the kernel path) and must equal the two-part result (context part, dense cache part, LSE merge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kv_cache import LayerKV
from pallas_kernels.merge import merge_attention
from squeeze_jax.attention.context import ContextAttention, ContextState, LayerIndex, _user_attention
from tests.test_block_select import tiny_index


@pytest.mark.parametrize("policy,use_pallas", [("squeezed", True), ("squeezed", False), ("dense", False),
                                               ("dense", True), ("streaming", False)])
def test_decode_with_cache_equals_context_plus_cache_merged(policy, use_pallas):
    index, (H, G, D) = tiny_index()
    B, S = 2, 40
    key = jax.random.key(3)
    q = jax.random.normal(key, (B, 1, H * G, D))
    k_new = jax.random.normal(jax.random.fold_in(key, 1), (B, 1, H, D))
    v_new = jax.random.normal(jax.random.fold_in(key, 2), (B, 1, H, D))
    # a cache with stale entries past each row's length: they must not be read
    cache = LayerKV(jax.random.normal(jax.random.fold_in(key, 4), (B, S, H, D)),
                    jax.random.normal(jax.random.fold_in(key, 5), (B, S, H, D)) * 100.0)
    lengths = jnp.asarray([5, 31], jnp.int32)
    backend = ContextAttention(policy=policy, max_budget=0.25, use_pallas=use_pallas,
                               interpret=True if use_pallas else None)
    state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, jnp.full((1, B), 0.25), backend))
    out, new_kv, aux = backend(q, k_new, v_new, cache, lengths, lengths + 1, jnp.zeros((B, 1), jnp.int32), state)

    q_BHTGD = q.reshape(B, 1, H, G, D).transpose(0, 2, 1, 3, 4)
    o_c, lse_c, _ = backend.context_part(q_BHTGD, lengths + 1, LayerIndex.of(state.index), state)
    o_u, lse_u = _user_attention(q_BHTGD, new_kv.k_BSHD, new_kv.v_BSHD, lengths)
    o_m, _ = merge_attention(o_c.astype(jnp.float32), lse_c, o_u.astype(jnp.float32), lse_u)
    want = o_m.transpose(0, 2, 1, 3, 4).reshape(B, 1, H * G, D)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert 0.0 < float(aux["kept_fraction"]) <= 1.0
    # the stale tail of the cache really is ignored
    poisoned = LayerKV(cache.k_BSHD.at[:, 32:].set(1e4), cache.v_BSHD.at[:, 32:].set(jnp.nan))
    out_p = backend(q, k_new, v_new, poisoned, lengths, lengths + 1, jnp.zeros((B, 1), jnp.int32), state)[0]
    np.testing.assert_allclose(np.asarray(out_p), np.asarray(out), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("score,agg", [("box", "max"), ("mean", "mean")])
def test_folded_lookup_finish_selects_the_same_blocks(score, agg, monkeypatch):
    """fold_lookup_finish (lookup + selection in two launches) keeps the same blocks and gives the same output as
    the three-launch path, on the kernel path (interpret mode)."""
    index, (H, G, D) = tiny_index()
    B = 2
    q_BHTGD = jax.random.normal(jax.random.key(11), (B, H, 1, G, D))
    lengths = jnp.asarray([4, 10], jnp.int32)
    import squeeze_jax.attention.context as context_mod

    calls = []
    folded = context_mod.select_blocks_from_logits
    monkeypatch.setattr(context_mod, "select_blocks_from_logits", lambda *a, **k: calls.append(1) or folded(*a, **k))
    outs = []
    for fold in (False, True):
        backend = ContextAttention(max_budget=0.25, use_pallas=True, interpret=True, score=score, agg=agg,
                                   fold_lookup_finish=fold, fidelity=True)
        state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, jnp.full((1, B), 0.25), backend))
        o, lse, aux = backend.context_part(q_BHTGD, lengths, LayerIndex.of(state.index), state)
        outs.append((np.asarray(o), np.asarray(lse), np.asarray(aux["_kept_BHTN"])))
    assert len(calls) == 1  # the folded path ran once, for fold=True only
    assert 0 < outs[0][2].sum() < outs[0][2].size
    np.testing.assert_array_equal(outs[0][2], outs[1][2])
    for a, b in zip(outs[0][:2], outs[1][:2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_user_kv_only_in_decode():
    index, (H, G, D) = tiny_index()
    backend = ContextAttention(max_budget=0.25, use_pallas=False)
    state = jax.tree.map(lambda a: a[0], ContextState(index, jnp.full((1, 1), 0.25)))
    from squeeze_jax.attention.context import UserKV

    q = jnp.zeros((1, H, 3, G, D))
    user = UserKV(jnp.zeros((1, 4, H, D)), jnp.zeros((1, 4, H, D)), jnp.ones((1,), jnp.int32))
    with pytest.raises(ValueError, match="only in decode"):
        backend.context_part(q, jnp.asarray([3]), LayerIndex.of(state.index), state, user=user)


@pytest.mark.parametrize("budget", [0.0625, 0.125, 0.25])
def test_oracle_mass_is_the_recall_upper_bound(budget):
    """oracle_mass keeps, per KV group and token, the keys of largest summed probability: no other policy keeps
    more of the context's attention mass with the same number of keys."""
    index, (H, G, D) = tiny_index()
    B, T = 2, 3
    key = jax.random.key(21)
    q = jax.random.normal(key, (B, T, H * G, D)) * 2.0
    kv = jax.random.normal(jax.random.fold_in(key, 1), (B, T, H, D))
    cache = LayerKV(jnp.zeros((B, 4, H, D)), jnp.zeros((B, 4, H, D)))
    lengths = jnp.zeros((B,), jnp.int32)
    recall = {}
    for policy in ("oracle_mass", "oracle_key", "oracle", "squeezed", "streaming", "quest", "random"):
        backend = ContextAttention(policy=policy, max_budget=budget, use_pallas=False, fidelity=True)
        state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, jnp.full((1, B), budget), backend))
        _, _, aux = backend(q, kv, kv, cache, lengths, jnp.full((B,), T, jnp.int32),
                            jnp.broadcast_to(jnp.arange(T), (B, T)), state)
        recall[policy] = float(aux["recall"])
    assert all(recall["oracle_mass"] >= r - 1e-5 for r in recall.values()), recall
    assert recall["oracle_mass"] < 1.0


@pytest.mark.parametrize("use_pallas,fold", [(True, False), (True, True), (False, False)])
def test_full_budget_keeps_every_block_and_skips_its_lookup(use_pallas, fold, monkeypatch):
    """A request at budget 1 keeps every key block (equal to the dense policy) and its (row, head)s read no
    centroid; a request at 1/4 in the same batch keeps its own selection."""
    import squeeze_jax.attention.context as context_mod

    index, (H, G, D) = tiny_index()
    B = 2
    q_BHTGD = jax.random.normal(jax.random.key(5), (B, H, 1, G, D))
    lengths = jnp.asarray([3, 9], jnp.int32)
    seen = []
    name = "centroid_scores" if use_pallas else "centroid_scores_ref"
    lookup = getattr(context_mod.centroid_lookup, name)
    monkeypatch.setattr(context_mod.centroid_lookup, name,
                        lambda *a, **k: seen.append(k.get("active_BH")) or lookup(*a, **k))
    budget = jnp.asarray([[1.0, 0.25]])
    outs = {}
    for policy in ("squeezed", "dense"):
        backend = ContextAttention(policy=policy, max_budget=1.0, use_pallas=use_pallas,
                                   interpret=True if use_pallas else None, fidelity=True, fold_lookup_finish=fold,
                                   score="mean" if fold else "box")
        state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, budget, backend))
        outs[policy] = backend.context_part(q_BHTGD, lengths, LayerIndex.of(state.index), state)
    (o_s, lse_s, aux_s), (o_d, lse_d, _) = outs["squeezed"], outs["dense"]
    np.testing.assert_allclose(np.asarray(o_s[0]), np.asarray(o_d[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse_s[0]), np.asarray(lse_d[0]), rtol=1e-5, atol=1e-5)
    kept = np.asarray(aux_s["_kept_BHTN"])[:, :, 0]
    valid = np.asarray(context_mod._valid_keys(LayerIndex.of(state.index)))
    assert kept[0][valid].all() and not kept[1][valid].all()  # every key at budget 1, not at 1/4
    assert 0 < kept[1].sum() < kept[0].sum()
    if use_pallas and not fold:  # the three-launch kernel path masks the lookup per (row, head)
        np.testing.assert_array_equal(np.asarray(seen[-1]), [[False] * H, [True] * H])


def test_key_dtype_centroids_give_the_same_decode(monkeypatch):
    """With bf16 keys, the kernel path's state carries bf16 centroids for the lookup (half the bytes); the dot
    rounds float32 centroids to the bf16 queries' dtype anyway, so the step is unchanged."""
    import dataclasses

    import squeeze_jax.attention.context as context_mod

    read = []
    lookup = context_mod.centroid_lookup.centroid_scores
    monkeypatch.setattr(context_mod.centroid_lookup, "centroid_scores",
                        lambda q, c, *a, **k: read.append(c.dtype) or lookup(q, c, *a, **k))

    index, (H, G, D) = tiny_index()
    index = dataclasses.replace(index, keys_LHND=index.keys_LHND.astype(jnp.bfloat16),
                                values_LHND=index.values_LHND.astype(jnp.bfloat16))
    B, S = 2, 16
    key = jax.random.key(8)
    q = jax.random.normal(key, (B, 1, H * G, D), jnp.bfloat16)
    k_new = jax.random.normal(jax.random.fold_in(key, 1), (B, 1, H, D), jnp.bfloat16)
    cache = LayerKV(jnp.zeros((B, S, H, D), jnp.bfloat16), jnp.zeros((B, S, H, D), jnp.bfloat16))
    lengths = jnp.asarray([4, 10], jnp.int32)
    backend = ContextAttention(max_budget=0.25, use_pallas=True, interpret=True, score="mean", fidelity=True)
    budget = jnp.full((1, B), 0.25)
    with_bf16 = ContextState.for_backend(index, budget, backend)
    assert with_bf16.centroids_LHCD.dtype == jnp.bfloat16 and index.centroids_LHCD.dtype == jnp.float32
    plain = ContextState.create(index, budget, backend.block_k)
    assert plain.centroids_LHCD is None
    assert ContextState.for_backend(index, budget, dataclasses.replace(backend, score="box")).centroids_LHCD is None
    outs = []
    for st in (with_bf16, plain):
        out, _, aux = backend(q, k_new, k_new, cache, lengths, lengths + 1, jnp.zeros((B, 1), jnp.int32),
                              jax.tree.map(lambda a: a[0], st))
        outs.append((np.asarray(out, np.float32), float(aux["recall"])))
    assert read == [jnp.bfloat16, jnp.float32]
    assert outs[0][1] == outs[1][1]
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["squeezed", "dense", "streaming"])
def test_prefill_kept_fraction_counts_valid_tokens_only(policy):
    """The prefill's kept fraction is a mean over each row's valid user tokens: padding tokens of the length bucket
    do not count, and the exact tail's tokens count as every context key."""
    index, (H, G, D) = tiny_index()
    B, T = 2, 16
    seq_lens = jnp.asarray([3, 10], jnp.int32)
    q_BHTGD = jax.random.normal(jax.random.key(7), (B, H, T, G, D))
    full = (index.n_fixed + index.n_clustered) / index.context_len
    kept = {}
    for tail in (0, 2, 8):
        backend = ContextAttention(policy=policy, max_budget=0.125, use_pallas=False, exact_tail=tail)
        state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, jnp.full((1, B), 0.125), backend))
        kept[tail] = float(backend.context_part(q_BHTGD, seq_lens, LayerIndex.of(state.index), state)[2]
                           ["kept_fraction"])
    if policy == "dense":
        assert kept[0] == kept[2] == kept[8] == pytest.approx(full)
        return
    sparse = kept[0]
    assert 0.0 < sparse < 0.5 * full
    # 13 valid tokens; exact tail 2: 2 + 2 of them exact; exact tail 8: all 3 of row 0 and 8 of row 1
    assert kept[2] == pytest.approx((4 * full + 9 * sparse) / 13, rel=1e-5)
    assert kept[8] == pytest.approx((11 * full + 2 * sparse) / 13, rel=1e-5)


@pytest.mark.parametrize("budget", [0.1, 0.125, 0.3])
def test_block_id_lists_need_no_padding_in_the_kernels(budget, monkeypatch):
    """The selection's capacity is rounded up to IDS_MULTIPLE blocks (the decode kernel reads 8 ids a step), so the
    decode kernel pads nothing; k is clipped at the unrounded capacity, so the same blocks are kept."""
    import math

    import squeeze_jax.attention.context as context_mod
    from squeeze_jax.attention.context import IDS_MULTIPLE

    index, (H, G, D) = tiny_index()
    B = 2
    backend = ContextAttention(max_budget=budget, use_pallas=True, interpret=True)
    state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, jnp.full((1, B), budget), backend))
    idx = LayerIndex.of(state.index)
    k_BH, capacity = backend._k_blocks(idx, jnp.full((B,), budget))
    n_blocks = idx.keys.shape[1] // backend.block_k
    assert capacity % IDS_MULTIPLE == 0 or capacity == n_blocks
    assert int(k_BH.max()) <= math.ceil(budget * idx.context_len / backend.block_k) <= capacity
    seen = []
    real = context_mod.sparse_decode
    monkeypatch.setattr(context_mod, "sparse_decode", lambda q, k, v, ids, count, **kw: seen.append(ids.shape[-1])
                        or real(q, k, v, ids, count, **kw))
    q_BHTGD = jax.random.normal(jax.random.key(2), (B, H, 1, G, D))
    o, _, aux = backend.context_part(q_BHTGD, jnp.ones((B,), jnp.int32), idx, state)
    assert seen == [capacity] and np.isfinite(np.asarray(o)).all()
    assert float(aux["kept_fraction"]) <= budget + backend.block_k / idx.context_len


def test_lowered_decode_step_pads_no_block_table():
    """The kernel path's decode step, lowered for an H100, pads no integer array: the block tables come padded
    from ContextState and the id lists are as wide as the kernels read them (the one pad left is the lookup's
    query rows, float); nor does it take the log of the cluster sizes (ContextState holds it)."""
    import re

    from pallas_kernels.common import lower_for_h100

    index, (H, G, D) = tiny_index()
    B, S = 1, 64
    backend = ContextAttention(max_budget=0.25, use_pallas=True, interpret=False)
    state = jax.tree.map(lambda a: a[0], ContextState.for_backend(index, jnp.full((1, B), 0.125), backend))
    cache = LayerKV(jnp.zeros((B, S, H, D)), jnp.zeros((B, S, H, D)))

    def step(q, k, v, cache, lengths, state):
        return backend(q, k, v, cache, lengths, jnp.ones((B,), jnp.int32), jnp.zeros((B, 1), jnp.int32), state)[0]

    text = lower_for_h100(step, jnp.zeros((B, 1, H * G, D)), jnp.zeros((B, 1, H, D)), jnp.zeros((B, 1, H, D)), cache,
                          jnp.asarray([5], jnp.int32), state)
    pads = re.findall(r"stablehlo\.pad .*-> tensor<([^>]*)>", text)
    assert pads and all(not t.endswith("i32") for t in pads), pads
    assert not re.search(rf"stablehlo\.log .*tensor<{H}x{index.n_clusters}xf32>", text)
