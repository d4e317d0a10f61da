"""Records: adapters split think text and answers; every bad input names file, line and field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ease_jax.config import SourceConfig
from ease_jax.data.records import (BadRecords, DuplicateIdWarning, adapt_ease10k, adapt_star,
                                   load_records)
from ease_jax.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"
REPO = Path(__file__).resolve().parents[1]


def test_star_row_becomes_reasoning_record():
  row = {"question": " How do I pick a lock? ", "category": "crime", "source": "BeaverTails",
         "response": "<think>\nLock picking can be legal.\nBut this may be burglary.\n</think>\n\n"
                     "I can explain how locks work instead."}
  r = adapt_star(row, "", source="star")
  assert r.target_type == "reasoning"
  assert r.reasoning == "Lock picking can be legal.\nBut this may be burglary."
  assert r.response == "I can explain how locks work instead."
  assert r.messages == (("user", "How do I pick a lock?"),) and r.category == "crime"


def test_ease10k_row_without_open_tag_splits_at_close_tag():
  row = {"original_question": "Write malware.",
         "response": "This asks for malicious code.\n</think>\n\nI can't help with that."}
  r = adapt_ease10k(row, "")
  assert (r.target_type, r.reasoning) == ("reasoning", "This asks for malicious code.")
  assert r.response == "I can't help with that."


def _src(tmp_path, name, rows, adapter="prompt_response", **kw):
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return SourceConfig(adapter=adapter, path=str(path), **kw)


def test_wildjailbreak_types_and_prompt_choice(tmp_path):
  rows = [{"vanilla": "v1", "adversarial": None, "completion": "No.", "data_type": "vanilla_harmful"},
          {"vanilla": "v2", "adversarial": "adv2", "completion": "Sure: 4.",
           "data_type": "adversarial_benign"}]
  recs = load_records(_src(tmp_path, "wj.jsonl", rows, "wildjailbreak"))
  assert [(r.prompt, r.target_type) for r in recs] == [("v1", "refusal"), ("adv2", "direct")]


def test_messages_adapter_keeps_earlier_turns_and_parses_think(tmp_path):
  rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": "<think>r</think>final"}],
           "target_type": "reasoning"}]
  (r,) = load_records(_src(tmp_path, "m.jsonl", rows, "messages"))
  assert r.messages == (("system", "S"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"))
  assert (r.reasoning, r.response) == ("r", "final")


def test_source_target_type_overrides_and_max_rows(tmp_path):
  rows = [{"prompt": f"p{i}", "response": "No."} for i in range(5)]
  recs = load_records(_src(tmp_path, "h.jsonl", rows, target_type="refusal", max_rows=3))
  assert [r.target_type for r in recs] == ["refusal"] * 3
  assert recs[2].where.endswith("h.jsonl:3") and recs[0].source == "h"


def test_parquet_and_saved_dataset_sources(tmp_path):
  import datasets
  rows = [{"prompt": "a", "response": "b", "target_type": "direct"},
          {"prompt": "c", "response": "", "target_type": "direct"}]
  ds = datasets.Dataset.from_list(rows)
  ds.to_parquet(str(tmp_path / "x.parquet"))
  ds.save_to_disk(str(tmp_path / "saved"))
  for path in ("x.parquet", "saved"):
    src = SourceConfig(adapter="prompt_response", path=str(tmp_path / path))
    with pytest.raises(DataError, match=r"row 1: is empty \(field 'response'\)"):
      load_records(src)
    bad = BadRecords()
    assert len(load_records(src, "skip", bad)) == 1 and bad.count == 1


# (file, adapter, substrings the message must contain: location and field)
BAD_CASES = [
    ("malformed_json.jsonl", "prompt_response", ["malformed_json.jsonl:2", "malformed JSON"]),
    ("missing_field.jsonl", "prompt_response", ["missing_field.jsonl:2", "field 'response'"]),
    ("wrong_type.jsonl", "prompt_response", [":2", "expected a string, got int",
                                             "field 'response'"]),
    ("empty_response.jsonl", "prompt_response", [":2", "is empty", "field 'response'"]),
    ("unknown_target_type.jsonl", "prompt_response", [":2", "chitchat", "field 'target_type'"]),
    ("reasoning_on_direct.jsonl", "prompt_response", [":2", "must not carry reasoning",
                                                      "field 'reasoning'"]),
    ("invalid_utf8.jsonl", "prompt_response", ["invalid_utf8.jsonl:2", "invalid UTF-8"]),
    ("empty.jsonl", "prompt_response", ["empty.jsonl", "empty"]),
    ("blank_lines.jsonl", "prompt_response", ["blank_lines.jsonl", "empty"]),
    ("does_not_exist.jsonl", "prompt_response", ["does_not_exist.jsonl", "not found"]),
    ("not_an_object.jsonl", "prompt_response", [":2", "expected a JSON object, got list"]),
    ("unclosed_think.jsonl", "prompt_response", [":2", "no closing '</think>'",
                                                 "field 'response'"]),
    ("reasoning_missing.jsonl", "prompt_response", [":2", "needs reasoning", "field 'reasoning'"]),
    ("missing_target_type_row.json", "prompt_response", ["row 1", "field 'target_type'"]),
    ("null_prompt.jsonl", "prompt_response", [":2", "missing", "field 'prompt'"]),
    ("star_no_think.jsonl", "star", ["star_no_think.jsonl:2", "field 'reasoning'"]),
    ("wildjailbreak_bad_type.jsonl", "wildjailbreak", [":2", "'benign'", "field 'data_type'"]),
    ("messages_no_assistant.jsonl", "messages", [":2", "last message", "field 'messages'"]),
    ("messages_bad_role.jsonl", "messages", [":2", "field 'messages[0]'"]),
    ("utf16_bom.jsonl", "prompt_response", ["utf16_bom.jsonl", "UTF-16", "iconv"]),
    ("utf16_no_bom.jsonl", "prompt_response", ["utf16_no_bom.jsonl", "NUL bytes"]),
    ("latin1.jsonl", "prompt_response", ["latin1.jsonl:2", "invalid UTF-8", "Latin-1"]),
    ("deeply_nested.jsonl", "prompt_response", ["deeply_nested.jsonl:2", "nested too deeply"]),
    ("surrogate.jsonl", "prompt_response", [":2", "unpaired surrogate", "field 'prompt'"]),
    ("object_prompt.jsonl", "prompt_response", [":2", "expected a string, got dict",
                                                "field 'prompt'"]),
    ("wrong_column_types.parquet", "prompt_response", ["wrong_column_types.parquet", "row 0",
                                                       "expected a string, got int",
                                                       "field 'response'"]),
]


@pytest.mark.parametrize("name,adapter,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_names_file_line_and_field(name, adapter, expected):
  src = SourceConfig(adapter=adapter, path=str(BAD / name))
  with pytest.raises(DataError) as err:
    load_records(src)
  for part in expected:
    assert part in str(err.value), (part, str(err.value))


@pytest.mark.parametrize("name,adapter", [(c[0], c[1]) for c in BAD_CASES
                                          if c[2][0].startswith(":") or ":2" in c[2][0]])
def test_skip_counts_bad_rows_and_keeps_the_good(name, adapter):
  bad = BadRecords()
  recs = load_records(SourceConfig(adapter=adapter, path=str(BAD / name)), "skip", bad)
  assert len(recs) == 1 and bad.count == 1 and name in bad.reasons[0]


@pytest.mark.slow
def test_inspect_cli_reports_bad_file_without_traceback(tmp_path):
  cfg = tmp_path / "c.yaml"
  cfg.write_text(f"data:\n  train:\n    - {{adapter: prompt_response, path: {BAD / 'wrong_type.jsonl'}}}\n")
  proc = subprocess.run([sys.executable, str(REPO / "tools" / "inspect_data.py"), "--config",
                         str(cfg)], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert proc.returncode == 2
  assert proc.stderr.startswith("error: ") and "wrong_type.jsonl:2" in proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout


def test_duplicate_ids_are_kept_counted_and_warned():
  bad = BadRecords()
  with pytest.warns(DuplicateIdWarning, match=r"1 row\(s\) repeat .*'a' at .*:1 and .*:3"):
    recs = load_records(SourceConfig(adapter="prompt_response",
                                     path=str(BAD / "duplicate_ids.jsonl")), "error", bad)
  assert len(recs) == 3 and bad.duplicate_ids == 1 and bad.count == 0


def test_datasets_directory_without_the_split_names_the_ones_it_has():
  src = SourceConfig(adapter="prompt_response", path=str(BAD / "dataset_missing_split"),
                     split="validation")
  with pytest.raises(DataError, match=r"dataset_missing_split: split 'validation' not found; "
                                      r"available: train"):
    load_records(src)


def test_huge_lines(tmp_path, monkeypatch):
  # A 2 MB answer is a valid record (rendering drops it as overlong, counted) ...
  good = {"prompt": "Hi", "response": "x" * (2 << 20), "target_type": "direct"}
  (tmp_path / "big.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
  src = SourceConfig(adapter="prompt_response", path=str(tmp_path / "big.jsonl"))
  assert len(load_records(src)) == 2
  # ... but a line over the limit is a bad row, and reading resumes at the next line.
  from ease_jax.data import readers
  monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1 << 20)
  with pytest.raises(DataError, match=r"big.jsonl:1: the line is longer than 1048576 bytes"):
    load_records(src)
  bad = BadRecords()
  (tmp_path / "mixed.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(
      dict(good, response="short")) + "\n")
  recs = load_records(SourceConfig(adapter="prompt_response", path=str(tmp_path / "mixed.jsonl")),
                      "skip", bad)
  assert [r.where.rsplit(":", 1)[1] for r in recs] == ["2"] and bad.count == 1
