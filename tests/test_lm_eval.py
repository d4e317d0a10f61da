"""The lm-eval backend `ease_jax` against lm-eval's own `hf` backend on one exported model.

Offline: the tasks are YAMLs written here over local jsonl files (`dataset_path: json`),
loaded through `include_path`; the model is a tiny random Qwen2 exported with
`ease_jax.hf.save.save_pretrained` over the bundled demo tokenizer.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets / lm_eval are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

import ease_jax.lm_eval as ej_lm_eval
from ease_jax.hf import save as export
from ease_jax.errors import UserError
from ease_jax.hf import load_pretrained
from ease_jax.tokenizer import load_tokenizer
from tests.conftest import REPO
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.slow  # lm-eval and torch: runs with --full

REL = 2e-5  # |ours - hf| <= REL * max(1, |hf|) for every log-likelihood (float32 on both)
MAX_LENGTH = 48  # small, so rolling log-likelihoods take several windows

MC_DOCS = [  # one-token and several-token choices; the one-token ones share a scored row
    {"question": "Is the sky blue?", "choices": [" yes", " no"], "answer": 0},
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22", " four"], "answer": 0},
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a city in Europe"],
     "answer": 0},
    {"question": "Pick a letter:", "choices": [" a", " b", " c", " d"], "answer": 2},
    {"question": "", "choices": ["Hello", "Goodbye there"], "answer": 1},  # empty context
]
GEN_DOCS = [{"prompt": p, "target": t} for p, t in [
    ("User: tell me a story.\nAssistant:", " once"), ("Q: what is 2 + 2?\nA:", " 4"),
    ("Translate to French: cat", " chat"), ("List three colors:", " red"),
    ("Write a haiku about rain", " drops"), ("Say hi.", " hi")]]
PPL_DOCS = [{"text": t} for t in [
    "The quick brown fox jumps over the lazy dog. " * 6, "Short one.",
    "Ünïcödé naïve café — 你好, and some more words to make a few windows of tokens here."]]

YAMLS = {
    "ej_mc": """task: ej_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/mc.jsonl
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
""",
    "ej_gen": """task: ej_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["e", "\\n\\n", "ab"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
""",
    "ej_ppl": """task: ej_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {dir}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}


def write_tasks(directory) -> str:
  """The three test tasks (YAML + jsonl) under `directory`; returns it as include_path."""
  directory.mkdir(parents=True, exist_ok=True)
  for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS), ("ppl", PPL_DOCS)):
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  for task, text in YAMLS.items():
    (directory / f"{task}.yaml").write_text(text.format(dir=directory))
  return str(directory)


def export_tiny_model(directory) -> str:
  """A random 2-layer Qwen2 over the demo tokenizer, exported by ease-jax (float32)."""
  tok = load_tokenizer()
  _, src = make_hf_model("qwen2", out_dir=str(directory / "src"), vocab_size=len(tok),
                         max_position_embeddings=MAX_LENGTH)
  model, cfg = load_pretrained(src)
  return str(export.save_pretrained(model, cfg, directory / "exported", tokenizer=tok,
                                    dtype="float32"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lm_eval")
  return export_tiny_model(root), write_tasks(root / "tasks")


def _run(model, include_path: str, tasks: list[str], **kwargs) -> dict:
  import lm_eval
  from lm_eval.tasks import TaskManager
  return lm_eval.simple_evaluate(model=model, tasks=tasks,
                                 task_manager=TaskManager(include_path=include_path),
                                 log_samples=True, bootstrap_iters=0, **kwargs)


@pytest.fixture(scope="module")
def lms(setup):
  """lm-eval's hf backend and ease_jax on the exported model, each built once (and so
  compiled once) for the whole module."""
  from lm_eval.api.registry import get_model
  model_dir, _ = setup
  hf = get_model("hf")(pretrained=model_dir, dtype="float32", device="cpu", batch_size=4)
  return hf, get_model("ease_jax")(pretrained=model_dir, batch_size=4)


@pytest.fixture(scope="module")
def both(setup, lms):
  """The three tasks through the hf backend and through ease_jax."""
  _, include = setup
  tasks = ["ej_mc", "ej_gen", "ej_ppl"]
  return tuple(_run(lm, include, tasks) for lm in lms)


def _samples(results: dict, task: str) -> list:
  return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_loglikelihoods_match_the_hf_backend(both):
  hf, ours = both
  a, b = _samples(hf, "ej_mc"), _samples(ours, "ej_mc")
  assert len(a) == len(MC_DOCS) and [len(x) for x in a] == [len(d["choices"]) for d in MC_DOCS]
  for doc_a, doc_b in zip(a, b):
    for [(ll_a, greedy_a)], [(ll_b, greedy_b)] in zip(doc_a, doc_b):
      assert abs(ll_b - ll_a) <= REL * max(1.0, abs(ll_a)), (ll_a, ll_b)
      assert greedy_a == greedy_b
  assert hf["results"]["ej_mc"]["acc,none"] == ours["results"]["ej_mc"]["acc,none"]
  assert hf["results"]["ej_mc"]["acc_norm,none"] == ours["results"]["ej_mc"]["acc_norm,none"]


def test_rolling_loglikelihoods_match_the_hf_backend(both, setup):
  hf, ours = both
  a, b = _samples(hf, "ej_ppl"), _samples(ours, "ej_ppl")
  a, b = (np.asarray(x, np.float64).ravel() for x in (a, b))  # one log-likelihood per doc
  assert a.shape == b.shape == (len(PPL_DOCS),)
  np.testing.assert_array_less(np.abs(b - a), REL * np.maximum(1.0, np.abs(a)))
  tok = load_tokenizer()
  assert len(tok(PPL_DOCS[0]["text"])["input_ids"]) > 2 * MAX_LENGTH  # several windows
  for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
    assert ours["results"]["ej_ppl"][metric] == pytest.approx(hf["results"]["ej_ppl"][metric],
                                                              rel=1e-4)


def test_greedy_generations_are_identical_and_cut_at_stop_strings(both):
  hf, ours = both
  a, b = _samples(hf, "ej_gen"), _samples(ours, "ej_gen")
  assert a == b
  texts = [x[0][0] for x in b]
  assert not any(stop in t for t in texts for stop in ("e", "\n\n", "ab"))
  assert hf["results"]["ej_gen"]["exact_match,none"] == ours["results"]["ej_gen"][
      "exact_match,none"]


def test_stop_strings_really_cut_the_generations(lms):
  """Without `until` the same prompts run on (so the stop strings above did cut them)."""
  from lm_eval.api.instance import Instance
  lm = lms[1]
  reqs = [Instance("generate_until", {}, (d["prompt"], {"until": [], "max_gen_toks": 12}), i)
          for i, d in enumerate(GEN_DOCS)]
  free = lm.generate_until(reqs, disable_tqdm=True)
  assert sum("e" in t or "ab" in t for t in free) >= 2, free


def test_chat_template_is_applied_as_the_hf_backend_does(setup, lms):
  _, include = setup
  kwargs = dict(apply_chat_template=True, system_instruction="Be brief.", limit=3)
  hf, ours = (_run(lm, include, ["ej_gen"], **kwargs) for lm in lms)
  prompts = [s["arguments"][0][0] for s in ours["samples"]["ej_gen"]]  # (context, gen_kwargs)
  assert all(p.startswith("<|im_start|>system\nBe brief.<|im_end|>") for p in prompts), prompts
  assert [s["arguments"] for s in ours["samples"]["ej_gen"]] == [
      s["arguments"] for s in hf["samples"]["ej_gen"]]
  assert _samples(ours, "ej_gen") == _samples(hf, "ej_gen")


def test_bad_model_args_are_user_errors(setup):
  model_dir, _ = setup
  with pytest.raises(UserError, match="unknown argument"):
    ej_lm_eval.EaseJaxLM(pretrained=model_dir, temprature=1)
  with pytest.raises(UserError, match="dtype='float64'"):
    ej_lm_eval.EaseJaxLM(pretrained=model_dir, dtype="float64")
  with pytest.raises(UserError, match="batch_size=auto"):
    ej_lm_eval.EaseJaxLM(pretrained=model_dir, batch_size="auto")


@pytest.mark.slow
def test_command_line_runs_a_local_task(setup):
  model_dir, include = setup
  env = dict(os.environ, PYTHONPATH=str(REPO), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
  cmd = [sys.executable, "-m", "ease_jax.lm_eval", "--model", "ease_jax", "--model_args",
         f"pretrained={model_dir},dtype=float32,batch_size=2", "--tasks", "ej_mc",
         "--include_path", include, "--limit", "3"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ej_mc" in proc.stdout and "acc" in proc.stdout
  bad = subprocess.run(cmd[:6] + [f"pretrained={model_dir},dtype=float64"] + cmd[7:],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
  assert bad.returncode == 2 and "error: dtype='float64'" in bad.stderr, bad.stderr[-2000:]
  assert "Traceback" not in bad.stderr


def _mc_requests() -> list:
  from lm_eval.api.instance import Instance
  return [Instance("loglikelihood", {}, (d["question"], " " + c.strip()), i)
          for i, d in enumerate(MC_DOCS) for c in d["choices"]]


def test_a_training_run_at_a_step_scores_as_its_export(setup, lms, tmp_path):
  from typing import Any, NamedTuple

  import jax.numpy as jnp
  from flax import nnx

  from ease_jax.train import checkpoint
  from ease_jax.config import CheckpointConfig

  class State(NamedTuple):
    params: Any
    step: Any

  class NoData:
    def get_state(self):
      return {}

    def set_state(self, state):
      pass

  model_dir, _ = setup
  model, cfg = load_pretrained(model_dir)
  ckpt = checkpoint.Checkpointer(tmp_path, CheckpointConfig(every=1, keep=1, async_save=False))
  ckpt.save(7, State(nnx.state(model, nnx.Param), jnp.int32(7)), NoData(), cfg)
  ckpt.close()
  load_tokenizer().save_pretrained(str(tmp_path / "tokenizer"))
  # The export's tokenizer: transformers 5 loads it as Qwen2Tokenizer (config.json's model
  # type), whose own pre-tokenizer splits digits unlike the run's saved tokenizer.json.
  run = ej_lm_eval.EaseJaxLM.create_from_arg_string(
      f"pretrained={tmp_path}@7,batch_size=2,tokenizer={model_dir}",
      {"batch_size": 1, "device": None})
  assert run.batch_size == 2  # model_args win over the command line's default
  want = lms[1].loglikelihood(_mc_requests(), disable_tqdm=True)
  for (a, greedy_a), (b, greedy_b) in zip(want, run.loglikelihood(_mc_requests(), True)):
    assert abs(a - b) <= REL * max(1.0, abs(a)) and greedy_a == greedy_b  # other batch shapes


@pytest.mark.slow
def test_data_parallel_and_sharded_meshes_give_the_same_results(setup, lms, fake_devices):
  """Two fake CPU devices: batch rows split over them, then parameters sharded (fsdp)."""
  from lm_eval.api.instance import Instance
  model_dir, _ = setup
  mc = [r.args for r in _mc_requests()]
  gen = [(d["prompt"], {"until": ["ab"], "max_gen_toks": 8}) for d in GEN_DOCS]
  out = fake_devices(f"""
    import json
    from lm_eval.api.instance import Instance
    import ease_jax.lm_eval as L
    mc = [Instance("loglikelihood", {{}}, tuple(a), i) for i, a in enumerate({mc!r})]
    gen = [Instance("generate_until", {{}}, tuple(a), i) for i, a in enumerate({gen!r})]
    res = {{}}
    for name, args in (("data", {{}}), ("fsdp", {{"data": 1, "fsdp": 2}})):
      lm = L.EaseJaxLM(pretrained={model_dir!r}, batch_size=4, **args)
      res[name] = [lm.loglikelihood(mc, True), lm.generate_until(gen, True), lm.mesh.size]
    print(json.dumps(res))
  """, n=2, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
  res = json.loads(out.strip().splitlines()[-1])
  one_ll = lms[1].loglikelihood(_mc_requests(), disable_tqdm=True)
  one_gen = lms[1].generate_until(
      [Instance("generate_until", {}, a, i) for i, a in enumerate(gen)], disable_tqdm=True)
  for name in ("data", "fsdp"):
    lls, texts, devices = res[name]
    assert devices == 2 and texts == one_gen, name
    for (a, greedy_a), (b, greedy_b) in zip(one_ll, lls):
      assert abs(a - b) <= REL * max(1.0, abs(a)) and greedy_a == greedy_b, name
