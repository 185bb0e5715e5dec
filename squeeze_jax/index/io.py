"""Save / load a `ContextIndex`: arrays through Orbax plus a JSON metadata file, validated before any array
is read.

Directory layout:

    <path>/index.json   format name + version, library version, model fingerprint, context length + token
                        hash,
                        static fields, build config, calibration report, and a manifest (shape, dtype, sha256)
                        of every array; written last, so a directory without it is incomplete
    <path>/arrays/      Orbax PyTree checkpoint of the non-None array fields

`load_index` checks the format, version and model fingerprint from the JSON alone, then restores the arrays
and verifies shapes, dtypes and checksums, so a truncated or corrupt directory is an error, never silent
zeros.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from squeeze_jax.index.context_index import (
    ARRAY_FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    ContextIndex,
    IndexInfo,
    library_version,
)

META_FILE = "index.json"
ARRAYS_DIR = "arrays"


class IndexFormatError(ValueError):
    """Not a readable index: missing, not an index, truncated, corrupt or of another format version."""


class IndexMismatchError(ValueError):
    """The index is valid but was built for another model (fingerprint) or another context (token hash)."""


# ------------------------------------------------------------------------------------------- fingerprints


def weights_fingerprint(tree: Any, samples: int = 4096) -> str:
    """sha256 (16 hex) over each floating leaf's path, shape, dtype and `samples` strided elements (exact).

    Sampling keeps this cheap for multi-GB weights while any re-trained or re-quantised model changes it.
    """
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    n = 0
    for path, leaf in leaves:
        if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        n += 1
        size = int(np.prod(leaf.shape))
        stride = max(1, size // samples)
        sample = np.asarray(jnp.ravel(leaf)[::stride][:samples])
        h.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|".encode())
        h.update(sample.tobytes())
    if n == 0:
        raise ValueError("the model has no floating-point weights to fingerprint")
    return h.hexdigest()[:16]


def model_fingerprint(model: Any, params: Any = None) -> str:
    """`<config fingerprint>-<weights fingerprint>` of a model with a `.config` (NNX module or any object).

    params: the weights pytree; default `nnx.state(model)`.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "fingerprint"):
        raise TypeError(f"model must have a .config with a fingerprint() method, got {type(model).__name__}")
    if params is None:
        from flax import nnx

        params = nnx.state(model)
    return f"{config.fingerprint()}-{weights_fingerprint(params)}"


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- save


def save_index(index: ContextIndex, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `index` to directory `path` (must not exist unless overwrite=True and it holds an index)."""
    if not isinstance(index, ContextIndex):
        raise TypeError(f"save_index expects a ContextIndex, got {type(index).__name__}")
    index.check()
    path = Path(path).resolve()
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True to replace an index there)")
        if path.is_dir() and any(path.iterdir()) and not (path / META_FILE).is_file():
            raise FileExistsError(f"refusing to overwrite {path}: it is not an index directory")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True)

    arrays = {name: np.asarray(a) for name, a in index.arrays().items()}
    manifest = {
        name: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256(a)}
        for name, a in arrays.items()
    }
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(path / ARRAYS_DIR, arrays)

    info = index.info
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": library_version(),
        "built_with_library_version": info.library_version,
        "model_fingerprint": info.model_fingerprint,
        "context_len": index.context_len,
        "token_hash": info.token_hash,
        "static": index.static_dict(),
        "build_config": info.build_config,
        "calibration": info.calibration,
        "arrays": manifest,
    }
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, path / META_FILE)
    return path


# ------------------------------------------------------------------------------------------------- load


def read_index_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate `<path>/index.json` (format name and version); reads no array."""
    path = Path(path)
    if not path.exists():
        raise IndexFormatError(f"index directory {path} does not exist")
    if not path.is_dir():
        raise IndexFormatError(f"{path} is not a directory, so not a squeeze_jax context index")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        hint = " (an interrupted save?)" if (path / ARRAYS_DIR).exists() else ""
        raise IndexFormatError(f"{path} is not a squeeze_jax context index: no {META_FILE}{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexFormatError(f"{meta_path} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise IndexFormatError(
            f"{path} is not a squeeze_jax context index (format {meta.get('format')!r})"
            if isinstance(meta, dict)
            else f"{meta_path} is not a JSON object"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has index format version {version!r}; this library reads version "
            f"{FORMAT_VERSION} (rebuild the index)"
        )
    for field in ("static", "arrays", "model_fingerprint", "token_hash", "context_len"):
        if field not in meta:
            raise IndexFormatError(f"{meta_path} lacks the field {field!r}")
    unknown = set(meta["arrays"]) - set(ARRAY_FIELDS)
    if unknown:
        raise IndexFormatError(f"{meta_path} lists unknown arrays {sorted(unknown)}")
    return meta


def load_index(
    path: str | os.PathLike,
    *,
    expected_model_fingerprint: str | None = None,
    expected_token_hash: str | None = None,
    verify_checksums: bool = True,
) -> ContextIndex:
    """Load an index saved by `save_index`; metadata and fingerprints are checked before any array is read."""
    path = Path(path).resolve()
    meta = read_index_metadata(path)
    if expected_model_fingerprint is not None and meta["model_fingerprint"] != expected_model_fingerprint:
        raise IndexMismatchError(
            f"index {path} was built for model {meta['model_fingerprint']!r}, not "
            f"{expected_model_fingerprint!r} (other config or weights)"
        )
    if expected_token_hash is not None and meta["token_hash"] != expected_token_hash:
        raise IndexMismatchError(
            f"index {path} was built for context {meta['token_hash']!r}, not {expected_token_hash!r}"
        )
    arrays_dir = path / ARRAYS_DIR
    if not arrays_dir.is_dir():
        raise IndexFormatError(f"index {path} is truncated: {ARRAYS_DIR}/ is missing")
    manifest = meta["arrays"]
    import orbax.checkpoint as ocp

    restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in manifest}
    try:
        arrays = ocp.PyTreeCheckpointer().restore(arrays_dir, restore_args=restore_args)
    except Exception as e:  # orbax/tensorstore raise many types for missing or damaged files
        raise IndexFormatError(f"index {path} is truncated or corrupt: {type(e).__name__}: {e}") from e
    if not isinstance(arrays, dict) or set(arrays) != set(manifest):
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise IndexFormatError(f"index {path} holds arrays {got}, expected {sorted(manifest)}")
    for name, spec in manifest.items():
        a = np.asarray(arrays[name])
        if list(a.shape) != list(spec["shape"]) or str(a.dtype) != spec["dtype"]:
            raise IndexFormatError(
                f"index {path}: array {name} is {a.shape} {a.dtype}, manifest says "
                f"{tuple(spec['shape'])} {spec['dtype']}"
            )
        if verify_checksums and _sha256(a) != spec["sha256"]:
            raise IndexFormatError(f"index {path}: array {name} is corrupt (checksum mismatch)")
    static = dict(meta["static"])
    static["budget_fractions"] = tuple(static.get("budget_fractions", ()))
    info = IndexInfo(
        model_fingerprint=meta["model_fingerprint"],
        token_hash=meta["token_hash"],
        library_version=meta.get("built_with_library_version", meta.get("library_version", "")),
        build_config_json=json.dumps(meta.get("build_config", {}), sort_keys=True),
        calibration_json=json.dumps(meta.get("calibration", {}), sort_keys=True),
    )
    fields = {name: (jnp.asarray(arrays[name]) if name in arrays else None) for name in ARRAY_FIELDS}
    try:
        index = ContextIndex(**fields, **static, info=info)
        index.check()
    except (TypeError, ValueError) as e:
        raise IndexFormatError(f"index {path} is inconsistent: {e}") from e
    return index
