"""`ContextIndex`: the offline index of one fixed context, a registered dataclass pytree.

Every array leaf has a leading layer axis `L`, so the model can `lax.scan` over layers with the index as part
of the scanned state (`jax.tree.map(lambda a: a[i], index)` is layer i). Layout per (layer, KV head): see
ARCHITECTURE.md, "The context index layout".

Static (meta) fields are the ints that shape the kernels, plus `info` (provenance: build config, model
fingerprint, token hash, library version, calibration report). `IndexInfo` objects all compare equal, so two
indexes of the same shapes hit the same jit cache entry whatever their provenance; provenance is never read by
compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_NAME = "squeeze_jax.context_index"
FORMAT_VERSION = 1


def library_version() -> str:
    try:
        return metadata.version("squeeze-jax")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclasses.dataclass(frozen=True, eq=False)
class IndexInfo:
    """Provenance of an index. Equality/hash ignore the content (see module docstring)."""

    model_fingerprint: str = ""
    token_hash: str = ""
    library_version: str = dataclasses.field(default_factory=library_version)
    build_config_json: str = "{}"
    calibration_json: str = "{}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IndexInfo)

    def __hash__(self) -> int:
        return hash(IndexInfo)

    @property
    def build_config(self) -> dict[str, Any]:
        return json.loads(self.build_config_json)

    @property
    def calibration(self) -> dict[str, Any]:
        return json.loads(self.calibration_json)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ARRAY_FIELDS = (
    "keys_LHND",
    "values_LHND",
    "positions_LHN",
    "centroids_LHCD",
    "cluster_start_LHC",
    "cluster_size_LHC",
    "radius_LHC",
    "coarse_centroids_LHCcD",
    "coarse_first_LHCc",
    "coarse_count_LHCc",
    "log_threshold_LH",
    "budgets_LHF",
)
STATIC_FIELDS = (
    "context_len",
    "n_sink",
    "window",
    "n_fixed",
    "fixed_pad",
    "n_clustered",
    "block_pad",
    "block_k",
    "max_fine_per_coarse",
    "budget_fractions",
    "info",
)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=list(ARRAY_FIELDS), meta_fields=list(STATIC_FIELDS)
)
@dataclasses.dataclass
class ContextIndex:
    """Cluster-ordered KV of a fixed context plus its cluster metadata, for every layer and KV head.

    keys_LHND / values_LHND: model dtype, N = n_pad (multiple of block_pad); valid positions are
        [0, n_fixed) and [fixed_pad, fixed_pad + n_clustered), everything else is zero padding.
    positions_LHN: int32 original token position of each stored key, -1 on padding.
    centroids_LHCD: f32 mean of the raw member keys; cluster_start_LHC (absolute position), cluster_size_LHC
        (int32, >= 1), radius_LHC (f32 max member distance to the centroid).
    coarse_*: optional coarse level (None when not hierarchical); coarse_first_LHCc / coarse_count_LHCc
        index the fine clusters (ordered by coarse parent), at most `max_fine_per_coarse` per coarse one.
    log_threshold_LH: f32 natural-log threshold on the estimated per-key probability S_j (one global value
        broadcast to [L, H]); None when not calibrated.
    budgets_LHF: int32 keys of the clustered region to keep per (layer, head) for each of `budget_fractions`
        (multiples of block_k; the n_fixed fixed keys come on top, so on average n_fixed + budget = fraction x
        context_len); None when not calibrated.
    """

    keys_LHND: jax.Array
    values_LHND: jax.Array
    positions_LHN: jax.Array
    centroids_LHCD: jax.Array
    cluster_start_LHC: jax.Array
    cluster_size_LHC: jax.Array
    radius_LHC: jax.Array
    coarse_centroids_LHCcD: jax.Array | None
    coarse_first_LHCc: jax.Array | None
    coarse_count_LHCc: jax.Array | None
    log_threshold_LH: jax.Array | None
    budgets_LHF: jax.Array | None
    context_len: int
    n_sink: int
    window: int
    n_fixed: int
    fixed_pad: int
    n_clustered: int
    block_pad: int
    block_k: int
    max_fine_per_coarse: int
    budget_fractions: tuple[float, ...]
    info: IndexInfo = dataclasses.field(default_factory=IndexInfo)

    # ------------------------------------------------------------------ shapes
    @property
    def n_layers(self) -> int:
        return int(self.keys_LHND.shape[0])

    @property
    def n_kv_heads(self) -> int:
        return int(self.keys_LHND.shape[1])

    @property
    def n_pad(self) -> int:
        return int(self.keys_LHND.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.keys_LHND.shape[3])

    @property
    def n_clusters(self) -> int:
        return int(self.centroids_LHCD.shape[2])

    @property
    def hierarchical(self) -> bool:
        return self.coarse_centroids_LHCcD is not None

    @property
    def n_coarse(self) -> int:
        return 0 if self.coarse_centroids_LHCcD is None else int(self.coarse_centroids_LHCcD.shape[2])

    @property
    def calibrated(self) -> bool:
        return self.log_threshold_LH is not None

    @property
    def model_fingerprint(self) -> str:
        return self.info.model_fingerprint

    @property
    def token_hash(self) -> str:
        return self.info.token_hash

    def valid_mask(self) -> np.ndarray:
        """bool [n_pad]: positions holding a real key."""
        idx = np.arange(self.n_pad)
        return (idx < self.n_fixed) | ((idx >= self.fixed_pad) & (idx < self.fixed_pad + self.n_clustered))

    def budget(self, fraction: float) -> jax.Array:
        """budget_LH (int32 clustered keys) for one of the calibrated fractions."""
        if self.budgets_LHF is None:
            raise ValueError("this index was built without calibration: it has no budgets")
        for i, f in enumerate(self.budget_fractions):
            if abs(f - fraction) <= 1e-9 * max(1.0, abs(f)):
                return self.budgets_LHF[..., i]
        raise ValueError(f"no budget for fraction {fraction}; calibrated fractions: {self.budget_fractions}")

    def arrays(self) -> dict[str, jax.Array]:
        """The non-None array leaves by field name."""
        return {f: getattr(self, f) for f in ARRAY_FIELDS if getattr(self, f) is not None}

    def static_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in STATIC_FIELDS if f != "info"}
        out["budget_fractions"] = list(self.budget_fractions)
        return out

    def summary(self) -> dict[str, Any]:
        """Human-readable description (sizes, bytes, provenance)."""
        nbytes = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in self.arrays().values())
        return {
            "layers": self.n_layers,
            "kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "context_len": self.context_len,
            "n_fixed": self.n_fixed,
            "n_clustered": self.n_clustered,
            "n_pad": self.n_pad,
            "clusters": self.n_clusters,
            "coarse_clusters": self.n_coarse,
            "max_fine_per_coarse": self.max_fine_per_coarse,
            "budget_fractions": list(self.budget_fractions),
            "kv_dtype": str(self.keys_LHND.dtype),
            "bytes": nbytes,
            "model_fingerprint": self.info.model_fingerprint,
            "token_hash": self.info.token_hash,
            "library_version": self.info.library_version,
        }

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Raise ValueError if shapes, dtypes or static sizes are inconsistent (cheap: no data is read)."""
        L, H, N, D = self.keys_LHND.shape
        C = self.n_clusters

        def expect(name: str, shape: tuple[int, ...], kind: str) -> None:
            a = getattr(self, name)
            if a is None:
                raise ValueError(f"index field {name} is missing")
            if tuple(a.shape) != shape:
                raise ValueError(f"index field {name} has shape {tuple(a.shape)}, expected {shape}")
            ok = {
                "int": jnp.issubdtype(a.dtype, jnp.integer),
                "float": jnp.issubdtype(a.dtype, jnp.floating),
            }[kind]
            if not ok:
                raise ValueError(f"index field {name} has dtype {a.dtype}, expected {kind}")

        expect("values_LHND", (L, H, N, D), "float")
        expect("positions_LHN", (L, H, N), "int")
        expect("centroids_LHCD", (L, H, C, D), "float")
        for name in ("cluster_start_LHC", "cluster_size_LHC"):
            expect(name, (L, H, C), "int")
        expect("radius_LHC", (L, H, C), "float")
        if self.values_LHND.dtype != self.keys_LHND.dtype:
            raise ValueError(
                f"keys ({self.keys_LHND.dtype}) and values ({self.values_LHND.dtype}) dtypes differ"
            )
        if self.n_fixed != self.n_sink + self.window:
            raise ValueError(f"n_fixed ({self.n_fixed}) != n_sink ({self.n_sink}) + window ({self.window})")
        if self.context_len != self.n_fixed + self.n_clustered:
            raise ValueError(f"context_len ({self.context_len}) != n_fixed + n_clustered")
        if self.fixed_pad % self.block_pad or N % self.block_pad or self.fixed_pad < self.n_fixed:
            raise ValueError(
                f"fixed_pad ({self.fixed_pad}) / n_pad ({N}) do not match block_pad {self.block_pad}"
            )
        if self.fixed_pad + self.n_clustered > N:
            raise ValueError(f"n_pad ({N}) is smaller than fixed_pad + n_clustered")
        coarse = [self.coarse_centroids_LHCcD, self.coarse_first_LHCc, self.coarse_count_LHCc]
        if any(c is None for c in coarse) != all(c is None for c in coarse):
            raise ValueError("coarse fields must be all present or all None")
        if coarse[0] is not None:
            Cc = coarse[0].shape[2]
            expect("coarse_centroids_LHCcD", (L, H, Cc, D), "float")
            expect("coarse_first_LHCc", (L, H, Cc), "int")
            expect("coarse_count_LHCc", (L, H, Cc), "int")
            if self.max_fine_per_coarse < 1:
                raise ValueError("a hierarchical index needs max_fine_per_coarse >= 1")
        if (self.log_threshold_LH is None) != (self.budgets_LHF is None):
            raise ValueError("log_threshold_LH and budgets_LHF must be both present or both None")
        if self.budgets_LHF is not None:
            expect("log_threshold_LH", (L, H), "float")
            expect("budgets_LHF", (L, H, len(self.budget_fractions)), "int")
