"""Llama-family models: config, Flax NNX decoder, KV cache, attention interface, checkpoint loaders."""

from models.attention import AttentionBackend, DenseAttention, LayerKV, reference_attention, write_kv
from models.config import ModelConfig, RopeScaling, available_presets, load_preset
from models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from models.kv_cache import KVCache
from models.llama import Llama, apply, check_inputs, init_model, load_state_dict, to_state_dict
from models.rope import apply_rope

__all__ = [
    "AttentionBackend",
    "DenseAttention",
    "KVCache",
    "LayerKV",
    "Llama",
    "ModelConfig",
    "RopeScaling",
    "apply",
    "apply_rope",
    "available_presets",
    "check_inputs",
    "init_model",
    "load_hf_checkpoint",
    "load_preset",
    "load_state_dict",
    "reference_attention",
    "save_hf_checkpoint",
    "to_state_dict",
    "write_kv",
]
