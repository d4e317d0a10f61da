"""ease-jax: EASE safety alignment for small language models, in JAX/Flax NNX."""

__version__ = "0.1.0"
