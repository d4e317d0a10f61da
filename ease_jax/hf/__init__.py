"""Hugging Face checkpoints: the weight mapping (`mapping`), import (`load`), export (`save`).

`load_pretrained` reads an HF directory or a GGUF file; `save_pretrained` writes an HF
directory. They are resolved on first use (PEP 562), so importing `ease_jax.hf.mapping`, which
GGUF import needs, does not import `load`, which dispatches to GGUF import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"config_from_hf": "mapping", "load_pretrained": "load", "resize_vocab": "load",
            "save_pretrained": "save"}
_SUBMODULES = ("check", "export_dir", "load", "mapping", "save")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"ease_jax.hf.{_EXPORTS[name]}"), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"ease_jax.hf.{name}")
  raise AttributeError(f"module 'ease_jax.hf' has no attribute {name!r}")
