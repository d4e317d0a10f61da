"""Hugging Face checkpoints: the weight mapping (`mapping`), import (`load`), export (`save`).

`load_pretrained` reads an HF directory or a GGUF file; `save_pretrained` writes an HF directory.
"""

from ease_jax.hf.load import load_pretrained, resize_vocab
from ease_jax.hf.mapping import config_from_hf
from ease_jax.hf.save import save_pretrained

__all__ = ["config_from_hf", "load_pretrained", "resize_vocab", "save_pretrained"]
