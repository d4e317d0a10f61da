"""Architecture presets for the real model shapes, plus a tiny one for tests and the demo."""

from __future__ import annotations

from ease_jax.models.transformer import DecoderConfig

_LLAMA3_SCALING = (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                   ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))

PRESETS: dict[str, DecoderConfig] = {
    # A 2-layer model over the bundled demo tokenizer; trains in minutes on a CPU.
    "tiny": DecoderConfig(family="qwen2", vocab_size=2048, hidden_size=128, intermediate_size=352,
                          num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                          max_position_embeddings=2048),
    "qwen2.5-0.5b": DecoderConfig(family="qwen2", vocab_size=151936, hidden_size=896,
                                  intermediate_size=4864, num_layers=24, num_heads=14,
                                  num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                                  max_position_embeddings=32768, rms_norm_eps=1e-6,
                                  tie_embeddings=True, qkv_bias=True),
    "qwen2.5-1.5b": DecoderConfig(family="qwen2", vocab_size=151936, hidden_size=1536,
                                  intermediate_size=8960, num_layers=28, num_heads=12,
                                  num_kv_heads=2, head_dim=128, rope_theta=1000000.0,
                                  max_position_embeddings=32768, rms_norm_eps=1e-6,
                                  tie_embeddings=True, qkv_bias=True),
    "llama3.2-1b": DecoderConfig(family="llama", vocab_size=128256, hidden_size=2048,
                                 intermediate_size=8192, num_layers=16, num_heads=32,
                                 num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                 rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
                                 rms_norm_eps=1e-5, tie_embeddings=True, qkv_bias=False),
    "qwen3-0.6b": DecoderConfig(family="qwen3", vocab_size=151936, hidden_size=1024,
                                intermediate_size=3072, num_layers=28, num_heads=16,
                                num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
                                max_position_embeddings=40960, rms_norm_eps=1e-6,
                                tie_embeddings=True, qkv_bias=False, qk_norm=True),
}


def get_preset(name: str) -> DecoderConfig:
  """The preset `name`; an unknown name raises a ValueError listing the presets."""
  try:
    return PRESETS[name.lower()]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
