"""Model configuration: a frozen, hashable dataclass usable as a static jit argument."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from importlib import resources
from typing import Any

_ROPE_TYPES = ("default", "llama3", "linear")
_ROPE_LAYOUTS = ("rotate_half", "interleaved")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` uses the four Llama-3.1 parameters, `linear` only `factor`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"unknown rope scaling type {self.rope_type!r}; expected one of {_ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_context: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    rope_layout: str = "rotate_half"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                      "max_context"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_layout not in _ROPE_LAYOUTS:
            raise ValueError(f"unknown rope_layout {self.rope_layout!r}; expected one of {_ROPE_LAYOUTS}")
        if isinstance(self.rope_scaling, dict):  # allow plain dicts from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Stable hash of the architecture (not the weights)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], name: str | None = None) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2 families)."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        is_qwen2 = arch.startswith("Qwen2") or hf.get("model_type") == "qwen2"
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        # transformers >= 5 folds rope_theta and the scaling dict into `rope_parameters`.
        rope_params = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope_params
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        rope = RopeScaling(
            rope_type=rope_type,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
        )
        eos = hf.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            name=name or hf.get("_name_or_path") or arch,
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads", n_heads)),
            head_dim=int(hf.get("head_dim") or d_model // n_heads),
            ffn_dim=int(hf["intermediate_size"]),
            max_context=int(hf.get("max_position_embeddings", 4096)),
            rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(hf.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=rope,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", is_qwen2)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def available_presets() -> list[str]:
    """Names of the bundled model presets under `configs/models/`."""
    root = resources.files("configs") / "models"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> ModelConfig:
    """Load a bundled model preset, e.g. `smollm2-135m` or `llama-3.1-8b`."""
    names = available_presets()
    if name not in names:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(names)}")
    text = (resources.files("configs") / "models" / f"{name}.json").read_text()
    return ModelConfig.from_dict(json.loads(text))
