"""Flax decoder (GPT-2, Llama 1/2/3, Mistral, Qwen2/2.5, Qwen3) with HF safetensors load/save.

Public API:
  ModelConfig, Transformer, KVCache, init_cache, split_cache, init_params, logical_specs, default_positions,
  load_pretrained, save_pretrained, ModelLoadError.
"""

from rlhf_jax.models.cache import KVCache, init_cache, split_cache
from rlhf_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from rlhf_jax.models.errors import ModelLoadError
from rlhf_jax.models.hf_io import stack_layers, unstack_layers
from rlhf_jax.models.pretrained import load_pretrained
from rlhf_jax.models.save import hf_state_dict, save_pretrained
from rlhf_jax.models.transformer import Transformer, default_positions, init_params, logical_specs
from rlhf_jax.models.weight_layout import for_decoding, out_in_model, to_out_in

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "ModelLoadError", "KVCache", "Transformer", "default_positions",
           "init_cache", "split_cache", "init_params", "logical_specs", "load_pretrained", "save_pretrained",
           "hf_state_dict", "stack_layers", "unstack_layers", "for_decoding", "out_in_model", "to_out_in"]
