#!/usr/bin/env python
"""Greedy generation in llama.cpp (llama-cpp-python) vs tools/generate.py: same token ids?

  python tools/check_edge.py --export FILE.gguf|HF_EXPORT_DIR --prompts FILE.jsonl
      [--model RUN_DIR|HF_DIR|FILE.gguf] [--converter convert_hf_to_gguf.py] [--type F32]
      [--max_new_tokens 64] [--limit 0] [--out results.json]

--export is what runs in llama.cpp: a .gguf file, or an HF export directory converted first
(with llama.cpp's own --converter script when given, else with ease-jax's GGUF writer,
tools/export_gguf.py). --model is the reference tools/generate.py runs (default: the export
itself, read by ease-jax). Prompts (JSONL rows with `prompt` or `messages`) are rendered with
the reference's chat template; both sides get the same prompt ids and decode greedily with a
float32 KV cache until an end-of-generation token or --max_new_tokens. Also reported: whether
llama.cpp tokenizes each rendered prompt to the same ids, and whether every stop id of the
reference is end-of-generation in llama.cpp. Exit status 1 when any prompt differs.
Needs the `edge` extra (pip install 'ease-jax[edge]'; llama-cpp-python builds from source).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ease_jax.errors import DataError, UserError, run_main  # noqa: E402
from ease_jax.generation import generate as G  # noqa: E402

try:  # the optional `edge` extra
  import llama_cpp
except ImportError:  # reported by main() as a user error
  llama_cpp = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--export", required=True, help="a .gguf file or an HF export directory")
  p.add_argument("--prompts", required=True, help="JSONL rows with `prompt` or `messages`")
  p.add_argument("--model", default=None, help="reference for tools/generate.py (default: --export)")
  p.add_argument("--converter", default=None, help="llama.cpp's convert_hf_to_gguf.py for a directory")
  p.add_argument("--type", default="F32", help="GGUF type when converting a directory (F32, F16, ...)")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--out", default=None, help="write per-prompt results as JSON")
  return p.parse_args(argv)


def read_prompts(path: str, limit: int) -> list[list[dict]]:
  """Conversations (up to the assistant turn) from JSONL rows with `prompt` or `messages`."""
  if not Path(path).is_file():
    raise UserError(f"--prompts {path}: file not found")
  out = []
  for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"not valid JSON ({e.msg})", path=path, line=n) from None
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
      out.append([{"role": "user", "content": row["prompt"]}])
    elif isinstance(row, dict) and isinstance(row.get("messages"), list):
      out.append([m for m in row["messages"] if m.get("role") != "assistant"])
    else:
      raise DataError("a row needs a `prompt` string or a `messages` list", path=path, line=n)
  return out[:limit] if limit else out


def to_gguf(export: Path, args: argparse.Namespace, tmp: Path) -> Path:
  """The .gguf llama.cpp runs: --export itself, or the directory converted."""
  if export.suffix.lower() == ".gguf":
    return export
  if not export.is_dir():
    raise UserError(f"--export {export}: neither a .gguf file nor a directory")
  out = tmp / "export.gguf"
  if args.converter:
    cmd = [sys.executable, args.converter, str(export), "--outfile", str(out),
           "--outtype", args.type.lower()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
      raise UserError(f"{args.converter} failed on {export}: {proc.stderr.strip()[-600:]}")
    return out
  from ease_jax.edge.gguf_write import save_gguf
  model, cfg, tokenizer = G.load_generation_model(str(export))
  return save_gguf(model, cfg, out, tokenizer, args.type)


def llama_greedy(llm, prompt: list[int], max_new: int) -> tuple[list[int], float]:
  """Greedy ids (the end-of-generation token included when one ends it) and seconds."""
  vocab = llm._model.vocab
  start = time.perf_counter()
  llm.reset()
  llm.eval(prompt)
  ids: list[int] = []
  for _ in range(max_new):
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    ids.append(token)
    if llama_cpp.llama_vocab_is_eog(vocab, token):
      break
    llm.eval([token])
  return ids, time.perf_counter() - start


def compare(args: argparse.Namespace, gguf_path: Path) -> list[dict]:
  """Per prompt: both sides' ids, agreement, llama.cpp's own tokenization of the prompt."""
  model, cfg, tokenizer = G.load_generation_model(args.model or str(gguf_path))
  gen = G.Generator(model, cfg, tokenizer, batch_size=1)
  conversations = read_prompts(args.prompts, args.limit)
  prompts = [gen.render(c) for c in conversations]
  ours = gen.generate(prompts, G.SamplingConfig(max_new_tokens=args.max_new_tokens))
  n_ctx = max(len(p) for p in prompts) + args.max_new_tokens + 8
  llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=args.threads,
                        logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
                        type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)
  not_eog = [i for i in gen.stop_ids if not llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)]
  results = []
  for conv, prompt, g in zip(conversations, prompts, ours):
    text = tokenizer.decode(prompt, skip_special_tokens=False)
    llama_prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    ids, seconds = llama_greedy(llm, prompt, args.max_new_tokens)
    ref = g.ids + ([g.stop_id] if g.stopped else [])
    first = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), None)
    if first is None and len(ids) != len(ref):
      first = min(len(ids), len(ref))
    results.append({"prompt": conv[-1]["content"][:80], "prompt_tokens": len(prompt),
                    "same_prompt_tokenization": list(llama_prompt) == list(prompt),
                    "same_tokens": first is None, "first_difference": first,
                    "new_tokens": len(ids), "stopped": bool(ids) and
                    bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, ids[-1])),
                    "llama_cpp_seconds": round(seconds, 3), "llama_cpp_ids": ids,
                    "reference_ids": ref, "text": g.text[:200], "stop_ids_not_eog": not_eog})
  return results


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if llama_cpp is None:
    raise UserError("llama-cpp-python is not installed (the `edge` extra: pip install "
                    "'ease-jax[edge]', a ~20 minute build from source on 2 cores)")
  with tempfile.TemporaryDirectory(prefix="check_edge-") as tmp:
    gguf_path = to_gguf(Path(args.export), args, Path(tmp))
    results = compare(args, gguf_path)
  for r in results:
    verdict = "same" if r["same_tokens"] else f"DIFFERENT from token {r['first_difference']}"
    print(f"  {r['prompt_tokens']:4d} prompt tokens (llama.cpp tokenizes "
          f"{'the same' if r['same_prompt_tokenization'] else 'DIFFERENTLY'})  {r['new_tokens']:3d} "
          f"new ({'stopped' if r['stopped'] else 'max'})  {verdict}  {r['prompt'][:40]!r}")
  same = sum(r["same_tokens"] for r in results)
  tok_same = sum(r["same_prompt_tokenization"] for r in results)
  new = sum(r["new_tokens"] for r in results)
  secs = sum(r["llama_cpp_seconds"] for r in results)
  not_eog = results[0]["stop_ids_not_eog"] if results else []
  print(f"check_edge: {same}/{len(results)} prompts give identical greedy tokens; "
        f"{tok_same}/{len(results)} tokenized identically by llama.cpp; {new} new tokens in "
        f"{secs:.1f}s in llama.cpp; stop ids not end-of-generation in llama.cpp: {not_eog or 'none'}")
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=1))
  return 0 if same == len(results) and not not_eog else 1


if __name__ == "__main__":
  sys.exit(run_main(main))
