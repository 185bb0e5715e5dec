"""Attention over a pre-indexed fixed context, sparse by a selection policy, plus dense user/generated tokens.

The fixed context's keys/values live in the context index (cluster-ordered, post-RoPE, shared by the batch).
The user and generated tokens live in the model's KV cache. For every layer:

    out = merge( attend(q, selected context keys) , attend_causal(q, cache keys) )   (merged by log-sum-exp)

Policies that run on the Pallas kernels select aligned key blocks (see ARCHITECTURE.md):
  dense      every valid block (exact full attention; the baseline with a prefix KV cache)
  squeezed   centroid lookup -> block scores -> top-k blocks per KV head (per decode step / per query block);
             cluster scores "box" (default: a quarter of the way from the centroid logit to the cluster's
             key-box upper bound, squeeze_jax/index/bounds.py), "mean" (centroid logit) or "radius"
  oracle     exact per-block max logit -> top-k blocks (an upper bound for block selection)
Policies evaluated at key granularity through the masked jnp path (for baselines and fidelity studies):
  oracle_key  exact top-k keys per KV group (by the group's largest logit);
  oracle_mass top-k keys per KV group by the summed attention probability of its query heads: the largest
              context-mass recall any selection of that many keys (sinks and window kept) reaches;
  streaming   sinks + most recent keys;
  quest       pages of 16 consecutive tokens (original order) scored by per-channel min/max bounds;
  random      random keys (a lower bound).

Budget allocation (`allocation`): "uniform" keeps the same number of keys in every layer and KV head;
"calibrated" splits the same total over (layer, KV head) as the index's calibration decided (`budgets_LHF`,
see squeeze_jax/index/calibrate.py). A request budget equal to one of the index's `budget_fractions` uses that
column; other budgets interpolate between the calibrated columns (and "nothing" / "everything" at the ends,
so the total is kept and budget 1 is dense). "auto" is "calibrated" when the index carries budgets and "uniform"
otherwise. The default is "uniform": calibrated budgets raise the mean recall by ~0.01 on SmolLM2
(results/fidelity_smollm2.md) but lose the `make demo` passkey at 1/8 that the uniform split answers.

Fidelity aux (with `fidelity=True`): `recall` is the context-only attention-mass recall (softmax over the
fixed context's keys alone), `recall_total` the total-mass recall (softmax over the context plus the user's
own tokens, which are always attended): the fraction of the full attention mass the sparse computation covers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models.attention import write_kv
from models.kv_cache import LayerKV
from pallas_kernels import centroid_lookup, selection
from pallas_kernels.block_select import (
    FROM_LOGITS_MAX_ROWS,
    MAX_BLOCKS,
    block_cluster_ranges,
    default_chunk_blocks,
    select_blocks,
    select_blocks_from_logits,
)
from pallas_kernels.common import has_gpu, next_pow2, round_up, valid_blocks
from pallas_kernels.merge import (
    chunked_attention_lse,
    dense_attention_lse,
    last_valid_positions,
    merge_attention,
    put_rows,
)
from pallas_kernels.sparse_decode import all_keys_attention, dense_decode, sparse_decode, sparse_decode_ref
from pallas_kernels.sparse_prefill import sparse_prefill, sparse_prefill_ref
from squeeze_jax.index.bounds import index_box_table, signed_split

BLOCK_POLICIES = ("dense", "squeezed", "oracle")
KEY_POLICIES = ("oracle_key", "oracle_mass", "streaming", "quest", "random")
POLICIES = BLOCK_POLICIES + KEY_POLICIES
ALLOCATIONS = ("auto", "uniform", "calibrated")
SCORES = ("mean", "radius", "box")
QUEST_PAGE = 16
# Selection capacities are rounded up to a multiple of this: the decode (8) and prefill (4) attention kernels read
# their block ids that many at a time and would otherwise pad the id lists on every call.
IDS_MULTIPLE = 8


def fused_select_chunks(n_blocks: int, programs: int) -> int | None:
    """How the kernel path selects among `n_blocks` key blocks per head for `programs` (rows x KV heads)
    selections: `chunk_blocks` for `block_select.select_blocks` (0 = one program per row and head; chunked where
    that leaves most SMs idle), or None for block scores + top-k in XLA (past the kernels' block limit). On the
    H100 the Pallas selection beat the XLA path at 512K keys too (GQA 233.9 vs 280.2 us per decode step, MHA
    673.7 vs 762.0 us)."""
    if n_blocks > MAX_BLOCKS:
        return None
    return default_chunk_blocks(n_blocks, programs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ContextState:
    """Backend state: the context index (leading layer axis) and a per-request kept fraction `budget_B`.

    `block_lo_LHB, block_hi_LHB` (optional, from `ContextState.create`): per key block the range of clusters
    overlapping it, precomputed once per index so that decode on the GPU runs the fused selection kernel (padded
    to a power-of-two count of blocks, the width that kernel reads).
    `centroids_LHCD` (optional): the index's fine centroids in the keys' dtype, read by the lookup instead of the
    index's float32 ones: half the bytes, and on the GPU the same scores (its dot rounds float32 centroids to the
    bf16 queries' dtype anyway).
    """

    index: Any
    budget_B: jax.Array
    block_lo_LHB: jax.Array | None = None
    block_hi_LHB: jax.Array | None = None
    box_table_LHCE: jax.Array | None = None
    prior_LBHN: jax.Array | None = None  # per request: the question's block log-probabilities (question_prior)
    question_ids_LBHM: jax.Array | None = None  # per request: the question's own selection (prior_pin=1)
    question_count_LBH: jax.Array | None = None
    # per request: where the prompt rows that `exact_tail` makes exact end (default: each row's length). Teacher
    # forcing a question + answer row sets the answer's start, so that the answer tokens stay sparse as in decode.
    exact_end_LB: jax.Array | None = None
    centroids_LHCD: jax.Array | None = None
    log_sizes_LHC: jax.Array | None = None  # log of each cluster's key count (>= 1), once per index

    @classmethod
    def create(cls, index, budget_LB: jax.Array, block_k: int = 16, box_weight: float | None = None,
               key_dtype_centroids: bool = False) -> ContextState:
        """State with the block -> cluster tables for `block_k` (the backend's key-block size) precomputed, with
        `box_weight` the box-score table of `score="box"` (squeeze_jax/index/bounds.py) in the keys' dtype, and
        with `key_dtype_centroids` the centroids in the keys' dtype (when that is not theirs)."""
        n_blocks = index.keys_LHND.shape[2] // block_k
        ranges = jax.jit(jax.vmap(functools.partial(block_cluster_ranges, n_blocks=n_blocks, block_k=block_k,
                                                    pad_pow2=True)))
        lo, hi = ranges(index.cluster_start_LHC, index.cluster_size_LHC)
        table = None
        if box_weight is not None:
            build = jax.jit(jax.vmap(functools.partial(index_box_table, box_weight=float(box_weight),
                                                       dtype=index.keys_LHND.dtype)))
            table = build(index.keys_LHND, index.centroids_LHCD, index.cluster_start_LHC, index.cluster_size_LHC)
        cents = None
        if key_dtype_centroids and index.centroids_LHCD.dtype != index.keys_LHND.dtype:
            cents = index.centroids_LHCD.astype(index.keys_LHND.dtype)
        return cls(index=index, budget_B=budget_LB, block_lo_LHB=lo, block_hi_LHB=hi, box_table_LHCE=table,
                   centroids_LHCD=cents, log_sizes_LHC=_log_sizes(index.cluster_size_LHC))

    @classmethod
    def for_backend(cls, index, budget_LB: jax.Array, backend: ContextAttention) -> ContextState:
        """`create` with what `backend` reads: its block size, the box table when it scores boxes, and on the
        kernel path centroids in the keys' dtype when it scores centroids."""
        squeezed = backend.policy == "squeezed"
        return cls.create(index, budget_LB, backend.block_k,
                          backend.box_weight if squeezed and backend.score == "box" else None,
                          key_dtype_centroids=squeezed and backend.score != "box" and backend._pallas())


@dataclasses.dataclass(frozen=True)
class LayerIndex:
    """One layer of a `ContextIndex` (leading L axis already removed by the layer scan), short names."""

    keys: jax.Array
    values: jax.Array
    positions: jax.Array
    centroids: jax.Array
    cluster_start: jax.Array
    cluster_size: jax.Array
    radius: jax.Array
    coarse_centroids: jax.Array | None
    coarse_first: jax.Array | None
    coarse_count: jax.Array | None
    budgets: jax.Array | None  # [H, F] calibrated clustered keys per head for each of budget_fractions
    context_len: int
    n_fixed: int
    fixed_pad: int
    n_clustered: int
    max_fine_per_coarse: int
    budget_fractions: tuple[float, ...]
    log_sizes: jax.Array | None = None  # from ContextState (computed once); else computed where needed

    @classmethod
    def of(cls, ix) -> LayerIndex:
        return cls(ix.keys_LHND, ix.values_LHND, ix.positions_LHN, ix.centroids_LHCD, ix.cluster_start_LHC,
                   ix.cluster_size_LHC, ix.radius_LHC, ix.coarse_centroids_LHCcD, ix.coarse_first_LHCc,
                   ix.coarse_count_LHCc, ix.budgets_LHF, ix.context_len, ix.n_fixed, ix.fixed_pad,
                   ix.n_clustered, ix.max_fine_per_coarse, tuple(ix.budget_fractions))

    @property
    def cluster_log_sizes(self) -> jax.Array:
        """log of each fine cluster's key count `[H, C]` (empty clusters count 1: their blocks are masked by size)."""
        return _log_sizes(self.cluster_size) if self.log_sizes is None else self.log_sizes

    @property
    def coarse_size(self) -> jax.Array:
        """Keys under each coarse cluster `[H, Cc]` (sum of its run of fine cluster sizes)."""
        cs = jnp.cumsum(self.cluster_size, axis=-1)
        cs = jnp.concatenate([jnp.zeros_like(cs[:, :1]), cs], axis=-1)
        end = jnp.take_along_axis(cs, self.coarse_first + self.coarse_count, axis=-1)
        return end - jnp.take_along_axis(cs, self.coarse_first, axis=-1)


@dataclasses.dataclass(frozen=True)
class ContextAttention:
    """Attention backend for prompts that continue a pre-indexed fixed context.

    `use_pallas=None` runs the Pallas kernels on a GPU and their jnp references elsewhere (interpret mode is for
    tests: it runs grid programs one by one). `max_budget` (static) sizes the selection capacity; each request's
    budget (fraction of context keys kept, always-attended sinks + window included) comes from
    `ContextState.budget_B` and must be <= max_budget. `allocation` ("auto" | "uniform" | "calibrated", see the
    module docstring) splits that budget over (layer, KV head); "calibrated" needs a calibrated index and lets
    one head keep up to `max_head_share` x the uniform share (the static selection capacity grows accordingly).
    `exact_tail` (0 = off): in prefill, the last `exact_tail` valid user tokens of each row attend every context
    key exactly (one dense decode step's reads per token, once per question); the next token is read from them.
    `exact_decode` (0 = off): `generate` runs the first `exact_decode` decode steps with `exact_variant()`
    (every context key, one dense decode step each), so the answer's first tokens are read from exact attention.
    `question_prior` (0 = off; <= exact_tail, squeezed policy): the exact pass of the question's last
    `question_prior` tokens also gives, per (row, KV head) and key block, the largest attention log-probability
    of any of its keys; `generate` carries it into decode (`after_prefill`), where each step's block score is
    the max of that prior and the step's own cluster estimate. The budget is unchanged: blocks the question
    attended compete with the step's own choices for the same k blocks. `prior_pin=f` in (0, 1) pins the
    question's top f share of each step's clustered blocks instead; `prior_pin=1` makes the question choose
    every block once, in prefill, and decode steps run no lookup or selection at all.
    `fold_lookup_finish` (kernel path, flat lookup, <= 8 rows per selection): the lookup's second launch (logits
    to scores) runs inside the selection kernel, so a decode step's lookup + selection is two launches, not
    three; same blocks (tested in interpret mode and on the H200). Off by default: on the H200 at 128K keys the
    two launches take 43.6 us against 39.3 us for three (the per-cluster finish in the selection's gather costs
    more than the launch it saves).
    """

    policy: str = "squeezed"
    max_budget: float = 0.125
    block_k: int = 16
    block_q: int = 1  # user tokens sharing one selection in prefill; per token keeps needle recall
    score: str = "box"
    radius_weight: float = 1.0
    box_weight: float = 0.25
    agg: str = "max"
    hierarchical: bool = False
    coarse_keep_fraction: float = 0.25
    use_pallas: bool | None = None
    interpret: bool | None = None
    fidelity: bool = False
    allocation: str = "uniform"
    max_head_share: float = 4.0
    exact_tail: int = 0
    exact_decode: int = 0
    question_prior: int = 0
    prior_pin: float = 0.0
    fold_lookup_finish: bool = False

    def __post_init__(self) -> None:
        for name in ("exact_tail", "exact_decode", "question_prior"):
            n = getattr(self, name)
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"{name} must be an int >= 0, got {n!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; expected one of {POLICIES}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}")
        if not self.max_head_share >= 1.0:
            raise ValueError(f"max_head_share must be >= 1, got {self.max_head_share}")
        if not 0.0 < self.max_budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.max_budget}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; expected one of {SCORES}")
        if self.agg not in ("max", "mean"):
            raise ValueError(f"unknown agg {self.agg!r}; expected 'max' or 'mean'")
        if not 0.0 <= self.box_weight <= 1.0:
            raise ValueError(f"box_weight must be in [0, 1], got {self.box_weight}")
        if self.question_prior and (self.question_prior > self.exact_tail or self.policy != "squeezed"):
            raise ValueError(f"question_prior={self.question_prior} reads the exact question pass: it needs policy "
                             f"'squeezed' and exact_tail >= question_prior (got policy {self.policy!r}, "
                             f"exact_tail={self.exact_tail})")
        if not 0.0 <= self.prior_pin <= 1.0 or (self.prior_pin and not self.question_prior):
            raise ValueError(f"prior_pin must be in [0, 1] and needs question_prior >= 1, got {self.prior_pin}")
        if self.score == "box" and self.hierarchical:
            raise ValueError("score='box' (the default) runs the flat lookup; the hierarchical lookup scores "
                             "centroids: pass score='mean' with hierarchical=True")

    def exact_variant(self) -> ContextAttention:
        """The same backend attending every context key (policy "dense"): the first `exact_decode` steps."""
        return dataclasses.replace(self, policy="dense", exact_decode=0, question_prior=0)

    def after_prefill(self, state: ContextState, aux: dict) -> tuple[ContextState, dict]:
        """What a prefill hands to decode (called by `generate`): with `question_prior`, the question's block
        prior `[L, B, H, blocks]` (or with prior_pin=1 its block selection) moves from the prefill's aux into the
        state; aux keeps the stats."""
        if not self.question_prior or aux is None:
            return state, aux
        aux = dict(aux)
        if "_question_ids_BHM" in aux:
            return dataclasses.replace(state, question_ids_LBHM=aux.pop("_question_ids_BHM"),
                                       question_count_LBH=aux.pop("_question_count_BH")), aux
        if "_prior_BHN" not in aux:
            return state, aux
        return dataclasses.replace(state, prior_LBHN=aux.pop("_prior_BHN")), aux

    def _calibrated(self, idx) -> bool:
        """Whether this layer's selection uses the index's calibrated per-head budgets (static)."""
        if self.allocation == "auto":
            return idx.budgets is not None and bool(idx.budget_fractions)
        return self.allocation == "calibrated"

    def _pallas(self) -> bool:
        if self.use_pallas is None:
            return has_gpu() or bool(self.interpret)
        return self.use_pallas

    # ------------------------------------------------------------------ the interface
    def __call__(self, q_BTHqD, k_BTHD, v_BTHD, layer_kv: LayerKV, lengths_B, seq_lens_B, positions_BT,
                 layer_state: ContextState):
        del positions_BT
        idx = LayerIndex.of(layer_state.index)
        # what the state computed once per index: the lookup's centroids in the keys' dtype, the log cluster sizes
        once = dict(centroids=layer_state.centroids_LHCD, log_sizes=layer_state.log_sizes_LHC)
        idx = dataclasses.replace(idx, **{k: v for k, v in once.items() if v is not None})
        new_kv = write_kv(layer_kv, k_BTHD, v_BTHD, lengths_B, seq_lens_B)
        B, T, Hq, D = q_BTHqD.shape
        H = idx.keys.shape[0]
        G = Hq // H
        q_BHTGD = q_BTHqD.reshape(B, T, H, G, D).transpose(0, 2, 1, 3, 4)

        if T == 1 and not self.fidelity:
            # decode: the token's own cache (first lengths + 1 entries) joins the context attention, one launch
            user = UserKV(new_kv.k_BSHD, new_kv.v_BSHD, lengths_B + 1)
            o, _, aux = self.context_part(q_BHTGD, seq_lens_B, idx, layer_state, user=user)
        else:
            # user / generated tokens: dense causal over the cache; fixed context: sparse; merged by LSE
            o_user, lse_user = _user_attention(q_BHTGD, new_kv.k_BSHD, new_kv.v_BSHD, lengths_B)
            o_ctx, lse_ctx, aux = self.context_part(q_BHTGD, seq_lens_B, idx, layer_state)
            o, _ = merge_attention(o_ctx.astype(jnp.float32), lse_ctx, o_user.astype(jnp.float32), lse_user)
            if self.fidelity:
                aux.update(_fidelity(q_BHTGD, idx, seq_lens_B, aux.pop("_kept_BHTN"), lse_user))
        out = o.transpose(0, 2, 1, 3, 4).reshape(B, T, Hq, D).astype(q_BTHqD.dtype)
        return out, new_kv, aux

    # ------------------------------------------------------------------ context part
    def context_part(self, q_BHTGD, seq_lens_B, idx, state: ContextState, user: UserKV | None = None):
        """Attention of the user/generated queries over the fixed context: `(o, lse, aux)`; the selection
        policy's sparse result, with the last `exact_tail` prefill rows replaced by exact attention. With
        `user` (decode only), the result is over the context and the row's valid cache entries together."""
        T = q_BHTGD.shape[2]
        prior = state.prior_LBHN if T == 1 and self.question_prior else None  # the layer's [B, H, blocks]
        chosen = None  # prior_pin=1: the selection the question made in prefill, [B, H, M] and [B, H]
        if T == 1 and self.question_prior and state.question_ids_LBHM is not None:
            chosen = (state.question_ids_LBHM, state.question_count_LBH)
        o, lse, aux = self._context(q_BHTGD, seq_lens_B, idx, state.budget_B,
                                    (state.block_lo_LHB, state.block_hi_LHB), state.box_table_LHCE, user, prior,
                                    chosen)
        if self.exact_tail and T > 1:
            ends_B = seq_lens_B if state.exact_end_LB is None else jnp.minimum(state.exact_end_LB, seq_lens_B)
            o, lse, aux = self._exact_tail(q_BHTGD, ends_B, idx, o, lse, aux, min(self.exact_tail, T),
                                           state.budget_B)
        aux = dict(aux)
        aux["kept_fraction"] = _kept_fraction(aux.pop("_kept_keys_BT"), seq_lens_B, idx.context_len)
        return o, lse, aux

    def _exact_tail(self, q_BHTGD, ends_B, idx, o, lse, aux, rows: int, budget_B):
        """Rows `ends_B - rows .. ends_B - 1` of each request attend every context key exactly."""
        B, H, T = q_BHTGD.shape[:3]
        pos_BL = last_valid_positions(ends_B, rows, T)
        q_BHLGD = jnp.take_along_axis(q_BHTGD, pos_BL[:, None, :, None, None], axis=2)
        valid_N = _valid_keys(idx)[0]
        # the context's keys are shared by the batch: fold the batch into the query rows instead of copying K/V
        G, D = q_BHTGD.shape[3:]
        q_1HRGD = q_BHLGD.transpose(1, 0, 2, 3, 4).reshape(1, H, B * rows, G, D)
        if self._pallas():  # the decode kernel with every block selected, the rows as one tile
            o_1, lse_1 = all_keys_attention(q_1HRGD.reshape(1, H, B * rows * G, D), idx.keys, idx.values,
                                            n_fixed=idx.n_fixed, fixed_pad=idx.fixed_pad, n_clustered=idx.n_clustered,
                                            block_k=self.block_k, interpret=self.interpret)
        else:
            o_1, lse_1 = chunked_attention_lse(q_1HRGD, idx.keys[None], idx.values[None],
                                               lambda s0, s1: valid_N[s0:s1][None, None, None, :])
        o_t = o_1.reshape(H, B, rows, G, D).transpose(1, 0, 2, 3, 4)
        lse_t = lse_1.reshape(H, B, rows, G).transpose(1, 0, 2, 3)
        o = put_rows(o.astype(jnp.float32), pos_BL, o_t)
        lse = put_rows(lse, pos_BL, lse_t)
        if self.question_prior:  # the last question_prior rows' exact block log-probabilities
            p = min(self.question_prior, rows)
            prior = selection.block_logprob_max(
                q_BHLGD[:, :, -p:].reshape(B, H, p * G, D), idx.keys, lse_t[:, :, -p:].reshape(B, H, p * G),
                valid_N, block_k=self.block_k, scale=1.0 / math.sqrt(D))
            if self.prior_pin == 1.0:
                ids, count = self._question_selection(prior, idx, budget_B)
                aux = dict(aux, _question_ids_BHM=ids, _question_count_BH=count)
            else:
                aux = dict(aux, _prior_BHN=self._pin(prior, idx, budget_B) if self.prior_pin else prior)
        kept_BT = aux["_kept_keys_BT"]
        aux = dict(aux, _kept_keys_BT=kept_BT.at[jnp.arange(B)[:, None], pos_BL].set(_full_keys(idx)))
        if "_kept_BHTN" in aux:
            kept = aux["_kept_BHTN"]
            aux["_kept_BHTN"] = put_rows(kept, pos_BL, jnp.broadcast_to(valid_N, (B, H, rows, kept.shape[-1])))
        return o, lse, aux

    def _question_selection(self, prior_BHN, idx, budget_B) -> tuple[jax.Array, jax.Array]:
        """prior_pin=1: every decode step's blocks, chosen once by the question (fixed blocks + the top prior)."""
        k_BH, capacity = self._k_blocks(idx, budget_B)
        fixed = self._fixed_blocks(idx)
        bs = jnp.where(jnp.arange(prior_BHN.shape[-1]) < fixed, jnp.inf, prior_BHN)
        return selection.select_topk(bs, k_BH, capacity)

    def _pin(self, prior_BHN, idx, budget_B) -> jax.Array:
        """The prior as pins: +inf on the question's top `prior_pin` share of each decode step's clustered blocks
        (at least one block is left to the step's own choice), -inf elsewhere."""
        k_BH, _ = self._k_blocks(idx, budget_B)
        fixed = self._fixed_blocks(idx)
        n_pin = jnp.clip(jnp.floor(self.prior_pin * (k_BH - fixed)).astype(jnp.int32), 0,
                         jnp.maximum(k_BH - fixed - 1, 0))
        nb = prior_BHN.shape[-1]
        desc = -jnp.sort(-prior_BHN, axis=-1)
        cut = jnp.take_along_axis(desc, jnp.clip(n_pin - 1, 0, nb - 1)[..., None], axis=-1)
        pinned = (prior_BHN >= cut) & (n_pin[..., None] > 0) & (prior_BHN > -jnp.inf)
        return jnp.where(pinned, jnp.inf, -jnp.inf)

    def _fixed_blocks(self, idx) -> int:
        """Key blocks the fixed region (sinks + window) spans: always selected."""
        return -(-idx.n_fixed // self.block_k)

    def _key_blocks(self, idx) -> int:
        """Key blocks holding at least one context key (fixed or clustered): a selection of this many blocks
        keeps every key, whatever the scores."""
        return len(valid_blocks(idx.n_fixed, idx.fixed_pad, idx.n_clustered, self.block_k))

    def _k_blocks(self, idx, budget_B) -> tuple[jax.Array, int]:
        """Blocks to select per (row, KV head) `[B, H]` (fixed blocks included) and the static capacity (a
        multiple of IDS_MULTIPLE or every block); a request budget of 1 keeps every block holding a key."""
        H = idx.keys.shape[0]
        key_blocks = self._key_blocks(idx)
        fixed_blocks = self._fixed_blocks(idx)
        all_blocks = idx.keys.shape[1] // self.block_k
        if self.policy == "dense":
            return jnp.full((budget_B.shape[0], H), all_blocks, jnp.int32), all_blocks
        if self._calibrated(idx):
            most_keys = self.max_head_share * max(self.max_budget * idx.context_len - idx.n_fixed, 0.0)
            capacity = min(max(fixed_blocks + math.ceil(most_keys / self.block_k), fixed_blocks + 1), all_blocks)
            keys_BH = calibrated_head_keys(idx.budgets, idx.budget_fractions, budget_B, idx.context_len,
                                           idx.n_fixed, idx.n_clustered)
            k_BH = fixed_blocks + jnp.ceil(keys_BH / self.block_k).astype(jnp.int32)
        else:
            capacity = min(max(math.ceil(self.max_budget * idx.context_len / self.block_k), fixed_blocks + 1),
                           all_blocks)
            k_B = jnp.ceil(budget_B * idx.context_len / self.block_k).astype(jnp.int32)
            k_BH = jnp.broadcast_to(k_B[:, None], (budget_B.shape[0], H))
        k_BH = jnp.where(budget_B[:, None] >= 1.0, key_blocks, k_BH)
        k_BH = jnp.clip(k_BH, min(fixed_blocks + 1, capacity), min(capacity, key_blocks))
        # the id lists' width (k is clipped above): a whole number of the attention kernels' steps, so that they
        # pad nothing per call
        return k_BH, min(round_up(capacity, IDS_MULTIPLE), all_blocks)

    def _context(self, q_BHTGD, seq_lens_B, idx, budget_B, block_ranges=(None, None), box_table_HCE=None,
                 user: UserKV | None = None, prior_BHN: jax.Array | None = None, chosen=None):
        B, H, T, G, D = q_BHTGD.shape
        if user is not None and T != 1:
            raise ValueError(f"user KV is attended with the context only in decode (T = 1), got T = {T}")
        nb_all = idx.keys.shape[1] // self.block_k
        if prior_BHN is not None and prior_BHN.shape != (B, H, nb_all):
            raise ValueError(f"ContextState.prior_LBHN holds {prior_BHN.shape} per layer, this step needs "
                             f"[{B}, {H}, {nb_all}]: it must come from this backend's prefill of the same batch")
        if self.policy in KEY_POLICIES:
            return _with_user(q_BHTGD, *self._key_policy(q_BHTGD, idx, budget_B), user)
        if self.policy == "dense" and not self._pallas():
            return _with_user(q_BHTGD, *self._dense(q_BHTGD, idx), user)
        decode = T == 1
        k_BH, capacity = self._k_blocks(idx, budget_B)
        nb = idx.keys.shape[1] // self.block_k
        kw = dict(n_fixed=idx.n_fixed, fixed_pad=idx.fixed_pad, n_clustered=idx.n_clustered,
                  block_k=self.block_k)
        if decode:
            rows_BHRD = q_BHTGD[:, :, 0]  # [B, H, G, D]
        else:
            # One selection per block of user tokens; padded tail tokens repeat the row's last valid token.
            nQ = -(-T // self.block_q)
            Tp = nQ * self.block_q
            last = jnp.clip(seq_lens_B - 1, 0, T - 1)
            t_T = jnp.arange(Tp)
            src_BT = jnp.where(t_T[None] < seq_lens_B[:, None], jnp.minimum(t_T[None], T - 1), last[:, None])
            q_pad = jnp.take_along_axis(q_BHTGD, src_BT[:, None, :, None, None], axis=2)
            rows_BHRD = q_pad.reshape(B, H, nQ, self.block_q * G, D).transpose(0, 2, 1, 3, 4)
            rows_BHRD = rows_BHRD.reshape(B * nQ, H, self.block_q * G, D)
        rows = rows_BHRD.shape[0]
        k_rows = jnp.repeat(k_BH, rows // B, axis=0)
        lo_HB, hi_HB = block_ranges
        if chosen is not None:  # chosen by the question in prefill (prior_pin=1): no lookup, no selection
            ids, count = chosen
            if ids.shape != (B, H, capacity) or count.shape != (B, H):
                raise ValueError(f"ContextState.question_ids_LBHM holds {ids.shape} per layer, this step needs "
                                 f"[{B}, {H}, {capacity}]: it must come from this backend's prefill of the same batch")
        elif self.policy == "dense":  # every block: nothing to score
            ids = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (rows, H, capacity))
            count = jnp.full((rows, H), capacity, jnp.int32)
        elif (self.policy == "squeezed" and self._pallas() and lo_HB is not None
              and (chunk_blocks := fused_select_chunks(nb, rows * H)) is not None):
            if lo_HB.shape not in ((H, nb), (H, next_pow2(nb))):
                raise ValueError(f"ContextState block tables are for {lo_HB.shape[-1]} blocks, the backend uses {nb} "
                                 f"(block_k={self.block_k}); build the state with ContextState.create(..., block_k)")
            # a row whose budget keeps every block reads no score in the selection (and no centroid in the
            # three-launch lookup)
            active = k_rows < self._key_blocks(idx)
            sel = dict(n_blocks=nb, capacity=capacity, fixed_blocks=self._fixed_blocks(idx), interpret=self.interpret,
                       prior_BHB=prior_BHN, chunk_blocks=chunk_blocks, active_BH=active)
            if (self.fold_lookup_finish and rows_BHRD.shape[2] <= FROM_LOGITS_MAX_ROWS
                    and not self._uses_hierarchy(idx)):
                # decode: the lookup's finish runs inside the selection (two launches, not three)
                q_l, table, log_n, radius, lookup_kw = self._flat_lookup_inputs(rows_BHRD, idx, box_table_HCE)
                logits = centroid_lookup.centroid_logits(q_l, table, log_n, radius, interpret=self.interpret,
                                                         **lookup_kw)
                ids, count = select_blocks_from_logits(logits, idx.cluster_size, lo_HB, hi_HB, k_rows, agg=self.agg,
                                                       **sel)
            else:
                ids, count = select_blocks(self._cluster_scores(rows_BHRD, idx, box_table_HCE, active),
                                           idx.cluster_size, lo_HB, hi_HB, k_rows, **sel)
        else:
            bscores = self._block_scores(rows_BHRD, idx, nb, box_table_HCE)
            if prior_BHN is not None and self.policy == "squeezed":
                bscores = jnp.maximum(bscores, prior_BHN)
            ids, count = selection.select_topk(bscores, k_rows, capacity)
        pallas = self._pallas()
        attend_decode = sparse_decode if pallas else sparse_decode_ref
        attend_prefill = sparse_prefill if pallas else sparse_prefill_ref
        if decode:
            if user is not None:
                kw.update(k_user_BUHD=user.k_BUHD, v_user_BUHD=user.v_BUHD, user_len_B=user.len_B)
            if self.policy == "dense" and pallas:  # every block: contiguous slices, no block list
                o, lse = dense_decode(rows_BHRD, idx.keys, idx.values, interpret=self.interpret, **kw)
            else:
                o, lse = attend_decode(rows_BHRD, idx.keys, idx.values, ids, count, interpret=self.interpret, **kw)
            o, lse = o[:, :, None], lse[:, :, None]
        else:
            nQ = rows // B
            ids = ids.reshape(B, nQ, H, capacity).transpose(0, 2, 1, 3)
            count = count.reshape(B, nQ, H).transpose(0, 2, 1)
            o, lse = attend_prefill(q_BHTGD, idx.keys, idx.values, ids, count, block_q=self.block_q,
                                    interpret=self.interpret, **kw)
        if self.policy == "dense":  # every block, padding ones included (masked in the kernel)
            aux = {"_kept_keys_BT": jnp.full((B, T), _full_keys(idx))}
        else:  # [B, H] (decode) or [B, H, query blocks] (prefill): per token, the mean over the KV heads
            kept_BHQ = jnp.minimum(count * self.block_k, idx.keys.shape[1]).astype(jnp.float32).reshape(B, H, -1)
            aux = {"_kept_keys_BT": jnp.repeat(jnp.mean(kept_BHQ, axis=1), self.block_q if not decode else 1,
                                               axis=1)[:, :T]}
        if self.fidelity:
            aux["_kept_BHTN"] = _blocks_to_key_mask(ids if not decode else ids[:, :, None], count if not decode
                                                    else count[:, :, None], self.block_k, idx.keys.shape[1],
                                                    T, self.block_q)
        return o, lse, aux

    def _uses_hierarchy(self, idx) -> bool:
        return self.score != "box" and self.hierarchical and idx.coarse_centroids is not None

    def _flat_lookup_inputs(self, rows_BHRD, idx, box_table_HCE=None):
        """(queries, centroid table, log sizes, radius, scoring kwargs) of the flat lookup for `self.score`."""
        log_sizes = idx.cluster_log_sizes
        if self.score == "box":  # centroid dot in 2D: [q+, q-] . [c + w (hi - c), c + w (lo - c)]
            if box_table_HCE is None:
                if self._pallas():  # building the boxes every step would read every key: not for the kernel path
                    raise ValueError("score='box' on the kernel path needs the precomputed box table: build the state "
                                     "with ContextState.for_backend(index, budget, backend)")
                box_table_HCE = index_box_table(idx.keys, idx.centroids, idx.cluster_start, idx.cluster_size,
                                                self.box_weight)
            # the radius input is not read by score="mean": the index's own array, nothing built per step
            return (signed_split(rows_BHRD), box_table_HCE, log_sizes, idx.radius,
                    dict(score="mean", scale=1.0 / math.sqrt(rows_BHRD.shape[-1])))
        return rows_BHRD, idx.centroids, log_sizes, idx.radius, dict(score=self.score, radius_weight=self.radius_weight)

    def _cluster_scores(self, rows_BHRD, idx, box_table_HCE=None, active_BH=None):
        """Squeezed policy: the estimated log-probability of every fine cluster, [rows, H, C]. The flat lookup
        skips the (row, head)s where `active_BH` is False (`centroid_lookup.centroid_scores`)."""
        if self._uses_hierarchy(idx):
            log_sizes = idx.cluster_log_sizes
            n_coarse = idx.coarse_centroids.shape[1]
            hfn = centroid_lookup.hierarchical_scores if self._pallas() else centroid_lookup.hierarchical_scores_ref
            return hfn(
                rows_BHRD, idx.coarse_centroids, jnp.log(jnp.maximum(idx.coarse_size, 1).astype(jnp.float32)),
                idx.coarse_first, idx.coarse_count, idx.centroids, log_sizes, idx.radius,
                coarse_keep=max(1, int(round(self.coarse_keep_fraction * n_coarse))),
                max_fine_per_coarse=idx.max_fine_per_coarse, score=self.score,
                radius_weight=self.radius_weight, agg=self.agg, interpret=self.interpret)
        q, table, log_n, radius, kw = self._flat_lookup_inputs(rows_BHRD, idx, box_table_HCE)
        fn = centroid_lookup.centroid_scores if self._pallas() else centroid_lookup.centroid_scores_ref
        return fn(q, table, log_n, radius, agg=self.agg, interpret=self.interpret, active_BH=active_BH, **kw)

    def _block_scores(self, rows_BHRD, idx, nb, box_table_HCE=None):
        fixed_blocks = self._fixed_blocks(idx)
        if self.policy == "squeezed":
            return selection.block_scores(self._cluster_scores(rows_BHRD, idx, box_table_HCE), idx.cluster_start,
                                          idx.cluster_size,
                                          n_blocks=nb, block_k=self.block_k, fixed_blocks=fixed_blocks)
        # dense / oracle: exact per-key logits, max over the rows sharing the selection, max within a block
        logits_BHRN = jnp.einsum("bhrd,hnd->bhrn", rows_BHRD.astype(jnp.float32), idx.keys.astype(jnp.float32))
        key_score = jnp.max(logits_BHRN, axis=2)
        key_score = jnp.where(_valid_keys(idx)[None], key_score, -jnp.inf)
        bs = jnp.max(key_score.reshape(key_score.shape[0], key_score.shape[1], nb, self.block_k), axis=-1)
        return jnp.where(jnp.arange(nb)[None, None] < fixed_blocks, jnp.inf, bs)

    def _dense(self, q_BHTGD, idx):
        """Every valid context key, without selection (the exact baseline off the GPU)."""
        B, H, T, G, _ = q_BHTGD.shape
        k_BHND = jnp.broadcast_to(idx.keys[None], (B,) + idx.keys.shape)
        v_BHND = jnp.broadcast_to(idx.values[None], (B,) + idx.values.shape)
        valid_N = _valid_keys(idx)[0]
        o, lse = dense_attention_lse(q_BHTGD, k_BHND, v_BHND, valid_N[None, None, None, :])
        aux = {"_kept_keys_BT": jnp.full((B, T), _full_keys(idx))}
        if self.fidelity:
            aux["_kept_BHTN"] = jnp.broadcast_to(valid_N[None, None, None, :], (B, H, T, valid_N.shape[0]))
        return o, lse, aux

    # ------------------------------------------------------------------ key-granular baselines
    def _key_policy(self, q_BHTGD, idx, budget_B):
        B, H, T, G, D = q_BHTGD.shape
        N = idx.keys.shape[1]
        valid_HN = _valid_keys(idx)
        fixed_HN = jnp.arange(N)[None, :] < idx.n_fixed
        pos_HN = idx.positions
        q = q_BHTGD.astype(jnp.float32)
        k = idx.keys.astype(jnp.float32)
        if self.policy == "oracle_key":
            score_BHTN = jnp.max(jnp.einsum("bhtgd,hnd->bhtgn", q, k), axis=3)
        elif self.policy == "oracle_mass":  # sum over the group of each head's context-normalised probability
            s_BHTGN = jnp.einsum("bhtgd,hnd->bhtgn", q, k) / math.sqrt(D)
            s_BHTGN = jnp.where(valid_HN[None, :, None, None], s_BHTGN, -jnp.inf)
            score_BHTN = jnp.sum(jax.nn.softmax(s_BHTGN, axis=-1), axis=3)
        elif self.policy == "streaming":
            score_BHTN = jnp.broadcast_to(pos_HN.astype(jnp.float32)[None, :, None], (B, H, T, N))
        elif self.policy == "random":
            score_BHTN = jax.random.uniform(jax.random.key(0), (B, H, T, N))
        else:  # quest: pages of consecutive original positions, bound = sum_d max(q_d*min_d, q_d*max_d)
            n_pages = -(-idx.context_len // QUEST_PAGE)
            page_HN = jnp.where(pos_HN >= 0, pos_HN // QUEST_PAGE, n_pages)
            seg = jax.vmap(lambda kk, pp: (jax.ops.segment_min(kk, pp, n_pages + 1),
                                           jax.ops.segment_max(kk, pp, n_pages + 1)))
            kmin_HPD, kmax_HPD = seg(k, page_HN)
            bound = jnp.sum(jnp.maximum(q[..., None, :] * kmin_HPD[None, :, None, None],
                                        q[..., None, :] * kmax_HPD[None, :, None, None]), axis=-1)
            bound_BHTP = jnp.max(bound, axis=3)
            score_BHTN = jnp.take_along_axis(bound_BHTP, jnp.broadcast_to(page_HN[None, :, None],
                                                                           (B, H, T, N)), axis=-1)
        score_BHTN = jnp.where(fixed_HN[None, :, None], jnp.inf, score_BHTN)
        score_BHTN = jnp.where(valid_HN[None, :, None], score_BHTN, -jnp.inf)
        if self._calibrated(idx):
            keys_BH = calibrated_head_keys(idx.budgets, idx.budget_fractions, budget_B, idx.context_len,
                                           idx.n_fixed, idx.n_clustered)
            n_keep_BH = idx.n_fixed + jnp.ceil(keys_BH)
        else:
            n_keep_BH = jnp.broadcast_to(jnp.ceil(budget_B * idx.context_len)[:, None], (B, H))
        n_keep_BH = jnp.clip(n_keep_BH, 1, idx.context_len).astype(jnp.int32)
        order = jnp.argsort(-score_BHTN, axis=-1)
        rank = jnp.argsort(order, axis=-1)
        kept_BHTN = (rank < n_keep_BH[:, :, None, None]) & valid_HN[None, :, None]
        mask_BHTGN = jnp.broadcast_to(kept_BHTN[:, :, :, None], (B, H, T, G, N))
        kv_BHND = jnp.broadcast_to(idx.keys[None], (B,) + idx.keys.shape)
        vv_BHND = jnp.broadcast_to(idx.values[None], (B,) + idx.values.shape)
        o, lse = _masked_grouped_attention(q_BHTGD, kv_BHND, vv_BHND, mask_BHTGN)
        aux = {"_kept_keys_BT": jnp.mean(jnp.sum(kept_BHTN, -1).astype(jnp.float32), axis=1)}
        if self.fidelity:
            aux["_kept_BHTN"] = kept_BHTN
        return o, lse, aux


def calibrated_head_keys(budgets_HF: jax.Array | None, fractions: tuple[float, ...], budget_B: jax.Array,
                         context_len: int, n_fixed: int, n_clustered: int) -> jax.Array:
    """Clustered-region keys to keep per (row, KV head) `[B, H]` (f32) from one layer's calibrated budgets.

    A row whose budget equals a calibrated fraction gets that column of `budgets_HF`. Other budgets interpolate
    linearly, in clustered keys kept on average, between the neighbouring anchors: no key at all, the
    calibrated columns, and every key (budget 1); so the total stays that of the budget and budget 1 is dense.
    """
    if budgets_HF is None or not fractions:
        raise ValueError("allocation='calibrated' needs a calibrated index (built with window >= 1, it stores "
                         "budgets_LHF); this index has none: rebuild it with calibration or use 'uniform'")
    H, F = budgets_HF.shape
    if F != len(fractions):
        raise ValueError(f"budgets_HF must be [H, F={len(fractions)}], got {budgets_HF.shape}")
    order = sorted(range(F), key=lambda i: fractions[i])
    anchors_A = [0.0] + [max(fractions[i] * context_len - n_fixed, 0.0) for i in order] + [float(n_clustered)]
    cols_AH = jnp.concatenate([jnp.zeros((1, H), jnp.float32), budgets_HF.astype(jnp.float32).T[jnp.asarray(order)],
                               jnp.full((1, H), n_clustered, jnp.float32)], axis=0)
    x_A = jnp.asarray(anchors_A, jnp.float32)
    u_B = jnp.clip(budget_B * context_len - n_fixed, 0.0, float(n_clustered))
    j_B = jnp.clip(jnp.searchsorted(x_A, u_B, side="right") - 1, 0, len(anchors_A) - 2)
    lo_B, hi_B = x_A[j_B], x_A[j_B + 1]
    w_B = jnp.where(hi_B > lo_B, (u_B - lo_B) / jnp.maximum(hi_B - lo_B, 1e-9), 0.0)
    f_F = jnp.asarray([fractions[i] for i in order], jnp.float32)
    exact_BF = jnp.abs(f_F[None, :] - budget_B[:, None]) <= 1e-5 * f_F[None, :]
    keys_BH = cols_AH[j_B] + w_B[:, None] * (cols_AH[j_B + 1] - cols_AH[j_B])
    exact_col_BH = cols_AH[1 + jnp.argmax(exact_BF, axis=1)]
    return jnp.where(jnp.any(exact_BF, axis=1)[:, None], exact_col_BH, keys_BH)


class UserKV(NamedTuple):
    """A request's own tokens for one layer: KV cache `[B, U, H, D]` (k, v) and valid entries per row `[B]`."""

    k_BUHD: jax.Array
    v_BUHD: jax.Array
    len_B: jax.Array


def _user_attention(q_BHTGD, k_BSHD, v_BSHD, lengths_B):
    """Dense causal attention of the T new tokens over the cache (entries up to each token's position).
    Entries past the last token are zeroed in v: a stale slot must not reach the output even as 0 * inf."""
    T, S = q_BHTGD.shape[2], k_BSHD.shape[1]
    s_S = jnp.arange(S)
    mask_BTS = s_S[None, None, :] <= (lengths_B[:, None, None] + jnp.arange(T)[None, :, None])
    v_BSHD = jnp.where((s_S[None, :] < (lengths_B[:, None] + T))[:, :, None, None], v_BSHD, 0)
    return dense_attention_lse(q_BHTGD, k_BSHD.transpose(0, 2, 1, 3), v_BSHD.transpose(0, 2, 1, 3),
                               mask_BTS[:, None])


def _with_user(q_BHTGD, o, lse, aux, user: UserKV | None):
    """A context-only decode result merged with the dense attention over the valid cache entries."""
    if user is None:
        return o, lse, aux
    o_u, lse_u = _user_attention(q_BHTGD, user.k_BUHD, user.v_BUHD, user.len_B - 1)
    o, lse = merge_attention(o.astype(jnp.float32), lse, o_u.astype(jnp.float32), lse_u)
    return o, lse, aux


def _log_sizes(cluster_size: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(cluster_size, 1).astype(jnp.float32))


def _full_keys(idx) -> jax.Array:
    """Context keys a dense pass attends (the fixed and the clustered ones), float32."""
    return jnp.float32(idx.n_fixed + idx.n_clustered)


def _kept_fraction(kept_keys_BT: jax.Array, seq_lens_B: jax.Array, context_len: int) -> jax.Array:
    """Mean fraction of the context's keys attended per valid user token (padding tokens excluded)."""
    valid_BT = jnp.arange(kept_keys_BT.shape[1])[None, :] < seq_lens_B[:, None]
    n_valid = jnp.maximum(jnp.sum(valid_BT), 1)
    return jnp.sum(jnp.where(valid_BT, kept_keys_BT, 0.0)) / n_valid / context_len


def _valid_keys(idx) -> jax.Array:
    N = idx.keys.shape[1]
    n = jnp.arange(N)
    ok = (n < idx.n_fixed) | ((n >= idx.fixed_pad) & (n < idx.fixed_pad + idx.n_clustered))
    return jnp.broadcast_to(ok[None], (idx.keys.shape[0], N))


def _masked_grouped_attention(q_BHTGD, k_BHND, v_BHND, mask_BHTGN):
    D = q_BHTGD.shape[-1]
    s = jnp.einsum("bhtgd,bhnd->bhtgn", q_BHTGD.astype(jnp.float32), k_BHND.astype(jnp.float32)) / math.sqrt(D)
    s = jnp.where(mask_BHTGN, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1)
    o = jnp.einsum("bhtgn,bhnd->bhtgd", p, v_BHND.astype(jnp.float32)) / jnp.where(denom > 0, denom, 1)[..., None]
    lse = jnp.log(denom) + m[..., 0]
    return o, lse


def _blocks_to_key_mask(ids_BHQM, count_BHQ, block_k, N, T, block_q):
    """Key mask `[B, H, T, N]` of selected blocks (per query block expanded to its tokens)."""
    M = ids_BHQM.shape[-1]
    live = jnp.arange(M) < count_BHQ[..., None]
    nb = N // block_k
    sel_BHQ_nb = jnp.zeros(ids_BHQM.shape[:-1] + (nb,), bool)
    sel_BHQ_nb = jax.vmap(jax.vmap(jax.vmap(lambda s, i, live: s.at[i].max(live))))(sel_BHQ_nb, ids_BHQM, live)
    key_BHQN = jnp.repeat(sel_BHQ_nb, block_k, axis=-1)
    if ids_BHQM.shape[2] == T:
        return key_BHQN
    return jnp.repeat(key_BHQN, block_q, axis=2)[:, :, :T]


def _fidelity(q_BHTGD, idx, seq_lens_B, kept_BHTN, lse_user_BHTG):
    """Attention-mass recall (context-only and total) and relative output error vs full context attention.

    recall: kept share of the softmax mass over the fixed context's keys alone. recall_total: kept share of the
    mass over the context plus the user's own (always attended) tokens, whose log-sum-exp is `lse_user_BHTG`.
    """
    B, H, T, G, D = q_BHTGD.shape
    valid = _valid_keys(idx)
    kv = jnp.broadcast_to(idx.keys[None], (B,) + idx.keys.shape)
    vv = jnp.broadcast_to(idx.values[None], (B,) + idx.values.shape)
    full_mask = jnp.broadcast_to(valid[None, :, None, None, :], (B, H, T, G, valid.shape[-1]))
    s = jnp.einsum("bhtgd,bhnd->bhtgn", q_BHTGD.astype(jnp.float32), kv.astype(jnp.float32)) / math.sqrt(D)
    s = jnp.where(full_mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    kept = jnp.broadcast_to(kept_BHTN[:, :, :, None, :], p.shape) & full_mask
    recall_BHTG = jnp.sum(jnp.where(kept, p, 0.0), axis=-1)
    total_BHTG = total_mass_recall(recall_BHTG, jax.nn.logsumexp(s, axis=-1), lse_user_BHTG)
    o_full, _ = _masked_grouped_attention(q_BHTGD, kv, vv, full_mask)
    o_kept, _ = _masked_grouped_attention(q_BHTGD, kv, vv, kept)
    err = jnp.linalg.norm(o_kept - o_full, axis=-1) / jnp.maximum(jnp.linalg.norm(o_full, axis=-1), 1e-6)
    tok_ok = (jnp.arange(T)[None, :] < seq_lens_B[:, None]).astype(jnp.float32)  # [B, T]
    w = tok_ok[:, None, :, None]
    denom = jnp.sum(w) * H * G
    return {"recall": jnp.sum(recall_BHTG * w) / denom, "recall_total": jnp.sum(total_BHTG * w) / denom,
            "out_rel_err": jnp.sum(err * w) / denom}


def total_mass_recall(recall_ctx: jax.Array, lse_ctx: jax.Array, lse_user: jax.Array) -> jax.Array:
    """Share of the full (context + user) attention mass covered when a `recall_ctx` share of the context mass
    and all of the user mass are attended; `lse_*` are the natural-log masses of the two parts."""
    m = jnp.maximum(lse_ctx, lse_user)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    a = jnp.exp(lse_ctx - m)
    u = jnp.exp(lse_user - m)
    return (recall_ctx * a + u) / jnp.maximum(a + u, 1e-30)
