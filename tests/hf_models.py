"""Tiny random transformers models, saved locally (no hub), as the reference for parity."""

from __future__ import annotations

import copy
import tempfile

import numpy as np

FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
    "llama": ("LlamaForCausalLM", "LlamaConfig"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config"),
}


def make_hf_model(family: str, seed: int = 0, out_dir: str | None = None, **config):
  """Builds a random HF model of `family`, every tensor (biases, norms too) randomised,
  saves it with safetensors and returns (torch_model, directory)."""
  import torch
  import transformers

  model_cls, config_cls = (getattr(transformers, n) for n in FAMILIES[family])
  base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
  base.update(copy.deepcopy(config))  # transformers may edit the rope dicts it is given
  torch.manual_seed(seed)
  model = model_cls(config_cls(**base)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.05 * torch.randn_like(p))
  out_dir = out_dir or tempfile.mkdtemp(prefix=f"hf_{family}_")
  model.save_pretrained(out_dir)
  return model, out_dir


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
  """float32 logits of the torch reference."""
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
