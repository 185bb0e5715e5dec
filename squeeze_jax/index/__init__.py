"""Offline context index: capture, K-means, coarse level, cluster-ordered layout, calibration, save/load."""

from squeeze_jax.index.build import (
    BuildReport,
    IndexConfig,
    build_index,
    build_index_from_kv,
    build_index_from_kv_report,
    build_index_report,
    describe_report,
    token_hash,
)
from squeeze_jax.index.context_index import FORMAT_VERSION, ContextIndex, IndexInfo
from squeeze_jax.index.io import (
    IndexFormatError,
    IndexMismatchError,
    load_index,
    model_fingerprint,
    read_index_metadata,
    save_index,
)

__all__ = [
    "FORMAT_VERSION",
    "BuildReport",
    "ContextIndex",
    "IndexConfig",
    "IndexFormatError",
    "IndexInfo",
    "IndexMismatchError",
    "build_index",
    "build_index_from_kv",
    "build_index_from_kv_report",
    "build_index_report",
    "describe_report",
    "load_index",
    "model_fingerprint",
    "read_index_metadata",
    "save_index",
    "token_hash",
]
