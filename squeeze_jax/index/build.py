"""Offline index build: (capture) -> K-means -> (coarse level) -> cluster-ordered layout -> calibration.

`build_index(model, tokens, config)` runs the chunked dense prefill of the fixed context and captures K, V and
the window queries; `build_index_from_kv(k, v, q_window, config)` is everything after the capture. Layers are
processed in groups (`layer_group`, auto-sized from a memory budget) so that long contexts fit on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from squeeze_jax.index.calibrate import (
    BUDGET_OBJECTIVES,
    allocate_budgets,
    global_log_threshold,
    kept_fraction_at_threshold,
    layer_calibration_stats,
    uniform_budget_blocks,
)
from squeeze_jax.index.context_index import ContextIndex, IndexInfo, library_version
from squeeze_jax.index.hierarchy import build_hierarchy, max_fine_per_coarse
from squeeze_jax.index.kmeans import ASSIGN_IMPLS, auto_chunk, check_init, kmeans
from squeeze_jax.index.layout import LayoutSizes, build_layout


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How an index is built. Load presets with `IndexConfig.load("default")` (configs/index/default.json)."""

    centroid_fraction: float = 0.05
    n_centroids: int | None = None
    iters: int = 20
    tol: float = 1e-4
    metric: str = "cosine"
    n_restarts: int = 1
    kmeans_init: str = "systematic"
    n_sink: int = 4
    window: int = 124
    block_pad: int = 64
    block_k: int = 16
    hierarchical: bool = False
    coarse_fraction: float = 0.01
    coarse_cap_factor: float = 4.0
    seed: int = 0
    budgets: tuple[float, ...] = (0.125, 0.0625)
    quantile: float = 0.9
    min_budget_share: float = 0.25
    max_budget_share: float = 4.0
    budget_objective: str = "mean"
    prefill_chunk: int = 2048
    layer_group: int | None = None
    group_bytes: int = 16 << 30
    matmul_dtype: str = "auto"
    assign_impl: str = "auto"
    kmeans_chunk_bytes: int = 1 << 30
    calib_q_chunk: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
        if not 0.0 < self.centroid_fraction <= 1.0:
            raise ValueError(f"centroid_fraction must be in (0, 1], got {self.centroid_fraction}")
        if self.n_centroids is not None and self.n_centroids < 1:
            raise ValueError(f"n_centroids must be >= 1 or None, got {self.n_centroids}")
        if self.iters < 0 or self.tol < 0 or self.n_restarts < 1:
            raise ValueError(
                f"need iters >= 0, tol >= 0, n_restarts >= 1; got {self.iters}, {self.tol}, {self.n_restarts}"
            )
        check_init(self.kmeans_init, self.n_restarts)
        if self.metric not in ("cosine", "l2"):
            raise ValueError(f"metric must be 'cosine' or 'l2', got {self.metric!r}")
        if self.n_sink < 0 or self.window < 0:
            raise ValueError(f"n_sink and window must be >= 0, got {self.n_sink}, {self.window}")
        if self.block_pad < 1 or self.block_k < 1 or self.block_pad % self.block_k:
            raise ValueError(
                f"block_pad ({self.block_pad}) must be a positive multiple of block_k ({self.block_k})"
            )
        if not 0.0 < self.coarse_fraction <= 1.0 or self.coarse_cap_factor < 1.0:
            raise ValueError(
                f"need 0 < coarse_fraction <= 1 and coarse_cap_factor >= 1, got "
                f"{self.coarse_fraction}, {self.coarse_cap_factor}"
            )
        if any(not 0.0 < b <= 1.0 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError(f"budgets must be distinct fractions in (0, 1], got {self.budgets}")
        if not 0.0 <= self.quantile < 1.0:
            raise ValueError(f"quantile must be in [0, 1), got {self.quantile}")
        if not 0.0 < self.min_budget_share <= 1.0 <= self.max_budget_share:
            raise ValueError("need 0 < min_budget_share <= 1 <= max_budget_share")
        if self.budget_objective not in BUDGET_OBJECTIVES:
            raise ValueError(f"budget_objective must be one of {BUDGET_OBJECTIVES}, got {self.budget_objective!r}")
        if (
            self.prefill_chunk < 1
            or self.calib_q_chunk < 1
            or self.group_bytes < 1
            or self.kmeans_chunk_bytes < 1
        ):
            raise ValueError("prefill_chunk, calib_q_chunk, group_bytes and kmeans_chunk_bytes must be >= 1")
        if self.layer_group is not None and self.layer_group < 1:
            raise ValueError(f"layer_group must be >= 1 or None, got {self.layer_group}")
        if self.matmul_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(
                f"matmul_dtype must be 'auto', 'float32' or 'bfloat16', got {self.matmul_dtype!r}"
            )
        if self.assign_impl not in ASSIGN_IMPLS:
            raise ValueError(f"assign_impl must be one of {ASSIGN_IMPLS}, got {self.assign_impl!r}")

    def resolved_matmul_dtype(self) -> str:
        """ "auto": bfloat16 inputs (f32 accumulation) on GPU, float32 elsewhere."""
        if self.matmul_dtype != "auto":
            return self.matmul_dtype
        return "bfloat16" if jax.default_backend() == "gpu" else "float32"

    # ------------------------------------------------------------------ derived sizes
    def n_clusters(self, n_clustered: int) -> int:
        c = self.n_centroids if self.n_centroids is not None else round(self.centroid_fraction * n_clustered)
        return int(max(1, c))

    def n_coarse(self, n_clustered: int, n_fine: int) -> int:
        return int(min(n_fine, max(1, round(self.coarse_fraction * n_clustered))))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["budgets"] = list(self.budgets)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown IndexConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> IndexConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def load(cls, name: str = "default") -> IndexConfig:
        """A bundled preset from configs/index/<name>.json."""
        root = resources.files("configs") / "index"
        names = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))
        if name not in names:
            raise ValueError(f"unknown index preset {name!r}; available: {', '.join(names)}")
        return cls.from_dict(json.loads((root / f"{name}.json").read_text()))

    def replace(self, **changes: Any) -> IndexConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class BuildReport:
    """Timings and diagnostics of one build."""

    stage_seconds: dict[str, float]
    group_seconds: list[float]
    layer_group: int
    n_clusters: int
    n_coarse: int
    kmeans_chunk: int
    kmeans_iters: list[int]
    kmeans_objective: list[float]
    calibration: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def token_hash(tokens) -> str:
    """sha256 (16 hex) of the context token ids as int32."""
    import hashlib

    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:16]


def auto_layer_group(
    n_layers: int, n_kv_heads: int, context_len: int, head_dim: int, group_bytes: int
) -> int:
    """Layers per group so that the K-means working set (~16 bytes per key element) fits group_bytes."""
    per_layer = 16 * n_kv_heads * context_len * head_dim
    return int(max(1, min(n_layers, group_bytes // max(per_layer, 1))))


def _validate_kv(k, v, q, config: IndexConfig, max_context: int | None) -> tuple[int, int, int, int, int]:
    for name, a in (("k_LHND", k), ("v_LHND", v)):
        if not hasattr(a, "ndim") or a.ndim != 4:
            raise ValueError(f"{name} must be [L, H, N, D], got shape {getattr(a, 'shape', None)}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {a.dtype}")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"keys {k.shape} {k.dtype} and values {v.shape} {v.dtype} must match")
    L, H, S, D = k.shape
    if max_context is not None and S > max_context:
        raise ValueError(f"context of {S} tokens exceeds the model's max_context ({max_context})")
    sizes = LayoutSizes(S, config.n_sink, config.window, config.block_pad)
    C = config.n_clusters(sizes.n_clustered)
    if C > sizes.n_clustered:
        raise ValueError(f"{C} centroids requested for only {sizes.n_clustered} clustered tokens")
    if q is not None:
        if q.ndim != 4 or q.shape[0] != L or q.shape[1] != config.window or q.shape[3] != D:
            raise ValueError(f"q_window must be [L={L}, T=window={config.window}, Hq, D={D}], got {q.shape}")
        if q.shape[2] % H:
            raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({H})")
        if not jnp.issubdtype(q.dtype, jnp.floating):
            raise TypeError(f"q_window must be floating point, got {q.dtype}")
        if config.window < 1:
            raise ValueError("calibration needs window >= 1 (its queries are the window tokens')")
        for f in config.budgets:
            uniform_budget_blocks(f, S, sizes.n_fixed, config.block_k)
    return L, H, S, D, C


@functools.partial(jax.jit, donate_argnums=(0,))
def _put_layers(buf, part, l0):
    return jax.tree.map(
        lambda b, p: lax.dynamic_update_slice_in_dim(b, p.astype(b.dtype), l0, axis=0), buf, part
    )


@dataclasses.dataclass(frozen=True)
class _GroupPlan:
    """Derived sizes shared by every layer group of one build."""

    config: IndexConfig
    sizes: LayoutSizes
    n_clusters: int
    n_coarse: int
    chunk: int
    mm_dtype: str
    kmeans_progress: bool


def _build_group(k_GHSD, v_GHSD, q_GTHqD, key, plan: _GroupPlan):
    """K-means -> coarse level -> layout -> calibration statistics for one group of layers.

    Returns the group's arrays by ContextIndex field name (plus `_mean_prob_LHC` / `_recall_LHK` when
    calibrating), seconds per stage, K-means iterations and mean objective.
    """
    cfg, sizes = plan.config, plan.sizes
    Lg, H, S, D = k_GHSD.shape
    P = Lg * H
    k_P = k_GHSD.reshape(P, S, D)
    v_P = v_GHSD.reshape(P, S, D)
    times = {}

    t = time.perf_counter()
    km = kmeans(
        k_P[:, cfg.n_sink : S - cfg.window],
        plan.n_clusters,
        key=key,
        iters=cfg.iters,
        tol=cfg.tol,
        metric=cfg.metric,
        chunk=plan.chunk,
        n_restarts=cfg.n_restarts,
        init=cfg.kmeans_init,
        matmul_dtype=plan.mm_dtype,
        assign_impl=cfg.assign_impl,
        progress=plan.kmeans_progress,
    )
    jax.block_until_ready(km)
    times["kmeans"] = time.perf_counter() - t

    t = time.perf_counter()
    hier = None
    if cfg.hierarchical:
        hier = build_hierarchy(
            km.centroids_PCD,
            km.sizes_PC,
            plan.n_coarse,
            key=jax.random.fold_in(key, 1),
            iters=cfg.iters,
            tol=cfg.tol,
            metric=cfg.metric,
            cap_factor=cfg.coarse_cap_factor,
            init=cfg.kmeans_init,
            matmul_dtype=plan.mm_dtype,
            assign_impl=cfg.assign_impl,
        )
        jax.block_until_ready(hier)
    times["hierarchy"] = time.perf_counter() - t

    t = time.perf_counter()
    lay = build_layout(
        k_P,
        v_P,
        km.assign_PN,
        km.centroids_PCD,
        n_sink=cfg.n_sink,
        window=cfg.window,
        block_pad=cfg.block_pad,
        fine_order_PC=None if hier is None else hier.fine_order_PC,
    )
    jax.block_until_ready(lay)
    times["layout"] = time.perf_counter() - t

    def per_layer(a):
        return a.reshape((Lg, H) + a.shape[1:])

    part = {
        "keys_LHND": per_layer(lay.keys_PND),
        "values_LHND": per_layer(lay.values_PND),
        "positions_LHN": per_layer(lay.positions_PN),
        "centroids_LHCD": per_layer(lay.centroids_PCD),
        "cluster_start_LHC": per_layer(lay.cluster_start_PC),
        "cluster_size_LHC": per_layer(lay.cluster_size_PC),
        "radius_LHC": per_layer(lay.radius_PC),
    }
    if hier is not None:
        part["coarse_centroids_LHCcD"] = per_layer(hier.coarse_centroids_PCcD)
        part["coarse_first_LHCc"] = per_layer(hier.coarse_first_PCc)
        part["coarse_count_LHCc"] = per_layer(hier.coarse_count_PCc)

    t = time.perf_counter()
    if q_GTHqD is not None:
        q_pos = jnp.arange(S - cfg.window, S, dtype=jnp.int32)
        probs, curves = [], []
        for li in range(Lg):
            p_HC, r_HK = layer_calibration_stats(
                part["keys_LHND"][li],
                part["positions_LHN"][li],
                part["centroids_LHCD"][li],
                part["cluster_start_LHC"][li],
                part["cluster_size_LHC"][li],
                q_GTHqD[li],
                q_pos,
                n_fixed=sizes.n_fixed,
                fixed_pad=sizes.fixed_pad,
                n_clustered=sizes.n_clustered,
                block_k=cfg.block_k,
                q_chunk=cfg.calib_q_chunk,
            )
            probs.append(p_HC)
            curves.append(r_HK)
        part["_mean_prob_LHC"] = jnp.stack(probs)
        part["_recall_LHK"] = jnp.stack(curves)
        jax.block_until_ready(part["_recall_LHK"])
    times["calibration"] = time.perf_counter() - t
    return part, times, int(km.n_iters), float(jnp.mean(km.objective_P))


def build_index_from_kv(
    k_LHND: jax.Array,
    v_LHND: jax.Array,
    q_window_LTHqD: jax.Array | None,
    config: IndexConfig,
    *,
    model_fingerprint: str = "",
    context_token_hash: str = "",
    max_context: int | None = None,
) -> ContextIndex:
    """Build the index from captured post-RoPE keys/values `[L, H, S, D]` and window queries `[L, W, Hq, D]`.

    q_window_LTHqD: post-RoPE queries of the last `config.window` context tokens; None skips calibration (the
    index then has no threshold and no budgets).
    """
    return build_index_from_kv_report(
        k_LHND,
        v_LHND,
        q_window_LTHqD,
        config,
        model_fingerprint=model_fingerprint,
        context_token_hash=context_token_hash,
        max_context=max_context,
    )[0]


def build_index_from_kv_report(
    k_LHND: jax.Array,
    v_LHND: jax.Array,
    q_window_LTHqD: jax.Array | None,
    config: IndexConfig,
    *,
    model_fingerprint: str = "",
    context_token_hash: str = "",
    max_context: int | None = None,
) -> tuple[ContextIndex, BuildReport]:
    """`build_index_from_kv` that also returns a `BuildReport` (stage seconds, K-means stats, calibration)."""
    if not isinstance(config, IndexConfig):
        raise TypeError(f"config must be an IndexConfig, got {type(config).__name__}")
    L, H, S, D, C = _validate_kv(k_LHND, v_LHND, q_window_LTHqD, config, max_context)
    sizes = LayoutSizes(S, config.n_sink, config.window, config.block_pad)
    M = sizes.n_clustered
    Cc = config.n_coarse(M, C) if config.hierarchical else 0
    cap = max_fine_per_coarse(C, Cc, config.coarse_cap_factor) if config.hierarchical else 0
    group = min(config.layer_group or auto_layer_group(L, H, S, D, config.group_bytes), L)
    starts = list(range(0, L, group))
    plan = _GroupPlan(
        config=config,
        sizes=sizes,
        n_clusters=C,
        n_coarse=Cc,
        chunk=auto_chunk(group * H, M, C, config.kmeans_chunk_bytes),
        mm_dtype=config.resolved_matmul_dtype(),
        kmeans_progress=config.progress and len(starts) == 1,
    )
    calibrate = q_window_LTHqD is not None
    key = jax.random.PRNGKey(config.seed)
    stage = {"kmeans": 0.0, "hierarchy": 0.0, "layout": 0.0, "calibration": 0.0, "finalize": 0.0}
    group_seconds: list[float] = []
    iters_log: list[int] = []
    obj_log: list[float] = []

    buf = None
    bar = None
    if config.progress and len(starts) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=L, desc="index build (layers)", unit="layer")
    for l0 in starts:
        g0 = time.perf_counter()
        l1 = min(L, l0 + group)
        q_group = q_window_LTHqD[l0:l1] if calibrate else None
        part, times, n_iters, objective = _build_group(
            k_LHND[l0:l1], v_LHND[l0:l1], q_group, jax.random.fold_in(key, l0), plan
        )
        for name, sec in times.items():
            stage[name] += sec
        iters_log.append(n_iters)
        obj_log.append(objective)

        t = time.perf_counter()
        if len(starts) == 1:
            buf = part
        else:
            if buf is None:
                buf = {n: jnp.zeros((L,) + a.shape[1:], a.dtype) for n, a in part.items()}
            buf = _put_layers(buf, part, jnp.int32(l0))
            jax.block_until_ready(buf)
        del part
        stage["finalize"] += time.perf_counter() - t
        group_seconds.append(time.perf_counter() - g0)
        if bar is not None:
            bar.update(l1 - l0)
    if bar is not None:
        bar.close()
    assert buf is not None

    t = time.perf_counter()
    calib_report: dict[str, Any] = {}
    log_thr = budgets = None
    if calibrate:
        mean_prob = np.asarray(buf.pop("_mean_prob_LHC"))
        recall = np.asarray(buf.pop("_recall_LHK"))
        log_thr, budgets, calib_report = _finish_calibration(
            mean_prob, recall, np.asarray(buf["cluster_size_LHC"]), config, S, sizes.n_fixed, M
        )
    stage["calibration"] += time.perf_counter() - t

    info = IndexInfo(
        model_fingerprint=model_fingerprint,
        token_hash=context_token_hash,
        library_version=library_version(),
        build_config_json=json.dumps(config.to_dict(), sort_keys=True),
        calibration_json=json.dumps(calib_report, sort_keys=True),
    )
    index = ContextIndex(
        keys_LHND=buf["keys_LHND"],
        values_LHND=buf["values_LHND"],
        positions_LHN=buf["positions_LHN"],
        centroids_LHCD=buf["centroids_LHCD"],
        cluster_start_LHC=buf["cluster_start_LHC"],
        cluster_size_LHC=buf["cluster_size_LHC"],
        radius_LHC=buf["radius_LHC"],
        coarse_centroids_LHCcD=buf.get("coarse_centroids_LHCcD"),
        coarse_first_LHCc=buf.get("coarse_first_LHCc"),
        coarse_count_LHCc=buf.get("coarse_count_LHCc"),
        log_threshold_LH=log_thr,
        budgets_LHF=budgets,
        context_len=S,
        n_sink=config.n_sink,
        window=config.window,
        n_fixed=sizes.n_fixed,
        fixed_pad=sizes.fixed_pad,
        n_clustered=M,
        block_pad=config.block_pad,
        block_k=config.block_k,
        max_fine_per_coarse=cap,
        budget_fractions=tuple(config.budgets) if calibrate else (),
        info=info,
    )
    index.check()
    report = BuildReport(
        stage_seconds=stage,
        group_seconds=group_seconds,
        layer_group=group,
        n_clusters=C,
        n_coarse=Cc,
        kmeans_chunk=plan.chunk,
        kmeans_iters=iters_log,
        kmeans_objective=obj_log,
        calibration=calib_report,
    )
    return index, report


def _finish_calibration(mean_prob_LHC, recall_LHK, sizes_LHC, config: IndexConfig, context_len: int,
                        n_fixed: int, n_clustered: int) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """Global threshold and per-(layer, head) budgets (one column per `config.budgets`) from the statistics."""
    L, H = recall_LHK.shape[:2]
    thr = global_log_threshold(mean_prob_LHC, sizes_LHC, config.quantile)
    report: dict[str, Any] = {
        "quantile": config.quantile,
        "log_threshold": thr,
        "kept_fraction_per_layer": [float(x) for x in kept_fraction_at_threshold(mean_prob_LHC, sizes_LHC, thr)],
    }
    cols, reports = [], []
    for f in config.budgets:
        b_LH, rep = allocate_budgets(
            recall_LHK,
            fraction=f,
            context_len=context_len,
            n_fixed=n_fixed,
            n_clustered=n_clustered,
            block_k=config.block_k,
            min_share=config.min_budget_share,
            max_share=config.max_budget_share,
            objective=config.budget_objective,
        )
        cols.append(b_LH)
        reports.append(rep)
    report["budgets"] = reports
    return jnp.full((L, H), thr, jnp.float32), jnp.asarray(np.stack(cols, axis=-1), jnp.int32), report


CALIBRATION_FIELDS = ("budgets", "quantile", "min_budget_share", "max_budget_share", "budget_objective",
                      "block_k", "calib_q_chunk")


def recalibrate_index(index: ContextIndex, q_window_LTHqD: jax.Array,
                      config: IndexConfig) -> tuple[ContextIndex, dict[str, Any]]:
    """Redo only the calibration of a built index (threshold and budgets) with `config`'s calibration fields
    (CALIBRATION_FIELDS), keeping its clusters and layout. `q_window_LTHqD`: queries of the index's window."""
    if not isinstance(index, ContextIndex):
        raise TypeError(f"index must be a ContextIndex, got {type(index).__name__}")
    L, H, N, D = index.keys_LHND.shape
    if q_window_LTHqD.ndim != 4 or q_window_LTHqD.shape[:2] != (L, index.window) or q_window_LTHqD.shape[3] != D:
        raise ValueError(f"q_window must be [L={L}, window={index.window}, Hq, D={D}], got {q_window_LTHqD.shape}")
    if index.window < 1:
        raise ValueError("calibration needs an index built with window >= 1")
    for f in config.budgets:
        uniform_budget_blocks(f, index.context_len, index.n_fixed, config.block_k)
    q_pos = jnp.arange(index.context_len - index.window, index.context_len, dtype=jnp.int32)
    probs, curves = [], []
    for li in range(L):
        p_HC, r_HK = layer_calibration_stats(
            index.keys_LHND[li], index.positions_LHN[li], index.centroids_LHCD[li], index.cluster_start_LHC[li],
            index.cluster_size_LHC[li], q_window_LTHqD[li], q_pos, n_fixed=index.n_fixed,
            fixed_pad=index.fixed_pad, n_clustered=index.n_clustered, block_k=config.block_k,
            q_chunk=config.calib_q_chunk)
        probs.append(p_HC)
        curves.append(r_HK)
    log_thr, budgets, report = _finish_calibration(
        np.asarray(jnp.stack(probs)), np.asarray(jnp.stack(curves)), np.asarray(index.cluster_size_LHC), config,
        index.context_len, index.n_fixed, index.n_clustered)
    build_cfg = index.info.build_config
    build_cfg.update({k: config.to_dict()[k] for k in CALIBRATION_FIELDS if k != "block_k"})
    build_cfg["budgets"] = list(config.budgets)
    info = dataclasses.replace(index.info, build_config_json=json.dumps(build_cfg, sort_keys=True),
                               calibration_json=json.dumps(report, sort_keys=True))
    out = dataclasses.replace(index, log_threshold_LH=log_thr, budgets_LHF=budgets,
                              budget_fractions=tuple(config.budgets), info=info)
    out.check()
    return out, report


def build_index(model, context_tokens, config: IndexConfig | None = None) -> ContextIndex:
    """Capture the fixed context with the model (chunked dense prefill) and build its index."""
    return build_index_report(model, context_tokens, config)[0]


def build_index_report(
    model, context_tokens, config: IndexConfig | None = None
) -> tuple[ContextIndex, BuildReport]:
    """`build_index` that also returns the `BuildReport` (its stage_seconds include "capture")."""
    from squeeze_jax.index.capture import capture_context, validate_context_tokens
    from squeeze_jax.index.io import model_fingerprint

    config = config or IndexConfig.load("default")
    if not isinstance(config, IndexConfig):
        raise TypeError(f"config must be an IndexConfig, got {type(config).__name__}")
    cfg = model.config
    tokens = validate_context_tokens(context_tokens, cfg)
    S = int(tokens.shape[0])
    sizes = LayoutSizes(S, config.n_sink, config.window, config.block_pad)
    if config.n_clusters(sizes.n_clustered) > sizes.n_clustered:
        raise ValueError(f"too many centroids for {sizes.n_clustered} clustered tokens")
    if config.window >= 1:
        for f in config.budgets:
            uniform_budget_blocks(f, S, sizes.n_fixed, config.block_k)
    t = time.perf_counter()
    cap = capture_context(model, tokens, chunk_size=config.prefill_chunk, window=config.window)
    jax.block_until_ready(cap)
    t_capture = time.perf_counter() - t
    index, report = build_index_from_kv_report(
        cap.k_LHSD,
        cap.v_LHSD,
        cap.q_window_LTHqD if config.window >= 1 else None,
        config,
        model_fingerprint=model_fingerprint(model),
        context_token_hash=token_hash(tokens),
        max_context=cfg.max_context,
    )
    report.stage_seconds["capture"] = t_capture
    return index, report


def describe_report(report: BuildReport) -> str:
    """One line per stage plus the budget allocation, for logs and the CLI."""
    lines = [f"{k:>12s}: {v:8.3f} s" for k, v in report.stage_seconds.items()]
    lines.append(
        f"clusters {report.n_clusters} (coarse {report.n_coarse}), layer group {report.layer_group}, "
        f"kmeans iters {report.kmeans_iters}"
    )
    for b in report.calibration.get("budgets", []):
        lines.append(
            f"budget {b['fraction']:.4g}: keys {b['budget_keys_min']}..{b['budget_keys_max']} "
            f"(uniform {b['uniform_budget_keys']}), recall mean {b['recall_uniform_mean']:.3f} -> "
            f"{b['recall_allocated_mean']:.3f}, min {b['recall_uniform_min']:.3f} -> "
            f"{b['recall_allocated_min']:.3f}"
        )
    if "log_threshold" in report.calibration:
        kept = report.calibration["kept_fraction_per_layer"]
        lines.append(
            f"threshold (q={report.calibration['quantile']}): log {report.calibration['log_threshold']:.3f}, "
            f"kept fraction per layer {min(kept):.3f}..{max(kept):.3f}"
        )
    return "\n".join(lines)


__all__ = [
    "BuildReport",
    "IndexConfig",
    "auto_layer_group",
    "build_index",
    "build_index_from_kv",
    "build_index_from_kv_report",
    "build_index_report",
    "describe_report",
    "recalibrate_index",
    "token_hash",
]
