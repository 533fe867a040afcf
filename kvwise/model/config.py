"""Architecture description of a Llama-family decoder, as read from GGUF or config.json.

Invariants:
- `num_heads % num_kv_heads == 0` (GQA groups); `head_dim * num_heads` need not equal hidden_size.
- `rope_scaling` is None or a dict in Hugging Face form with a `rope_type` key
  ("linear" with `factor`, or "llama3" with `factor`, `low_freq_factor`, `high_freq_factor`,
  `original_max_position_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" (SmolLM2, Llama 2/3), "mistral", "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    @property
    def kv_bytes_per_token_fp32(self) -> int:
        """Bytes of K and V for one token across all layers in fp32."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4
