"""The grain pipeline: packing layout, no split documents, mixing, determinism, exact resume."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import tiny_tokenizers as tt
from ease_jax.batch import FIELDS, OBJECTIVES, SPANS
from ease_jax.config import DataConfig, SourceConfig
from ease_jax.data.pipeline import Pipeline
from ease_jax.errors import DataError

SEQ, BATCH = 512, 4
WORDS = "the user asks about safety policy harm help request answer because people risk".split()


def text(rng, lo, hi):
  return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def write_sources(tmp_path, n_reason=60, n_direct=40, scale=1, seed=0):
  """An EASE-like mix: short prompts, long reasoning answers, short direct answers."""
  rng = np.random.default_rng(seed)
  star = [{"question": text(rng, 5, 30), "id": f"s{i}",
           "response": f"<think>{text(rng, 20 * scale, 60 * scale)}</think>{text(rng, 5, 25)}"}
          for i in range(n_reason)]
  direct = [{"prompt": text(rng, 3, 20), "response": text(rng, 3, 30), "id": f"d{i}",
             "target_type": "direct"} for i in range(n_direct)]
  for name, rows in (("star.jsonl", star), ("direct.jsonl", direct)):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return (SourceConfig(adapter="star", path=str(tmp_path / "star.jsonl"), weight=3.0),
          SourceConfig(adapter="prompt_response", path=str(tmp_path / "direct.jsonl")))


@pytest.fixture(scope="module")
def tok():
  return tt.chatml_tokenizer()


@pytest.fixture
def sources(tmp_path):
  return write_sources(tmp_path)


def take(it, n):
  return [next(it) for _ in range(n)]


def check_layout(batch, eot_id):
  """Shapes, padding, positions per document, shifts inside documents, complete documents."""
  assert set(batch) == set(FIELDS)
  for k in FIELDS:
    assert batch[k].shape == (BATCH, SEQ), k
  seg, pos, w = batch["segment_ids"], batch["positions"], batch["loss_weight"]
  assert np.all(w[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
  docs = 0
  for b in range(BATCH):
    ids = [i for i in np.unique(seg[b]) if i > 0]
    assert ids == list(range(1, len(ids) + 1))  # 1..n, no gaps
    for s in ids:
      where = np.flatnonzero(seg[b] == s)
      assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
      assert np.array_equal(pos[b, where], np.arange(len(where)))  # restarts at 0
      # shifted inside the document: the next input token is this target
      assert np.array_equal(batch["targets"][b, where[:-1]], batch["tokens"][b, where[1:]])
      # complete: it ends on its end-of-turn target, which is supervised
      assert batch["targets"][b, where[-1]] == eot_id and w[b, where[-1]] == 1
      assert len(np.unique(batch["objective"][b, where])) == 1
      gate = np.flatnonzero(w[b, where])[0]
      assert batch["span"][b, where[gate]] == SPANS.index("gate")
      docs += 1
  return docs


def test_batches_have_the_packed_layout(tok, sources):
  pipe = Pipeline(DataConfig(train=sources), tok, SEQ, BATCH, seed=0)
  eot = tok.convert_tokens_to_ids("<|im_end|>")
  docs = sum(check_layout(b, eot) for b in take(iter(pipe), 6))
  st = pipe.stats
  assert docs == sum(st.by_objective.values()) == sum(st.by_source.values())
  assert st.packing_efficiency > 0.8 and st.tokens > st.supervised_tokens > 0


def test_eval_pass_covers_every_record_once_and_is_deterministic(tok, sources):
  cfg = DataConfig(eval=sources)
  runs = [list(Pipeline(cfg, tok, SEQ, BATCH, seed=s, split="eval")) for s in (0, 1)]
  assert len(runs[0]) == len(runs[1])
  for a, b in zip(*runs):
    assert all(np.array_equal(a[k], b[k]) for k in FIELDS)
  eot = tok.convert_tokens_to_ids("<|im_end|>")
  assert sum(check_layout(b, eot) for b in runs[0]) == 100  # no document split or lost
  est = Pipeline(cfg, tok, SEQ, BATCH, seed=0, split="eval").num_batches_per_epoch()
  assert abs(est - len(runs[0])) <= max(2, 0.25 * len(runs[0])), (est, len(runs[0]))
  it = iter(Pipeline(cfg, tok, SEQ, BATCH, seed=0, split="eval"))
  assert len(list(it)) == len(runs[0])
  assert next(it, None) is None and next(it, None) is None  # multi-host eval asks again


def test_shards_are_disjoint_and_complete(tok, sources):
  def first_tokens(index):
    pipe = Pipeline(DataConfig(eval=sources), tok, SEQ, BATCH, 0, "eval", index, 2)
    out = []
    for b in pipe:
      for row, seg in zip(b["tokens"], b["segment_ids"]):
        out += [tuple(row[seg == s]) for s in np.unique(seg[seg > 0])]
    return out
  a, b = first_tokens(0), first_tokens(1)
  assert len(a) + len(b) == 100 and not set(a) & set(b)


def test_train_is_seeded_and_mixes_by_weight(tok, sources):
  def run(seed, n=8):
    pipe = Pipeline(DataConfig(train=sources), tok, SEQ, BATCH, seed)
    return take(iter(pipe), n), pipe.stats
  (a, st), (b, _), (c, _) = run(0), run(0), run(1)
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  ratio = st.by_source["star"] / st.by_source["direct"]
  assert 2.0 < ratio < 4.5, st.by_source  # weights 3 : 1
  assert st.by_objective["reasoning"] == st.by_source["star"]


def test_resume_yields_exactly_the_uninterrupted_batches(tok, sources):
  cfg = DataConfig(train=sources)
  it = iter(Pipeline(cfg, tok, SEQ, BATCH, seed=3))
  take(it, 5)
  state = it.get_state()
  expected = take(it, 30)  # crosses into a new packing round (128 bins)
  resumed = iter(Pipeline(cfg, tok, SEQ, BATCH, seed=3))
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 30)):
    for k in FIELDS:
      np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def _prefetching() -> bool:
  return any(t.name.startswith("grain-thread-prefetch") for t in threading.enumerate())


@pytest.mark.parametrize("prefetch", [0, 3, -1])
def test_prefetch_thread_changes_nothing_delivered(tok, sources, prefetch):
  """The background thread (data.prefetch_batches) delivers the batches of the loop's own
  thread, and its get_state() is the state after the last batch delivered, not rendered."""
  plain = iter(Pipeline(DataConfig(train=sources, prefetch_batches=0), tok, SEQ, BATCH, seed=1))
  expected = take(plain, 40)
  pipe = Pipeline(DataConfig(train=sources, prefetch_batches=prefetch), tok, SEQ, BATCH, seed=1)
  assert pipe.prefetch_batches() == {0: 0, 3: 3, -1: 128 // BATCH}[prefetch]
  it = iter(pipe)
  got = take(it, 7)
  state = it.get_state()
  assert _prefetching() == (prefetch != 0)
  it.close()
  assert not _prefetching()  # close() stops the thread
  resumed = iter(Pipeline(DataConfig(train=sources, prefetch_batches=prefetch), tok, SEQ, BATCH,
                          seed=1))
  resumed.set_state(state)
  got += take(resumed, 33)  # crosses into the next packing round
  resumed.close()
  for want, have in zip(expected, got):
    for k in FIELDS:
      np.testing.assert_array_equal(want[k], have[k], err_msg=k)
  assert pipe.stats.batches == 7  # counted when delivered


@pytest.mark.slow
def test_an_iterator_left_open_exits_cleanly(tmp_path):
  """A script that keeps a half-read iterator (its prefetch thread busy) until exit ends with
  status 0 and nothing on stderr: grain's own cleanup fails during interpreter teardown, and a
  thread still running then aborted the process."""
  write_sources(tmp_path)
  script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import tiny_tokenizers as tt
from ease_jax.config import DataConfig, SourceConfig
from ease_jax.data.pipeline import Pipeline
src = SourceConfig(adapter="star", path={str(tmp_path / "star.jsonl")!r})
it = iter(Pipeline(DataConfig(train=(src,), prefetch_batches=2), tt.chatml_tokenizer(), {SEQ},
                   {BATCH}, seed=0))
print(next(it)["tokens"].shape)
"""
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == f"({BATCH}, {SEQ})", proc.stderr
  assert "Exception ignored" not in proc.stderr and "terminate" not in proc.stderr, proc.stderr
  closed = iter(Pipeline(DataConfig(train=write_sources(tmp_path)), tt.chatml_tokenizer(), SEQ,
                         BATCH, seed=0))
  closed.close()
  with pytest.raises(ValueError, match="closed"):
    next(closed)


def test_finite_epochs_end_and_fill_the_last_batch(tok, sources):
  batches = list(Pipeline(DataConfig(train=sources), tok, SEQ, BATCH, seed=0, num_epochs=1))
  assert batches and all(b["tokens"].shape == (BATCH, SEQ) for b in batches)
  docs = sum(len(np.unique(s[s > 0])) for b in batches for s in b["segment_ids"])
  assert docs == 100  # one epoch = as many examples as the sources hold, drawn by weight


def test_overlong_policy(tok, tmp_path):
  sources = write_sources(tmp_path, scale=8)  # many reasoning examples exceed SEQ
  pipe = Pipeline(DataConfig(eval=sources), tok, SEQ, BATCH, 0, "eval")
  list(pipe)
  assert pipe.stats.dropped_overlong > 0
  assert sum(pipe.stats.by_source.values()) + pipe.stats.dropped_overlong == 100
  strict = Pipeline(DataConfig(eval=sources, overlong="error"), tok, SEQ, BATCH, 0, "eval")
  with pytest.raises(DataError, match=r"star.jsonl:\d+: the example is \d+ tokens, longer"):
    list(strict)


def test_bad_records_skip_or_fail(tok, tmp_path, sources):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "response": "b", "target_type": "direct"}\n{"prompt": 1}\n'
                 "not json\n")
  src = (SourceConfig(adapter="prompt_response", path=str(bad)),)
  with pytest.raises(DataError, match="bad.jsonl:2"):
    Pipeline(DataConfig(train=src), tok, SEQ, BATCH, 0)
  pipe = Pipeline(DataConfig(train=src, on_bad_record="skip"), tok, SEQ, BATCH, 0)
  assert pipe.stats.skipped == 2 and "bad.jsonl:3: malformed JSON" in pipe.stats.skip_reasons[1]
  assert next(iter(pipe))["objective"].max() == OBJECTIVES.index("direct")


def test_template_problems_fail_even_when_skipping(tmp_path, sources):
  tok = tt.qwen3_tokenizer(tt.DROPS_THINK_TEMPLATE)
  with pytest.raises(DataError, match="data.chat_template"):
    Pipeline(DataConfig(train=sources, on_bad_record="skip"), tok, SEQ, BATCH, 0)


def test_packing_efficiency_on_an_ease_like_mix(tok, tmp_path):
  sources = write_sources(tmp_path, n_reason=300, n_direct=300, scale=3)
  pipe = Pipeline(DataConfig(train=sources), tok, 1024, BATCH, seed=0)
  take(iter(pipe), 40)
  print(f"packing efficiency at seq_len 1024: {pipe.stats.packing_efficiency:.3f}")
  assert pipe.stats.packing_efficiency > 0.94  # the 95% goal at seq_len 4096: tools/bench/data.py
