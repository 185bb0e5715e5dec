"""GGUF reader and numpy dequantiser: llama.cpp model files → Hugging Face-named float32 state dicts.

Pure numpy (no `gguf` package): the header is parsed eagerly and validated before any tensor is touched,
tensor data stays memory-mapped until a tensor is asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.config import ModelConfig, RopeScaling

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# ggml tensor type id -> (name, elements per block, bytes per block). The full table is kept so that file
# sizes can be validated for any known type; only DEQUANTIZERS below can be turned into floats.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
GGML_TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

# GGUF metadata value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
                  11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. `shape` is in numpy order (GGUF's `ne` reversed); `offset` is absolute."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: metadata, tensor table and the memory-mapped bytes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    header_sha256: str
    _data: np.ndarray = dataclasses.field(repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The packed bytes of one tensor (a uint8 view into the memory map, no copy)."""
        info = self._info(name)
        return self._data[info.offset: info.offset + info.n_bytes]

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantised to float32 in numpy shape."""
        info = self._info(name)
        return dequantize(self.raw(name), info.ggml_type, info.n_elements).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(f"tensor {name!r} not in {self.path.name}")
        return self.tensors[name]


class _Cursor:
    """Bounds-checked little-endian reader over the header bytes."""

    def __init__(self, buf: memoryview, file_size: int) -> None:
        self.buf, self.pos, self.size = buf, 0, file_size

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"truncated GGUF header: reading {what} needs {n} bytes at offset {self.pos}, "
                             f"file has {self.size}")
        out = self.buf[self.pos: self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"GGUF {what} at offset {self.pos - n} is not valid UTF-8") from e

    def string_array(self, count: int, what: str) -> list[str]:
        """Fast path for the large token/merge lists (one bounds check per string, no struct per call)."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        unpack = _U64.unpack_from
        for i in range(count):
            if pos + 8 > size:
                raise ValueError(f"truncated GGUF header: {what}[{i}] at offset {pos}, file has {size} bytes")
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > size:
                raise ValueError(f"truncated GGUF header: {what}[{i}] needs {n} bytes at offset {pos}, "
                                 f"file has {size}")
            try:
                out.append(str(buf[pos: pos + n], "utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"GGUF {what}[{i}] at offset {pos} is not valid UTF-8") from e
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str) -> Any:
        if vtype == 6:  # float32: the shortest decimal that round-trips, so 1e-5 reads as 1e-05, not 9.99e-06
            return float(str(np.float32(self.scalar("<f", what))))
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", f"element type of {what}")
            count = self.scalar("<Q", f"length of {what}")
            if etype in _SCALAR_DTYPES:
                dtype = np.dtype(_SCALAR_DTYPES[etype])
                arr = np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)
                return arr.tolist()
            if etype == _STRING:
                return self.string_array(count, what)
            if etype == _ARRAY:
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            raise ValueError(f"unknown GGUF array element type {etype} in {what}")
        raise ValueError(f"unknown GGUF metadata value type {vtype} in {what}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse and validate a GGUF v2/v3 file; tensor data is memory-mapped, nothing is dequantised."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    file_size = path.stat().st_size
    if file_size < 4:
        raise ValueError(f"{path.name}: not a GGUF file ({file_size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data), file_size)
    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path.name}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.scalar("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise ValueError(f"{path.name}: unsupported GGUF version {version}{hint}; "
                         f"supported: {SUPPORTED_VERSIONS}")
    n_tensors = cur.scalar("<Q", "tensor count")
    n_kv = cur.scalar("<Q", "metadata count")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"value type of {key!r}")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")

    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path.name}: general.alignment must be a power of two, got {alignment}")

    raw_infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.scalar("<I", f"n_dims of {name!r}")
        if n_dims > 8:
            raise ValueError(f"{path.name}: tensor {name!r} has {n_dims} dims (max 8); corrupt header")
        ne = [cur.scalar("<Q", f"dims of {name!r}") for _ in range(n_dims)]
        ggml_type = cur.scalar("<I", f"type of {name!r}")
        rel_offset = cur.scalar("<Q", f"offset of {name!r}")
        raw_infos.append((name, ne, ggml_type, rel_offset))

    data_offset = -(-cur.pos // alignment) * alignment
    header_sha = hashlib.sha256(bytes(cur.buf[: cur.pos])).hexdigest()

    tensors: dict[str, TensorInfo] = {}
    for name, ne, ggml_type, rel_offset in raw_infos:
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"{path.name}: tensor {name!r} has unknown ggml type id {ggml_type}")
        type_name, block, type_size = GGML_TYPES[ggml_type]
        if name in tensors:
            raise ValueError(f"{path.name}: duplicate tensor name {name!r}")
        if ne and ne[0] % block:
            raise ValueError(f"{path.name}: tensor {name!r} row length {ne[0]} is not a multiple of the "
                             f"{type_name} block size {block}")
        if rel_offset % alignment:
            raise ValueError(f"{path.name}: tensor {name!r} offset {rel_offset} is not {alignment}-aligned")
        n_bytes = math.prod(ne) // block * type_size
        offset = data_offset + rel_offset
        if offset + n_bytes > file_size:
            raise ValueError(f"{path.name}: truncated file: tensor {name!r} ({type_name}, {n_bytes} bytes at "
                             f"offset {offset}) extends past the end of the file ({file_size} bytes)")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), ggml_type, offset, n_bytes)

    return GGUFFile(path, version, metadata, tensors, alignment, data_offset, file_size, header_sha, data)


# --------------------------------------------------------------------------------------------------
# Dequantisation (vectorised over blocks; elements of a block are contiguous along the row)


def _blocks(raw: np.ndarray, n_elements: int, block: int, type_size: int) -> np.ndarray:
    return np.asarray(raw, dtype=np.uint8).reshape(n_elements // block, type_size)


def _f16_field(blocks_NB: np.ndarray, start: int) -> np.ndarray:
    """fp16 field at byte `start` of every block, as a float32 column [N, 1]."""
    return np.ascontiguousarray(blocks_NB[:, start: start + 2]).view("<f2").astype(np.float32)


def _nibbles_f32(qs_N16: np.ndarray) -> np.ndarray:
    """Unpack 16 bytes per block to 32 float32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    out_N32 = np.empty((qs_N16.shape[0], 32), np.float32)
    np.bitwise_and(qs_N16, 0x0F, out=out_N32[:, :16], casting="unsafe")
    np.right_shift(qs_N16, 4, out=out_N32[:, 16:], casting="unsafe")
    return out_N32


def _deq_f32(raw: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(raw).view("<f4").astype(np.float32, copy=True)


def _deq_f16(raw: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(raw).view("<f2").astype(np.float32)


def _deq_bf16(raw: np.ndarray, n: int) -> np.ndarray:
    return (np.asarray(raw).view("<u2").astype(np.uint32) << 16).view(np.float32)


def _deq_q8_0(raw: np.ndarray, n: int) -> np.ndarray:
    b = _blocks(raw, n, 32, 34)
    out_N32 = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    out_N32 *= _f16_field(b, 0)
    return out_N32.reshape(-1)


def _deq_q4_0(raw: np.ndarray, n: int) -> np.ndarray:
    b = _blocks(raw, n, 32, 18)
    out_N32 = _nibbles_f32(b[:, 2:])
    out_N32 -= 8.0
    out_N32 *= _f16_field(b, 0)
    return out_N32.reshape(-1)


def _deq_q4_1(raw: np.ndarray, n: int) -> np.ndarray:
    b = _blocks(raw, n, 32, 20)
    out_N32 = _nibbles_f32(b[:, 4:])
    out_N32 *= _f16_field(b, 0)
    out_N32 += _f16_field(b, 2)
    return out_N32.reshape(-1)


DEQUANTIZERS = {0: _deq_f32, 1: _deq_f16, 30: _deq_bf16, 8: _deq_q8_0, 2: _deq_q4_0, 3: _deq_q4_1}


def dequantize(raw: np.ndarray, ggml_type: int, n_elements: int) -> np.ndarray:
    """Packed bytes of `n_elements` values of `ggml_type` → flat float32 array."""
    if ggml_type not in DEQUANTIZERS:
        name = GGML_TYPES.get(ggml_type, (f"unknown id {ggml_type}",))[0]
        supported = ", ".join(GGML_TYPES[t][0] for t in DEQUANTIZERS)
        raise ValueError(f"cannot dequantise ggml type {name}; supported: {supported}")
    _, block, type_size = GGML_TYPES[ggml_type]
    expected = n_elements // block * type_size
    if n_elements % block or np.asarray(raw).size != expected:
        raise ValueError(f"{GGML_TYPES[ggml_type][0]}: {n_elements} elements need {expected} bytes in blocks "
                         f"of {block}, got {np.asarray(raw).size}")
    return DEQUANTIZERS[ggml_type](raw, n_elements)


# --------------------------------------------------------------------------------------------------
# Model config and Hugging Face state dict

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# architectures whose converter permutes Q/K rows for interleaved RoPE
_PERMUTED_QK_ARCHITECTURES = ("llama",)


def _arch(meta: Mapping[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    return arch


def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata is missing required key {key!r}")
    return meta[key]


def config_from_gguf(meta: Mapping[str, Any], tensor_names: Collection[str], name: str | None = None
                     ) -> ModelConfig:
    """ModelConfig from GGUF metadata; `tensor_names` decides tied embeddings (no `output.weight`)."""
    arch = _arch(meta)
    p = f"{arch}."
    d_model = int(_require(meta, p + "embedding_length"))
    n_heads = int(_require(meta, p + "attention.head_count"))
    n_kv = meta.get(p + "attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ValueError(f"per-layer {p}attention.head_count_kv is not supported: {n_kv[:4]}...")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else meta.get(p + "vocab_size")
    if vocab is None:
        raise ValueError("GGUF metadata has neither tokenizer.ggml.tokens nor a vocab_size key")

    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF stores per-dimension rope_freqs (Llama-3.1-style RoPE scaling), which cannot "
                         "be mapped to RopeScaling exactly; load the Hugging Face checkpoint instead")
    rope_type = meta.get(p + "rope.scaling.type", "none")
    if rope_type in ("none", None):
        scaling = RopeScaling()
    elif rope_type == "linear":
        scaling = RopeScaling(rope_type="linear", factor=float(_require(meta, p + "rope.scaling.factor")))
    else:
        raise ValueError(f"unsupported GGUF rope scaling type {rope_type!r}; supported: none, linear")

    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        if key in meta and int(meta[key]) not in eos_ids:
            eos_ids.append(int(meta[key]))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        name=name or str(meta.get("general.name") or arch),
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(_require(meta, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(meta.get(p + "attention.key_length", d_model // n_heads)),
        ffn_dim=int(_require(meta, p + "feed_forward_length")),
        max_context=int(_require(meta, p + "context_length")),
        rms_eps=float(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_layout="rotate_half",  # Q/K rows are un-permuted on load
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
    )


def unpermute_qk(w_RX: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's per-head Q/K row permutation (interleaved → rotate-half RoPE row order).

    The converter maps rows per head as reshape(n, 2, D/2, ...) → swapaxes(1, 2); this is its exact inverse.
    Works on weights [n*D, d] and biases [n*D].
    """
    rows = w_RX.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w_RX.reshape(n_heads, half, 2, *w_RX.shape[1:]).swapaxes(1, 2).reshape(w_RX.shape)


_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face parameter name → shape for a Llama-family config."""
    d, hd = config.d_model, config.head_dim
    q, kv, f = config.n_heads * hd, config.n_kv_heads * hd, config.ffn_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, d),
                                       "model.norm.weight": (d,)}
    if not config.tie_embeddings:
        out["lm_head.weight"] = (config.vocab_size, d)
    per_layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    if config.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
    for i in range(config.n_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    return out


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name → Hugging Face parameter name (None when unknown)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_MAP:
        return f"model.layers.{parts[1]}.{_LAYER_MAP[parts[2]]}"
    return None


def gguf_to_state_dict(gguf_file: GGUFFile, config: ModelConfig) -> dict[str, np.ndarray]:
    """Every tensor as float32 under its Hugging Face name, Q/K rows un-permuted for rotate-half RoPE.

    All names, shapes and types are validated before anything is dequantised.
    """
    arch = _arch(gguf_file.metadata)
    expected = expected_hf_shapes(config)
    mapping: dict[str, str] = {}
    unknown = []
    for gname, info in gguf_file.tensors.items():
        hname = hf_name(gname)
        if hname is None or hname not in expected:
            unknown.append(gname)
            continue
        if info.shape != expected[hname]:
            raise ValueError(f"tensor {gname!r} ({hname}) has shape {info.shape}, "
                             f"config expects {expected[hname]}")
        if info.ggml_type not in DEQUANTIZERS:
            raise ValueError(f"tensor {gname!r} has ggml type {info.type_name}, which cannot be dequantised; "
                             f"supported: {', '.join(GGML_TYPES[t][0] for t in DEQUANTIZERS)}")
        mapping[hname] = gname
    if unknown:
        raise ValueError(f"GGUF tensors with no place in the model: {sorted(unknown)[:8]}")
    missing = sorted(set(expected) - set(mapping))
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} tensors the config needs, e.g. {missing[:4]}")

    permuted = arch in _PERMUTED_QK_ARCHITECTURES
    state: dict[str, np.ndarray] = {}
    for hname, gname in mapping.items():
        w = gguf_file.tensor(gname)
        if permuted and ".self_attn.q_proj." in hname:
            w = unpermute_qk(w, config.n_heads)
        elif permuted and ".self_attn.k_proj." in hname:
            w = unpermute_qk(w, config.n_kv_heads)
        state[hname] = np.ascontiguousarray(w, dtype=np.float32)
    return state


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], GGUFFile]:
    """Read a GGUF model file → (config, Hugging Face float32 state dict, parsed file)."""
    gguf_file = read_gguf(path)
    config = config_from_gguf(gguf_file.metadata, gguf_file.tensors.keys())
    return config, gguf_to_state_dict(gguf_file, config), gguf_file
