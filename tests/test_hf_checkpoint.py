"""Hugging Face safetensors checkpoints: sharded write/read round trip, config mapping, corrupt files."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models.config import ModelConfig, RopeScaling
from models.hf_checkpoint import (
    INDEX_FILE,
    config_to_hf,
    load_hf_checkpoint,
    load_hf_state_dict,
    read_safetensors,
    save_hf_checkpoint,
    write_safetensors,
)
from models.llama import hf_param_shapes, to_state_dict

CONFIG = ModelConfig(
    name="tiny-qwen",
    vocab_size=50,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    ffn_dim=48,
    max_context=128,
    rms_eps=1e-6,
    rope_theta=1e6,
    qkv_bias=True,
    bos_token_id=None,
    eos_token_ids=(3, 4),
)


def random_state_dict(config: ModelConfig, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in hf_param_shapes(config).items()}


@pytest.fixture()
def checkpoint(tmp_path):
    sd = random_state_dict(CONFIG)
    total = sum(a.nbytes for a in sd.values())
    files = save_hf_checkpoint(tmp_path, CONFIG, sd, shard_size_bytes=total // 3)
    return tmp_path, sd, files


def test_sharded_round_trip(checkpoint):
    path, sd, files = checkpoint
    assert len(files) >= 3 and all((path / f).is_file() for f in files)
    index = json.loads((path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in sd.values())
    config, loaded = load_hf_state_dict(path)
    assert config == CONFIG
    assert set(loaded) == set(sd)
    for name, arr in sd.items():
        assert loaded[name].dtype == arr.dtype
        np.testing.assert_array_equal(loaded[name], arr, err_msg=name)
    config, model = load_hf_checkpoint(path, jnp.float32)
    assert model.dtype == np.float32 and config == CONFIG
    back = to_state_dict(model)
    for name, arr in sd.items():
        np.testing.assert_array_equal(back[name], arr, err_msg=name)


def test_bf16_single_file_and_official_reader(tmp_path):
    config = CONFIG.replace(qkv_bias=False, tie_embeddings=True, n_layers=1)
    sd = random_state_dict(config, ml_dtypes.bfloat16, seed=1)
    files = save_hf_checkpoint(tmp_path, config, sd)
    assert files == ["model.safetensors"] and not (tmp_path / INDEX_FILE).exists()
    _, model = load_hf_checkpoint(tmp_path, jnp.bfloat16)
    back = to_state_dict(model)
    for name, arr in sd.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name].view(np.uint16), arr.view(np.uint16), err_msg=name)
    # cross-check the file format against the reference implementation (float32 file)
    from safetensors.numpy import load_file, save_file

    f32 = {n: a.astype(np.float32) for n, a in sd.items()}
    write_safetensors(tmp_path / "ours.safetensors", f32)
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    save_file(f32, str(tmp_path / "theirs.safetensors"))
    ours = read_safetensors(tmp_path / "theirs.safetensors")
    for name, arr in f32.items():
        np.testing.assert_array_equal(theirs[name], arr)
        np.testing.assert_array_equal(ours[name], arr)


def test_config_round_trip_and_transformers5_layout():
    llama3 = CONFIG.replace(
        name="l3",
        qkv_bias=False,
        bos_token_id=1,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    )
    for config in (CONFIG, llama3, CONFIG.replace(rope_scaling=RopeScaling("linear", 2.0))):
        assert ModelConfig.from_hf_config(config_to_hf(config)) == config
    # transformers >= 5 writes rope settings under `rope_parameters` and may omit `architectures`
    hf = config_to_hf(llama3)
    rope = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"))
    hf.update(rope_parameters=rope, architectures=None)
    assert ModelConfig.from_hf_config(hf) == llama3
    qwen = config_to_hf(CONFIG)
    rope = {"rope_type": "default", "rope_theta": qwen.pop("rope_theta")}
    qwen.update(architectures=None, rope_parameters=rope)
    assert ModelConfig.from_hf_config(qwen) == CONFIG
    with pytest.raises(ValueError, match="rotate_half"):
        config_to_hf(CONFIG.replace(rope_layout="interleaved"))


def test_truncated_shard(checkpoint):
    path, _, files = checkpoint
    shard = path / files[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"{files[1]} is truncated"):
        load_hf_checkpoint(path)
    shard.write_bytes(data[:5])
    with pytest.raises(ValueError, match="truncated"):
        load_hf_checkpoint(path)


def test_missing_shard_and_missing_files(checkpoint, tmp_path_factory):
    path, _, files = checkpoint
    (path / files[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=files[-1]):
        load_hf_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_hf_checkpoint(path / "nope")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(empty)
    (empty / "config.json").write_text(json.dumps(config_to_hf(CONFIG)))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_checkpoint(empty)


def test_missing_tensor(checkpoint):
    path, _, _ = checkpoint
    index = json.loads((path / INDEX_FILE).read_text())
    del index["weight_map"]["model.layers.2.self_attn.v_proj.bias"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.2\.self_attn\.v_proj\.bias"):
        load_hf_checkpoint(path)
    # an index naming a tensor its shard does not hold
    index["weight_map"]["model.layers.2.self_attn.v_proj.bias"] = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = index["weight_map"]["model.embed_tokens.weight"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not in file"):
        load_hf_checkpoint(path)


def test_save_rejects_bad_state_dict(tmp_path):
    sd = random_state_dict(CONFIG)
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :5]
    with pytest.raises(ValueError, match="up_proj.weight has shape"):
        save_hf_checkpoint(tmp_path, CONFIG, sd)
    with pytest.raises(ValueError, match="shard_size_bytes"):
        save_hf_checkpoint(tmp_path, CONFIG, random_state_dict(CONFIG), shard_size_bytes=0)
