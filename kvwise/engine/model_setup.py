"""Build the runnable model from an EngineConfig: load weights, fuse, place, build RoPE tables.

Invariants:
- The module is created on the meta device and materialised once on the target device, so no
  random initialisation or second full copy of the weights is made.
"""

from __future__ import annotations

import torch

from kvwise.config import EngineConfig
from kvwise.model.config import ModelConfig
from kvwise.model.llama import LlamaModel
from kvwise.model.loader import load_model
from kvwise.model.tokenizer import Tokenizer


def build_model(config: EngineConfig, dtype: torch.dtype, device: torch.device
                ) -> tuple[LlamaModel, Tokenizer, ModelConfig, str]:
    loaded = load_model(config.model, dtype=dtype, tokenizer=config.tokenizer)
    mc = loaded.config
    max_positions = max(config.max_model_len or 0, mc.max_position_embeddings)
    with torch.device("meta"):
        model = LlamaModel(mc, max_positions)
    model = model.to_empty(device=device).to(dtype)
    model.load_hf_weights(loaded.weights)
    model.build_rope()
    model.eval()
    return model, loaded.tokenizer, mc, loaded.source
