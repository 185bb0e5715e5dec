"""Offline, kernel-aware MInference pattern search per KV head, its JSON config, and per-layer indexes.

Search (the paper's semantics): for every (layer, KV head) of a sample, candidates are A-shape (the
target itself), vertical-slash with several `(n_vertical, n_slash)` budgets and block-sparse with several
`top_k_blocks`. A candidate's **cost** is the number of `block_k`-key tiles its kernel actually visits,
counted from the index built on the sample (so a vertical-slash budget whose slashes are spread out costs
more than one whose slashes merge), as a fraction of dense causal attention. The target cost is that of
an A-shape of `target_sink` sinks + `target_local` local keys at `ref_len` tokens, scaled to the sample
length. Among candidates whose cost is within `cost_tolerance` of the target, each head takes the one
whose attention output is closest to dense (relative L2 over the G query heads of the group).

Budgets are given and stored at `ref_len` tokens and scaled linearly to other lengths
(`HeadPattern.budgets_at`), so a pattern keeps its density. The search takes captured per-layer
`q[L, B, H, T, G, D]`, `k/v[L, B, H, T, D]`; capturing them from a model is the caller's job.

Config file `configs/minference/<model>.json`:
`{"model": name, "format": 1, "ref_len": int, "sample_len": int, "block": int, "target": {...},
  "layers": [{"<kv head>": [pattern, p1, p2, score, cost], ...}, ...]}` with pattern one of
`"a_shape"` (p1 = sinks, p2 = local keys), `"vertical_slash"` (p1 = verticals, p2 = slashes),
`"block_sparse"` (p1 = key blocks per query block, p2 = block size); `score` is the relative L2 error of
the head's attention output vs dense on the sample (lower is better), `cost` the fraction of dense
causal key tiles visited.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import block_sparse_prefill, block_sparse_prefill_ref
from pallas_kernels.common import has_gpu
from pallas_kernels.vertical_slash import vertical_slash_prefill, vertical_slash_prefill_ref
from squeeze_jax.minference.patterns import (
    BlockSparseIndex,
    VerticalSlashIndex,
    a_shape_index,
    block_sparse_index,
    block_sparse_to_vertical_slash,
    dense_causal_tiles,
    full_causal_index,
    index_cost,
    vertical_slash_index,
)

PATTERNS = ("a_shape", "vertical_slash", "block_sparse")
CONFIG_FORMAT = 1
# Candidate budgets at ref_len = 128K tokens: (n_vertical, n_slash) and key blocks of 64 per query block.
DEFAULT_VS_BUDGETS: tuple[tuple[int, int], ...] = (
    (128, 512),
    (256, 1024),
    (512, 1024),
    (512, 2048),
    (1000, 2048),
    (1000, 4096),
    (2000, 4096),
    (1000, 6096),
)
DEFAULT_BS_BUDGETS: tuple[int, ...] = (16, 32, 48, 64, 80, 100)

Index = BlockSparseIndex | VerticalSlashIndex


@dataclasses.dataclass(frozen=True)
class HeadPattern:
    """One KV head's searched pattern; budgets `p1`, `p2` are at the config's `ref_len`."""

    pattern: str
    p1: int
    p2: int
    score: float
    cost: float

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; expected one of {PATTERNS}")
        for name in ("p1", "p2"):
            value = getattr(self, name)
            lowest = 0 if (self.pattern, name) == ("a_shape", "p1") else 1  # an A-shape may have no sinks
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"{self.pattern} budget {name} must be an int >= {lowest}, got {value!r}")
        if not (math.isfinite(self.score) and math.isfinite(self.cost)) or self.cost < 0:
            raise ValueError(f"score and cost must be finite (cost >= 0), got {self.score}, {self.cost}")

    def budgets_at(
        self, seq_len: int, ref_len: int, *, n_sink_cols: int = 30, n_local_diags: int = 100
    ) -> tuple[int, int]:
        """Budgets scaled from `ref_len` to `seq_len` tokens (never below what the pattern forces)."""
        f = seq_len / ref_len
        if self.pattern == "a_shape":
            return max(0, round(self.p1 * f)), max(1, round(self.p2 * f))
        if self.pattern == "vertical_slash":
            return max(n_sink_cols, round(self.p1 * f)), max(n_local_diags, round(self.p2 * f))
        return max(1, round(self.p1 * f)), self.p2

    def to_json(self) -> list:
        return [self.pattern, int(self.p1), int(self.p2), float(self.score), float(self.cost)]


@dataclasses.dataclass(frozen=True)
class PatternConfig:
    """Searched patterns of a model: `layers[l][h]` for KV head h of layer l."""

    model: str
    ref_len: int
    sample_len: int
    block: int
    layers: tuple[tuple[HeadPattern, ...], ...]
    target: dict = dataclasses.field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return len(self.layers[0]) if self.layers else 0

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "format": CONFIG_FORMAT,
            "ref_len": self.ref_len,
            "sample_len": self.sample_len,
            "block": self.block,
            "target": self.target,
            "layers": [{str(h): p.to_json() for h, p in enumerate(layer)} for layer in self.layers],
        }


# ----------------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------------


def _configs_root() -> Path:
    try:
        return Path(str(importlib.resources.files("configs")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[2] / "configs"


def parse_pattern_config(data: dict, *, source: str = "config") -> PatternConfig:
    """Validates a decoded config dict (see the module doc for the format) and builds a PatternConfig."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: top level must be an object, got {type(data).__name__}")
    for key in ("model", "layers"):
        if key not in data:
            raise ValueError(f"{source}: missing key {key!r}")
    if data.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise ValueError(f"{source}: unsupported format {data.get('format')!r} (expected {CONFIG_FORMAT})")
    layers_in = data["layers"]
    if not isinstance(layers_in, list) or not layers_in:
        raise ValueError(f"{source}: 'layers' must be a non-empty list")
    layers = []
    n_heads = None
    for l_idx, layer in enumerate(layers_in):
        if not isinstance(layer, dict) or not layer:
            raise ValueError(f"{source}: layer {l_idx} must be a non-empty object {{head: [...]}}")
        if sorted(layer, key=lambda s: int(s) if str(s).isdigit() else -1) != [
            str(h) for h in range(len(layer))
        ]:
            raise ValueError(
                f"{source}: layer {l_idx} heads must be '0'..'{len(layer) - 1}', got {sorted(layer)}"
            )
        if n_heads is None:
            n_heads = len(layer)
        elif len(layer) != n_heads:
            raise ValueError(f"{source}: layer {l_idx} has {len(layer)} heads, layer 0 has {n_heads}")
        heads = []
        for h in range(len(layer)):
            entry = layer[str(h)]
            if not isinstance(entry, list) or len(entry) != 5:
                raise ValueError(
                    f"{source}: layer {l_idx} head {h} must be [pattern, p1, p2, score, cost], got {entry!r}"
                )
            try:
                heads.append(HeadPattern(entry[0], entry[1], entry[2], float(entry[3]), float(entry[4])))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{source}: layer {l_idx} head {h}: {e}") from None
        layers.append(tuple(heads))
    return PatternConfig(
        model=str(data["model"]),
        ref_len=int(data.get("ref_len", 131072)),
        sample_len=int(data.get("sample_len", 0)),
        block=int(data.get("block", 64)),
        layers=tuple(layers),
        target=dict(data.get("target", {})),
    )


def save_pattern_config(config: PatternConfig, path: str | Path) -> Path:
    """Writes the config as JSON (one line per layer) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = config.to_json()
    layers = ",\n  ".join(json.dumps(layer) for layer in d.pop("layers"))
    head = json.dumps(d)[:-1]
    path.write_text(f'{head}, "layers": [\n  {layers}\n]}}\n')
    return path


def load_pattern_config(
    model_name: str,
    *,
    config_dir: str | Path | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
) -> PatternConfig:
    """Reads `configs/minference/<model_name>.json` and checks it against the model.

    Layer and KV-head counts are checked against `n_layers`/`n_heads` when given, else against the
    model preset `configs/models/<model_name>.json` (`n_layers`, `n_kv_heads`) when one exists.
    """
    root = _configs_root()
    path = (
        Path(config_dir) / f"{model_name}.json" if config_dir else root / "minference" / f"{model_name}.json"
    )
    if not path.is_file():
        raise FileNotFoundError(f"no MInference pattern config for model {model_name!r} at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    config = parse_pattern_config(data, source=str(path))
    if config.model != model_name:
        raise ValueError(f"{path}: config is for model {config.model!r}, not {model_name!r}")
    if n_layers is None or n_heads is None:
        preset = root / "models" / f"{model_name}.json"
        if preset.is_file():
            spec = json.loads(preset.read_text())
            n_layers = spec.get("n_layers") if n_layers is None else n_layers
            n_heads = spec.get("n_kv_heads", spec.get("n_heads")) if n_heads is None else n_heads
    if n_layers is not None and config.n_layers != n_layers:
        raise ValueError(f"{path}: {config.n_layers} layers, the model has {n_layers}")
    if n_heads is not None and config.n_heads != n_heads:
        raise ValueError(f"{path}: {config.n_heads} heads per layer, the model has {n_heads} KV heads")
    return config


# ----------------------------------------------------------------------------------------------------
# Building indexes for a pattern
# ----------------------------------------------------------------------------------------------------


def build_index(
    pattern: str,
    p1: int,
    p2: int,
    q: jax.Array,
    k: jax.Array,
    *,
    block: int = 64,
    n_sink_cols: int = 30,
    n_local_diags: int = 100,
    last_q: int = 64,
) -> Index:
    """The index of one pattern with budgets already at the sample's length (`q[B, H, T, G, D]`)."""
    T = k.shape[2]
    if pattern == "a_shape":
        return a_shape_index(T, n_sink=p1, n_local=p2, block=block)
    if pattern == "vertical_slash":
        return vertical_slash_index(
            q,
            k,
            n_vertical=p1,
            n_slash=p2,
            last_q=last_q,
            n_sink_cols=min(n_sink_cols, p1),
            n_local_diags=min(n_local_diags, p2),
            block_q=block,
            block_k=block,
        )
    if pattern == "block_sparse":
        if p2 != block:
            raise ValueError(f"block_sparse block size {p2} differs from the search/kernel block {block}")
        return block_sparse_index(q, k, top_k_blocks=p1, block=block)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def build_layer_index(
    heads: Sequence[HeadPattern],
    q: jax.Array,
    k: jax.Array,
    *,
    ref_len: int,
    block: int = 64,
    n_sink_cols: int = 30,
    n_local_diags: int = 100,
    last_q: int = 64,
) -> VerticalSlashIndex:
    """One vertical-slash-format index for all KV heads of a layer (`q[B, H, T, G, D]`, `k[B, H, T, D]`).

    Each head gets its own pattern (budgets scaled from `ref_len` to T); block patterns are turned into
    key tiles, so the whole layer runs in a single `vertical_slash_prefill` call. Heads sharing a pattern
    are built together.
    """
    B, H, T = k.shape[:3]
    if len(heads) != H:
        raise ValueError(f"{len(heads)} head patterns for {H} KV heads")
    groups: dict[tuple[str, int, int], list[int]] = {}
    for h, p in enumerate(heads):
        groups.setdefault(
            (p.pattern,) + p.budgets_at(T, ref_len, n_sink_cols=n_sink_cols, n_local_diags=n_local_diags), []
        ).append(h)
    parts, order = [], []
    for (pattern, p1, p2), hs in groups.items():
        idx = build_index(
            pattern,
            p1,
            p2,
            q[:, hs],
            k[:, hs],
            block=block,
            n_sink_cols=n_sink_cols,
            n_local_diags=n_local_diags,
            last_q=last_q,
        )
        if isinstance(idx, BlockSparseIndex):
            ids = jnp.broadcast_to(idx.block_ids, (B, len(hs)) + idx.block_ids.shape[-2:])
            cnt = jnp.broadcast_to(idx.block_count, (B, len(hs)) + idx.block_count.shape[-1:])
            idx = block_sparse_to_vertical_slash(dataclasses.replace(idx, block_ids=ids, block_count=cnt))
        parts.append(idx)
        order.extend(hs)
    cap_t = max(p.tile_start.shape[-1] for p in parts)
    cap_c = max(p.column_index.shape[-1] for p in parts)
    inv = np.argsort(np.asarray(order))
    cat = lambda f, cap=None: jnp.concatenate(
        [getattr(p, f) if cap is None else _pad_last(getattr(p, f), cap) for p in parts], axis=1
    )[:, inv]
    return VerticalSlashIndex(
        tile_start=cat("tile_start", cap_t),
        tile_end=cat("tile_end", cap_t),
        tile_count=cat("tile_count"),
        column_index=cat("column_index", cap_c),
        column_count=cat("column_count"),
        block_q=block,
        block_k=block,
        seq_len=T,
    )


def attend(
    index: Index,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    use_kernels: bool,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention output of `q[B, H, T, G, D]` under an index, through the kernel or its reference."""
    if isinstance(index, BlockSparseIndex):
        fn = block_sparse_prefill if use_kernels else block_sparse_prefill_ref
        out, _ = fn(
            q,
            k,
            v,
            index.block_ids,
            index.block_count,
            block_q=index.block_q,
            block_k=index.block_k,
            interpret=interpret,
        )
    else:
        fn = vertical_slash_prefill if use_kernels else vertical_slash_prefill_ref
        out, _ = fn(
            q,
            k,
            v,
            index.tile_start,
            index.tile_end,
            index.tile_count,
            index.column_index,
            index.column_count,
            block_q=index.block_q,
            block_k=index.block_k,
            interpret=interpret,
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------


def _per_head_error(out: jax.Array, dense: jax.Array) -> np.ndarray:
    """Relative L2 error per KV head over (B, T, G, D)."""
    d = (out.astype(jnp.float32) - dense.astype(jnp.float32)) ** 2
    num = jnp.sum(d, axis=(0, 2, 3, 4))
    den = jnp.sum(dense.astype(jnp.float32) ** 2, axis=(0, 2, 3, 4))
    return np.asarray(jnp.sqrt(num / jnp.maximum(den, 1e-30)), np.float64)


def _per_head_cost(index: Index, batch: int, heads: int, dense_tiles: int) -> np.ndarray:
    """Fraction of dense causal key tiles visited per KV head (mean over the batch)."""
    c = index_cost(index)
    c = jnp.broadcast_to(c, (batch, heads, c.shape[-1]))
    return np.asarray(jnp.sum(c, axis=(0, 2)), np.float64) / (batch * dense_tiles)


def _check_sample(q, k, v):
    if q.ndim != 6:
        raise ValueError(f"q must be [L, B, H, T, G, D], got shape {q.shape}")
    L, B, H, T, G, D = q.shape
    if k.shape != (L, B, H, T, D) or v.shape != (L, B, H, T, D):
        raise ValueError(f"k and v must be [L, B, H, T, D] = {(L, B, H, T, D)}, got {k.shape}, {v.shape}")


def search_patterns(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    model_name: str,
    ref_len: int = 131072,
    target_sink: int = 1024,
    target_local: int = 4096,
    vs_budgets: Sequence[tuple[int, int]] = DEFAULT_VS_BUDGETS,
    bs_budgets: Sequence[int] = DEFAULT_BS_BUDGETS,
    block: int = 64,
    n_sink_cols: int = 30,
    n_local_diags: int = 100,
    last_q: int = 64,
    cost_tolerance: float = 0.05,
    use_kernels: bool | None = None,
    interpret: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> PatternConfig:
    """Kernel-aware per-KV-head pattern search on one sample (`q[L, B, H, T, G, D]`, `k/v[L, B, H, T, D]`).

    `use_kernels=None` runs the Pallas kernels on a GPU and the jnp references otherwise (the references
    materialise `T x T` scores: keep CPU samples short). Returns the config; `save_pattern_config`
    writes it.
    """
    _check_sample(q, k, v)
    if ref_len < 1 or cost_tolerance < 0:
        raise ValueError(f"need ref_len >= 1 and cost_tolerance >= 0, got {ref_len}, {cost_tolerance}")
    if not vs_budgets and not bs_budgets:
        raise ValueError("give at least one vertical-slash or block-sparse budget")
    L, B, H, T, G, D = q.shape
    use_kernels = has_gpu() if use_kernels is None else use_kernels
    f = T / ref_len
    sink_s, local_s = max(0, round(target_sink * f)), max(1, round(target_local * f))
    dense_tiles = dense_causal_tiles(T, block_q=block, block_k=block)
    ashape = ("a_shape", target_sink, target_local)
    candidates = [ashape]
    candidates += [("vertical_slash", int(nv), int(ns)) for nv, ns in vs_budgets]
    candidates += [("block_sparse", int(kb), block) for kb in bs_budgets]

    def scaled(c):
        return HeadPattern(c[0], c[1], c[2], 0.0, 0.0).budgets_at(
            T, ref_len, n_sink_cols=n_sink_cols, n_local_diags=n_local_diags
        )

    target_index = a_shape_index(T, n_sink=sink_s, n_local=local_s, block=block)
    target_cost = float(_per_head_cost(target_index, B, H, dense_tiles)[0])
    limit = target_cost * (1.0 + cost_tolerance)
    layers = []
    for layer in range(L):
        ql, kl, vl = q[layer], k[layer], v[layer]
        dense = attend(
            full_causal_index(T, block=block), ql, kl, vl, use_kernels=use_kernels, interpret=interpret
        )
        best: list[HeadPattern | None] = [None] * H
        for cand in candidates:
            p1, p2 = (sink_s, local_s) if cand is ashape else scaled(cand)
            index = build_index(
                cand[0],
                p1,
                p2,
                ql,
                kl,
                block=block,
                n_sink_cols=n_sink_cols,
                n_local_diags=n_local_diags,
                last_q=last_q,
            )
            cost = _per_head_cost(index, B, H, dense_tiles)
            if cand is not ashape and not np.any(cost <= limit):
                continue
            err = _per_head_error(
                attend(index, ql, kl, vl, use_kernels=use_kernels, interpret=interpret), dense
            )
            for h in range(H):
                if (cand is ashape or cost[h] <= limit) and (best[h] is None or err[h] < best[h].score):
                    best[h] = HeadPattern(cand[0], cand[1], cand[2], float(err[h]), float(cost[h]))
        layers.append(tuple(best))
        if log is not None:
            log(
                f"layer {layer}: "
                + ", ".join(f"{p.pattern}({p.p1},{p.p2}) err={p.score:.3g} cost={p.cost:.3g}" for p in best)
            )
    target = {
        "n_sink": target_sink,
        "n_local": target_local,
        "cost": target_cost,
        "tolerance": cost_tolerance,
    }
    return PatternConfig(
        model=model_name, ref_len=ref_len, sample_len=T, block=block, layers=tuple(layers), target=target
    )


# ----------------------------------------------------------------------------------------------------
# Synthetic samples with planted structure (tests, benchmarks, demos)
# ----------------------------------------------------------------------------------------------------

SAMPLE_KINDS = ("local", "vertical_slash", "block_sparse")


def _planted_head(
    rng: np.random.Generator,
    *,
    kind: str,
    seq_len: int,
    batch: int,
    groups: int,
    head_dim: int,
    n_sinks: int,
    n_verticals: int,
    slash_offsets: tuple[int, ...],
    n_clusters: int,
    block: int,
    local_window: int,
    logit: float,
    noise: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q `[B, T, G, D]`, k/v `[B, T, D]` (float32, host) of one KV head; see `planted_attention_sample`."""
    T, D = seq_len, head_dim
    half = D // 2
    n_f = half // 2
    omega = np.exp(np.linspace(0.0, -math.log(local_window), n_f)).astype(np.float32)
    pos = np.arange(T, dtype=np.float32)
    emb = lambda x: np.concatenate([np.cos(x[:, None] * omega), np.sin(x[:, None] * omega)], axis=-1)
    amp_pos = math.sqrt(logit * math.sqrt(D) / n_f)
    amp_c = math.sqrt(logit * math.sqrt(D))
    q_pos = amp_pos * emb(pos)
    k_pos = amp_pos * emb(pos)
    q_c = np.zeros((T, half), np.float32)
    q_c[:, 0] = amp_c  # every query looks along content direction 0
    k_c = np.zeros((T, half), np.float32)
    k_c[: min(n_sinks, T), 0] = amp_c
    if kind == "vertical_slash":
        for o in slash_offsets:
            k_pos = k_pos + amp_pos * emb(pos + o)
        n_v = min(n_verticals, T - n_sinks)
        if n_v > 0:
            k_c[n_sinks + rng.choice(T - n_sinks, n_v, replace=False), 0] = amp_c
    elif kind == "block_sparse":
        nb = -(-T // block)
        tok_block = np.arange(T) // block
        labels = rng.integers(0, n_clusters, nb)
        prefs = rng.integers(0, n_clusters, nb)
        k_c[np.arange(T), 1 + labels[tok_block]] += amp_c
        q_c[np.arange(T), 1 + prefs[tok_block]] += amp_c
    q = np.concatenate([q_pos, q_c], axis=-1)[:, None, :] + noise * rng.standard_normal(
        (batch, T, groups, D), np.float32
    )
    k = np.concatenate([k_pos, k_c], axis=-1)[None] + noise * rng.standard_normal((batch, T, D), np.float32)
    return q, k, rng.standard_normal((batch, T, D), np.float32)


def planted_attention_sample(
    seed: int,
    kinds: Sequence[str],
    *,
    seq_len: int,
    n_layers: int = 1,
    batch: int = 1,
    groups: int = 1,
    head_dim: int = 64,
    n_sinks: int = 4,
    n_verticals: int = 8,
    slash_offsets: Sequence[int] | None = None,
    n_clusters: int = 4,
    block: int = 64,
    local_window: int = 32,
    logit: float = 6.0,
    noise: float = 0.3,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q `[L, B, H, T, G, D]`, k/v `[L, B, H, T, D]` whose attention has a planted shape per KV head.

    Half of D carries rotary-like position features (frequencies 1 .. 1/local_window rad/token), so
    every head attends locally; `kinds[h]` adds: "local" nothing more; "vertical_slash" `n_verticals`
    random key columns every query attends to and slashes at `slash_offsets` (default T/5 and T/2);
    "block_sparse" key blocks labelled with one of `n_clusters` directions, each query block attending
    the blocks of one label. Every kind has `n_sinks` sink keys. Peaks are about `logit` nats.
    """
    bad = [x for x in kinds if x not in SAMPLE_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty list of {SAMPLE_KINDS}, got {list(kinds)}")
    if head_dim < 8 or head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 and >= 8, got {head_dim}")
    if n_clusters + 1 > head_dim // 2:
        raise ValueError(
            f"n_clusters + 1 = {n_clusters + 1} content directions do not fit in D/2 = {head_dim // 2}"
        )
    if seq_len < 1 or n_layers < 1 or batch < 1 or groups < 1:
        raise ValueError(
            f"seq_len, n_layers, batch, groups must be >= 1, got {seq_len}, {n_layers}, {batch}, {groups}"
        )
    offsets = (seq_len // 5, seq_len // 2) if slash_offsets is None else tuple(int(o) for o in slash_offsets)
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(n_layers):
        heads = [
            _planted_head(
                rng,
                kind=kind,
                seq_len=seq_len,
                batch=batch,
                groups=groups,
                head_dim=head_dim,
                n_sinks=n_sinks,
                n_verticals=n_verticals,
                slash_offsets=offsets,
                n_clusters=n_clusters,
                block=block,
                local_window=local_window,
                logit=float(logit),
                noise=float(noise),
            )
            for kind in kinds
        ]
        layers.append([np.stack(x, axis=1) for x in zip(*heads)])
    return tuple(jnp.asarray(np.stack(x), dtype) for x in zip(*layers))
