"""Index save/load (Orbax + JSON): bit-exact round trip, fingerprint checks, damaged and foreign directories;
capture of a real (tiny, random) model and the full build from tokens."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from squeeze_jax.index.context_index import ARRAY_FIELDS, ContextIndex, IndexInfo
from squeeze_jax.index.io import (
    IndexFormatError,
    IndexMismatchError,
    load_index,
    read_index_metadata,
    save_index,
    weights_fingerprint,
)

# orbax leaves an asyncio callback behind after a failed restore; it surfaces later as an unraisable warning
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _synthetic_index(hierarchical: bool = True, calibrated: bool = True) -> ContextIndex:
    """A consistent index with random contents (every dtype the real one uses, bf16 K/V included)."""
    rng = np.random.default_rng(0)
    L, H, N, D, C, Cc = 2, 2, 192, 16, 6, 2
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    i32 = lambda *s: jnp.asarray(rng.integers(0, 100, size=s), jnp.int32)  # noqa: E731
    return ContextIndex(
        keys_LHND=jnp.asarray(rng.normal(size=(L, H, N, D)), jnp.bfloat16),
        values_LHND=jnp.asarray(rng.normal(size=(L, H, N, D)), jnp.bfloat16),
        positions_LHN=i32(L, H, N),
        centroids_LHCD=f32(L, H, C, D),
        cluster_start_LHC=i32(L, H, C),
        cluster_size_LHC=i32(L, H, C),
        radius_LHC=f32(L, H, C),
        coarse_centroids_LHCcD=f32(L, H, Cc, D) if hierarchical else None,
        coarse_first_LHCc=i32(L, H, Cc) if hierarchical else None,
        coarse_count_LHCc=i32(L, H, Cc) if hierarchical else None,
        log_threshold_LH=f32(L, H) if calibrated else None,
        budgets_LHF=i32(L, H, 2) if calibrated else None,
        context_len=100,
        n_sink=4,
        window=12,
        n_fixed=16,
        fixed_pad=64,
        n_clustered=84,
        block_pad=64,
        block_k=16,
        max_fine_per_coarse=3 if hierarchical else 0,
        budget_fractions=(0.5, 0.25) if calibrated else (),
        info=IndexInfo(
            model_fingerprint="cfg-weights",
            token_hash="tok",
            build_config_json='{"iters": 3}',
            calibration_json='{"quantile": 0.9}',
        ),
    )


def _assert_same(a: ContextIndex, b: ContextIndex) -> None:
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), f"{name} differs"
    assert a.static_dict() == b.static_dict()
    assert a.info.to_dict() == b.info.to_dict()


@pytest.mark.parametrize("hierarchical,calibrated", [(True, True), (False, False)])
def test_round_trip_is_bit_exact(tmp_path, hierarchical, calibrated):
    index = _synthetic_index(hierarchical, calibrated)
    save_index(index, tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", expected_model_fingerprint="cfg-weights", expected_token_hash="tok")
    _assert_same(index, loaded)
    meta = read_index_metadata(tmp_path / "idx")
    assert meta["context_len"] == 100 and meta["build_config"] == {"iters": 3}


def test_fingerprint_mismatch_is_reported_before_reading_arrays(tmp_path):
    save_index(_synthetic_index(), tmp_path / "idx")
    shutil.rmtree(tmp_path / "idx" / "arrays")  # arrays are never touched on a mismatch
    with pytest.raises(IndexMismatchError, match="built for model"):
        load_index(tmp_path / "idx", expected_model_fingerprint="other-model")
    with pytest.raises(IndexMismatchError, match="built for context"):
        load_index(tmp_path / "idx", expected_token_hash="other-context")
    with pytest.raises(IndexFormatError, match="truncated"):
        load_index(tmp_path / "idx")


def test_truncated_or_corrupt_arrays_are_errors(tmp_path):
    save_index(_synthetic_index(), tmp_path / "idx")
    files = sorted(p for p in (tmp_path / "idx" / "arrays").rglob("*") if p.is_file())
    data = max(files, key=lambda p: p.stat().st_size)
    blob = bytearray(data.read_bytes())

    data.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated data file
    with pytest.raises(IndexFormatError):
        load_index(tmp_path / "idx")

    blob[len(blob) // 2] ^= 0xFF  # one flipped byte
    data.write_bytes(bytes(blob))
    with pytest.raises(IndexFormatError):
        load_index(tmp_path / "idx")

    data.unlink()  # a missing file
    with pytest.raises(IndexFormatError):
        load_index(tmp_path / "idx")


def test_foreign_directories_and_bad_versions_are_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="does not exist"):
        load_index(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="not a squeeze_jax context index"):
        load_index(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(IndexFormatError, match="not a directory"):
        load_index(tmp_path / "file.txt")
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text(json.dumps({"format": "something.else", "format_version": 1}))
    with pytest.raises(IndexFormatError, match="not a squeeze_jax context index"):
        load_index(other)
    (other / "index.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt"):
        load_index(other)

    save_index(_synthetic_index(), tmp_path / "idx")
    meta_path = tmp_path / "idx" / "index.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="format version 99"):
        load_index(tmp_path / "idx")


def test_save_refuses_to_clobber(tmp_path):
    index = _synthetic_index(False, False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an index directory"):
        save_index(index, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").exists()
    save_index(index, tmp_path / "idx")
    with pytest.raises(FileExistsError, match="already exists"):
        save_index(index, tmp_path / "idx")
    save_index(index, tmp_path / "idx", overwrite=True)
    with pytest.raises(TypeError, match="ContextIndex"):
        save_index({"keys": 1}, tmp_path / "x")


def test_inconsistent_index_is_rejected():
    index = _synthetic_index()
    with pytest.raises(ValueError, match="values_LHND"):
        ContextIndex(**{**index.__dict__, "values_LHND": index.values_LHND[:, :, :10]}).check()
    with pytest.raises(ValueError, match="n_fixed"):
        ContextIndex(**{**index.__dict__, "n_fixed": 17}).check()


def test_weights_fingerprint_tracks_every_leaf():
    tree = {"a": jnp.arange(10000, dtype=jnp.float32), "b": {"c": jnp.ones((3, 4), jnp.bfloat16)}}
    fp = weights_fingerprint(tree)
    assert fp == weights_fingerprint(jax.tree.map(jnp.array, tree))
    assert fp != weights_fingerprint({**tree, "a": tree["a"].at[0].set(-1.0)})
    assert fp != weights_fingerprint({**tree, "b": {"c": tree["b"]["c"] * 2}})
    with pytest.raises(ValueError, match="no floating-point weights"):
        weights_fingerprint({"i": jnp.arange(3)})


@pytest.mark.slow
def test_capture_and_build_from_tokens(tmp_path):
    pytest.importorskip("models.llama")
    from models.config import ModelConfig
    from models.llama import init_model
    from squeeze_jax.index.build import IndexConfig, build_index_report, token_hash
    from squeeze_jax.index.capture import capture_context
    from squeeze_jax.index.io import model_fingerprint

    cfg = ModelConfig(
        name="tiny",
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=64,
        max_context=1024,
    )
    model = init_model(cfg, 0, jnp.float32)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=600).astype(np.int32)

    one = capture_context(model, tokens, chunk_size=600, window=40)
    chunked = capture_context(model, tokens, chunk_size=128, window=40)  # 5 chunks, the window spans two
    assert chunked.k_LHSD.shape == (2, 2, 600, 16) and chunked.q_window_LTHqD.shape == (2, 40, 4, 16)
    for a, b in (
        (one.k_LHSD, chunked.k_LHSD),
        (one.v_LHSD, chunked.v_LHSD),
        (one.q_window_LTHqD, chunked.q_window_LTHqD),
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)

    icfg = IndexConfig.load("default").replace(
        window=40, n_sink=4, prefill_chunk=256, iters=5, progress=False, budgets=(0.25, 0.125)
    )
    index, report = build_index_report(model, tokens, icfg)
    assert "capture" in report.stage_seconds and index.calibrated
    assert index.token_hash == token_hash(tokens) and index.model_fingerprint == model_fingerprint(model)
    pos = np.asarray(index.positions_LHN)
    keys = np.asarray(index.keys_LHND)
    valid = pos[0, 0] >= 0
    np.testing.assert_allclose(
        keys[0, 0][valid], np.asarray(one.k_LHSD)[0, 0][pos[0, 0][valid]], rtol=1e-4, atol=1e-5
    )

    save_index(index, tmp_path / "idx")
    loaded = load_index(tmp_path / "idx", expected_model_fingerprint=model_fingerprint(model))
    _assert_same(index, loaded)
    other = init_model(cfg, 1, jnp.float32)
    with pytest.raises(IndexMismatchError):
        load_index(tmp_path / "idx", expected_model_fingerprint=model_fingerprint(other))
    with pytest.raises(ValueError, match="max_context"):
        build_index_report(model, np.zeros(2000, np.int32), icfg)

    # systematic K-means seeding: the index is a function of the context alone, whatever the seed
    sys_cfg = icfg.replace(kmeans_init="systematic", hierarchical=True, coarse_fraction=0.02)
    a, _ = build_index_report(model, tokens, sys_cfg.replace(seed=0))
    b, _ = build_index_report(model, tokens, sys_cfg.replace(seed=7))
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x is not None and np.asarray(x).tobytes() == np.asarray(y).tobytes(), name
    with pytest.raises(ValueError, match="n_restarts must be 1"):
        icfg.replace(kmeans_init="systematic", n_restarts=2)
    with pytest.raises(ValueError, match="unknown init"):
        icfg.replace(kmeans_init="random")
    assert IndexConfig() == IndexConfig.load("default")  # the dataclass defaults are the bundled preset
    with pytest.raises(ValueError, match="token ids"):
        capture_context(model, np.full(100, 500, np.int32))
    assert Path(tmp_path / "idx" / "index.json").is_file()
