"""Hugging Face checkpoints: `config.json` + one or several `*.safetensors` files, read and written without
torch.

The safetensors format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
`{dtype, shape, data_offsets}` (offsets relative to the end of the header), then the raw little-endian bytes.
Files are memory-mapped, so loading a sharded checkpoint touches each tensor once.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.config import ModelConfig
from models.llama import Llama, check_state_dict, load_state_dict

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------
# safetensors files


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header. Returns (tensor entries, data start offset).

    Raises FileNotFoundError if absent and ValueError if the header is corrupt or the file is shorter than
    the header says (truncated download or copy).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: header length {n} is implausible; not a safetensors file?")
        if 8 + n > size:
            raise ValueError(f"{path} is truncated: header needs {8 + n} bytes, file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    data_end = 0
    for name, entry in entries.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: bad header entry for tensor {name!r}: {entry!r}") from err
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or begin < 0:
            raise ValueError(
                f"{path}: tensor {name!r} offsets {begin}..{end} do not match {entry['dtype']}{shape}"
            )
        data_end = max(data_end, end)
    expected = 8 + n + data_end
    if size < expected:
        raise ValueError(f"{path} is truncated: header describes {expected} bytes, file has {size}")
    if size > expected:
        raise ValueError(f"{path} has {size - expected} trailing bytes after its tensors; corrupt file?")
    return entries, 8 + n


def read_safetensors(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read tensors (all, or `names`) of one safetensors file as read-only memory-mapped numpy arrays."""
    entries, start = read_safetensors_header(path)
    wanted = list(entries) if names is None else names
    absent = [n for n in wanted if n not in entries]
    if absent:
        raise ValueError(f"{path}: tensor(s) not in file: {', '.join(absent[:8])}")
    if not wanted:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name in wanted:
        entry = entries[name]
        begin, end = entry["data_offsets"]
        raw = data[start + begin : start + end]
        out[name] = raw.view(_DTYPES[entry["dtype"]]).reshape(tuple(entry["shape"]))
    return out


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays (float/int/bool, bfloat16 via ml_dtypes) as one safetensors file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays = []
    offset = 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _CODES:
            raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored in safetensors")
        nbytes = arr.nbytes
        header[name] = {
            "dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]
        }
        arrays.append(arr)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# checkpoint directories


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `config.json` dict that `ModelConfig.from_hf_config` maps back to `config`."""
    if config.rope_layout != "rotate_half":
        raise ValueError(
            "Hugging Face checkpoints use the rotate_half RoPE layout; permute Q/K rows and set "
            "rope_layout='rotate_half' before saving"
        )
    qwen = config.qkv_bias  # Llama's attention_bias would also add an o_proj bias; Qwen2 biases only q/k/v
    rs = config.rope_scaling
    rope_scaling = None
    if rs.rope_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": rs.factor}
    elif rs.rope_type == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return {
        "_name_or_path": config.name,
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_context,
        "rms_norm_eps": config.rms_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
    }


def _shard_files(path: Path) -> tuple[dict[str, str], list[str]]:
    """(tensor name -> shard file name, shard files) from the index json or the single-file layout."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err})") from err
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) named in {INDEX_FILE} not found: {', '.join(missing)}")
        return weight_map, shards
    if (path / SINGLE_FILE).is_file():
        entries, _ = read_safetensors_header(path / SINGLE_FILE)
        return {name: SINGLE_FILE for name in entries}, [SINGLE_FILE]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        raise FileNotFoundError(f"{path}: {len(found)} safetensors file(s) but no {INDEX_FILE} to map them")
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_hf_state_dict(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, Hugging Face-named numpy tensors) of a checkpoint directory; tensors are memory-mapped."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    try:
        config = ModelConfig.from_hf_config(json.loads(config_file.read_text()), name=None)
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{config_file}: cannot read model config ({err!r})") from err
    weight_map, shards = _shard_files(path)
    state_dict: dict[str, np.ndarray] = {}
    for shard in shards:
        names = [n for n, s in weight_map.items() if s == shard]
        state_dict.update(read_safetensors(path / shard, names))
    return config, state_dict


def load_hf_checkpoint(path: str | os.PathLike, dtype: Any = jnp.bfloat16) -> tuple[ModelConfig, Llama]:
    """Load a Llama/Mistral/Qwen2-family Hugging Face checkpoint directory into a `Llama` of `dtype`."""
    config, state_dict = load_hf_state_dict(path)
    return config, load_state_dict(config, state_dict, dtype)


def save_hf_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    state_dict: dict[str, np.ndarray],
    shard_size_bytes: int = 4 * 1024**3,
) -> list[str]:
    """Write `config.json` and sharded safetensors (+ index json when more than one shard).

    Tensors are packed in the given order; a shard is closed when the next tensor would pass
    `shard_size_bytes` (a single larger tensor gets its own shard). Returns the shard file names.
    """
    if not isinstance(shard_size_bytes, int) or shard_size_bytes <= 0:
        raise ValueError(f"shard_size_bytes must be a positive int, got {shard_size_bytes!r}")
    hf_config = config_to_hf(config)
    arrays = {name: np.asarray(t) for name, t in state_dict.items()}
    check_state_dict(config, arrays)
    groups: list[dict[str, np.ndarray]] = [{}]
    used = 0
    for name, arr in arrays.items():
        if groups[-1] and used + arr.nbytes > shard_size_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = arr
        used += arr.nbytes
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if len(groups) == 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for file, group in zip(files, groups):
        write_safetensors(path / file, group)
    dtypes = {str(a.dtype) for a in arrays.values()}
    hf_config["torch_dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    index = path / INDEX_FILE
    if len(groups) > 1:
        weight_map = {name: file for file, group in zip(files, groups) for name in group}
        total = sum(a.nbytes for a in arrays.values())
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    elif index.exists():
        index.unlink()
    return files
