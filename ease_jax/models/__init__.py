"""The decoder, its config and presets."""

from ease_jax.models.presets import PRESETS, get_preset
from ease_jax.models.transformer import Decoder, DecoderConfig

__all__ = ["Decoder", "DecoderConfig", "PRESETS", "get_preset"]
