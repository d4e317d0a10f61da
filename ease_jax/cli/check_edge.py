#!/usr/bin/env python
"""Greedy generation in llama.cpp (llama-cpp-python) vs tools/generate.py: same token ids?

  ease-check-edge --export FILE.gguf|HF_EXPORT_DIR --prompts FILE.jsonl
      [--model RUN_DIR|HF_DIR|FILE.gguf] [--converter convert_hf_to_gguf.py] [--type F32]
      [--max_new_tokens 64] [--limit 0] [--out results.json] [--no_reference]

--export is what runs in llama.cpp: a .gguf file, or an HF export directory converted first
(with llama.cpp's own --converter script when given, else with ease-jax's GGUF writer,
tools/export_gguf.py). --model is the reference tools/generate.py runs (default: the export
itself, read by ease-jax). Prompts (JSONL rows with `prompt` or `messages`) are rendered with
the reference's chat template; both sides get the same prompt ids and decode greedily with a
float32 KV cache until an end-of-generation token or --max_new_tokens. Also reported: whether
llama.cpp tokenizes each rendered prompt to the same ids, and whether every stop id of the
reference is end-of-generation in llama.cpp. Exit status 1 when any prompt differs.
--no_reference runs llama.cpp alone (no tools/generate.py, logits of the last position only,
as an application runs it) and reports the edge cost per prompt class: mean new tokens, mean
think tokens (between `<think>` and `</think>`), seconds per prompt and tokens/s.
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


from ease_jax.errors import DataError, UserError
from ease_jax.generation import generate as G

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
  p.add_argument("--no_reference", action="store_true",
                 help="llama.cpp alone: time and token counts per prompt class, no comparison")
  return p.parse_args(argv)


def read_prompts(path: str, limit: int) -> list[list[dict]]:
  """Conversations (up to the assistant turn) from JSONL rows with `prompt` or `messages`."""
  return [c for c, _ in read_labelled_prompts(path, limit)]


def read_labelled_prompts(path: str, limit: int) -> list[tuple[list[dict], str]]:
  """(conversation, the row's `class` or "all") per JSONL row with `prompt` or `messages`."""
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
    label = str(row.get("class") or "all") if isinstance(row, dict) else "all"
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
      out.append(([{"role": "user", "content": row["prompt"]}], label))
    elif isinstance(row, dict) and isinstance(row.get("messages"), list):
      out.append(([m for m in row["messages"] if m.get("role") != "assistant"], label))
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


def last_logits(llm) -> np.ndarray:
  """The logits of the last evaluated position (llama-cpp-python keeps `scores` only with
  logits_all; otherwise the context holds the last position's row)."""
  if llm._logits_all:
    return llm.scores[llm.n_tokens - 1]
  return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm._n_vocab,))


def llama_greedy(llm, prompt: list[int], max_new: int) -> tuple[list[int], float]:
  """Greedy ids (the end-of-generation token included when one ends it) and seconds."""
  vocab = llm._model.vocab
  start = time.perf_counter()
  llm.reset()
  llm.eval(prompt)
  ids: list[int] = []
  for _ in range(max_new):
    token = int(np.argmax(last_logits(llm)))
    ids.append(token)
    if llama_cpp.llama_vocab_is_eog(vocab, token):
      break
    llm.eval([token])
  return ids, time.perf_counter() - start


def open_llama(gguf_path: Path, n_ctx: int, threads: int, logits_all: bool = True):
  """llama.cpp on the file, float32 KV cache (as the float32 reference keeps it)."""
  return llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads,
                         logits_all=logits_all, type_k=llama_cpp.GGML_TYPE_F32,
                         type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False, verbose=False)


def think_tokens(ids: list[int], tokenizer) -> int:
  """Tokens strictly inside the first `<think>`...`</think>` (to the end when unclosed)."""
  vocab = tokenizer.get_vocab()
  start, end = vocab.get("<think>"), vocab.get("</think>")
  if start is None or start not in ids:
    return 0
  first = ids.index(start) + 1
  last = ids.index(end, first) if end in ids[first:] else len(ids)
  return last - first


def edge_cost(args: argparse.Namespace, gguf_path: Path) -> list[dict]:
  """llama.cpp alone on every prompt of --prompts (rendered with the reference's template)."""
  model, cfg, tokenizer = G.load_generation_model(args.model or str(gguf_path))
  labelled = read_labelled_prompts(args.prompts, args.limit)
  render = G.Generator(model, cfg, tokenizer, batch_size=1).render  # as compare() renders
  prompts = [(c[-1]["content"], label, render(c)) for c, label in labelled]
  del model, render
  return edge_cost_ids(gguf_path, prompts, tokenizer, args.max_new_tokens, args.threads)


def edge_cost_ids(gguf_path: Path, prompts: list[tuple[str, str, list[int]]], tokenizer,
                  max_new: int, threads: int = 2) -> list[dict]:
  """(text, class, ids) prompts in llama.cpp (last-position logits only, as an application
  runs it): new and think tokens and seconds (prompt + decode) per prompt."""
  llm = open_llama(gguf_path, max(len(p) for _, _, p in prompts) + max_new + 8, threads,
                   logits_all=False)
  results = []
  for text, label, prompt in prompts:
    ids, seconds = llama_greedy(llm, prompt, max_new)
    results.append({"prompt": text[:80], "class": label, "prompt_tokens": len(prompt),
                    "new_tokens": len(ids), "think_tokens": think_tokens(ids, tokenizer),
                    "seconds": round(seconds, 4),
                    "text": tokenizer.decode(ids, skip_special_tokens=False)[:300]})
  return results


def summarize_cost(results: list[dict]) -> dict[str, dict[str, float]]:
  """Per class (and `all`): prompts, mean new/think tokens, seconds per prompt, tokens/s."""
  groups: dict[str, list[dict]] = {}
  for r in results:
    groups.setdefault(r["class"], []).append(r)
  groups["all"] = results
  out = {}
  for label, rows in groups.items():
    new, secs = sum(r["new_tokens"] for r in rows), sum(r["seconds"] for r in rows)
    out[label] = {"prompts": len(rows), "mean_new_tokens": new / len(rows),
                  "mean_think_tokens": sum(r["think_tokens"] for r in rows) / len(rows),
                  "seconds_per_prompt": secs / len(rows), "tokens_per_s": new / secs if secs else 0.0}
  return out


def reference(model_spec: str, prompts_path: str, limit: int, max_new: int) -> dict:
  """tools/generate.py's greedy run (batch 1) on the prompts: what llama.cpp must reproduce."""
  model, cfg, tokenizer = G.load_generation_model(model_spec)
  gen = G.Generator(model, cfg, tokenizer, batch_size=1)
  conversations = read_prompts(prompts_path, limit)
  prompts = [gen.render(c) for c in conversations]
  ours = gen.generate(prompts, G.SamplingConfig(max_new_tokens=max_new))
  return {"conversations": conversations, "prompts": prompts, "generations": ours,
          "stop_ids": gen.stop_ids, "tokenizer": tokenizer, "max_new_tokens": max_new,
          "model": model}


def margins(model, llm, prompt: list[int], ours: list[int], theirs: list[int],
            first: int) -> dict:
  """At the first differing new token: how far apart the two choices are in each runtime's
  logits (ours: the reference's top token minus llama.cpp's pick; theirs: the reverse). Small
  margins on both sides mean a near-tie that numeric noise can flip, not a wrong model."""
  import jax.numpy as jnp
  if first >= min(len(ours), len(theirs)):
    return {}
  row = np.asarray(model(jnp.asarray([prompt + ours[:first]], jnp.int32))[0, -1])
  llama_row = np.asarray(llm.scores[len(prompt) + first - 1])
  a, b = ours[first], theirs[first]
  return {"reference_margin": float(row[a] - row[b]), "llama_cpp_margin": float(llama_row[b] - llama_row[a])}


def compare_with(gguf_path: Path, ref: dict, threads: int = 2) -> list[dict]:
  """Per prompt: llama.cpp's greedy ids vs the reference's, and llama.cpp's own tokenization
  of the rendered prompt."""
  prompts, tokenizer, max_new = ref["prompts"], ref["tokenizer"], ref["max_new_tokens"]
  llm = open_llama(gguf_path, max(len(p) for p in prompts) + max_new + 8, threads)
  not_eog = [i for i in ref["stop_ids"] if not llama_cpp.llama_vocab_is_eog(llm._model.vocab, i)]
  results = []
  for conv, prompt, g in zip(ref["conversations"], prompts, ref["generations"]):
    text = tokenizer.decode(prompt, skip_special_tokens=False)
    llama_prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    ids, seconds = llama_greedy(llm, prompt, max_new)
    want = g.ids + ([g.stop_id] if g.stopped else [])
    first = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), None)
    if first is None and len(ids) != len(want):
      first = min(len(ids), len(want))
    results.append({"prompt": conv[-1]["content"][:80], "prompt_tokens": len(prompt),
                    "same_prompt_tokenization": list(llama_prompt) == list(prompt),
                    "same_tokens": first is None, "first_difference": first,
                    "new_tokens": len(ids), "stopped": bool(ids) and
                    bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, ids[-1])),
                    "llama_cpp_seconds": round(seconds, 3), "llama_cpp_ids": ids,
                    "reference_ids": want, "text": g.text[:200], "stop_ids_not_eog": not_eog,
                    **({} if first is None else margins(ref["model"], llm, prompt, want, ids, first))})
  return results


def compare(args: argparse.Namespace, gguf_path: Path) -> list[dict]:
  """Per prompt: both sides' ids, agreement, llama.cpp's own tokenization of the prompt."""
  ref = reference(args.model or str(gguf_path), args.prompts, args.limit, args.max_new_tokens)
  return compare_with(gguf_path, ref, args.threads)


def report_cost(results: list[dict], args: argparse.Namespace) -> int:
  """Prints (and writes with --out) the edge cost per prompt class; exit status 0."""
  summary = summarize_cost(results)
  print("| class | prompts | mean new tokens | mean think tokens | s / prompt | tokens/s |")
  print("|---|---|---|---|---|---|")
  for label, s in summary.items():
    print(f"| {label} | {s['prompts']} | {s['mean_new_tokens']:.1f} | {s['mean_think_tokens']:.1f} "
          f"| {s['seconds_per_prompt']:.2f} | {s['tokens_per_s']:.1f} |")
  if args.out:
    Path(args.out).write_text(json.dumps({"summary": summary, "prompts": results}, indent=1))
  return 0


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if llama_cpp is None:
    raise UserError("llama-cpp-python is not installed (the `edge` extra: pip install "
                    "'ease-jax[edge]', a ~20 minute build from source on 2 cores)")
  with tempfile.TemporaryDirectory(prefix="check_edge-") as tmp:
    gguf_path = to_gguf(Path(args.export), args, Path(tmp))
    if args.no_reference:
      return report_cost(edge_cost(args, gguf_path), args)
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
