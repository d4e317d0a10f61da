"""Export destinations: --overwrite replaces only a previous export; bad --out is one line, exit 2;
killed exports' partial directories are cleaned; exports follow the user's umask."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ease_jax.hf import save as export, export_dir
from ease_jax.errors import UserError, run_main
from ease_jax.hf import load_pretrained
from tests.conftest import REPO
from tests.hf_models import make_hf_model

_spec = importlib.util.spec_from_file_location("export_hf", REPO / "tools" / "export_hf.py")
export_hf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_hf)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished two-step demo run (checkpoints, metrics, tokenizer) inside a parent dir."""
  parent = tmp_path_factory.mktemp("runs")
  run_dir = parent / "R"
  cmd = [sys.executable, "launch/train.py", "--config", "configs/demo.yaml", f"run_dir={run_dir}",
         "train.steps=2", "checkpoint.every=1", "train.seq_len=128", "train.eval_every=0",
         "data.eval=[]", "checkpoint.async_save=false",
         "data.max_dropped_fraction=1"]  # seq_len 128 drops most reasoning rows, on purpose
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
  return run_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  _, src = make_hf_model("qwen2", out_dir=str(tmp_path_factory.mktemp("src")))
  return load_pretrained(src)


def _snapshot(root) -> dict:
  """Every path under `root` with its size and mtime: what 'nothing touched' compares."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
      p = os.path.join(dirpath, name)
      st = os.lstat(p)
      out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
  return out


def _export(*args, cwd=REPO, subprocess_run=False):
  """tools/export_hf.py ARGS from `cwd`: in this process (as run_main runs it), or a subprocess."""
  if subprocess_run:
    return subprocess.run([sys.executable, str(REPO / "tools/export_hf.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
  os.chdir(cwd)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = run_main(lambda: export_hf.main([str(a) for a in args]))
  finally:
    os.chdir(old)
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _refused(proc, *words):
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for w in words:
    assert w in lines[0], lines[0]


@pytest.mark.slow
def test_overwrite_never_deletes_the_run_its_parent_or_the_cwd(run, tmp_path):
  before = _snapshot(run.parent)
  _refused(_export("--checkpoint", run, "--out", run, "--overwrite", subprocess_run=True),
           "is or contains", "which the export reads")
  _refused(_export("--checkpoint", run, "--out", run.parent, "--overwrite"),
           "which the export reads")
  _refused(_export("--checkpoint", run, "--out", ".", "--overwrite", cwd=run), "current directory")
  _refused(_export("--checkpoint", run, "--out", "..", "--overwrite", cwd=run / "tokenizer"),
           "current directory or one of its ancestors")
  other = tmp_path / "notes"  # a directory of the user's that is not an export
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  _refused(_export("--checkpoint", run, "--out", other, "--overwrite"), "not a previous export")
  assert (other / "notes.txt").read_text() == "keep me"
  assert _snapshot(run.parent) == before


@pytest.mark.slow
def test_overwrite_replaces_a_previous_export_only_while_it_holds_nothing_else(run, tmp_path):
  out = tmp_path / "E"
  assert _export("--checkpoint", run, "--out", out).returncode == 0
  marker = json.loads((out / export_dir.MARKER).read_text())
  assert marker["complete"] and "model.safetensors" in marker["files"]
  assert set(marker["files"]) | {export_dir.MARKER} == {p.name for p in out.iterdir()}
  _refused(_export("--checkpoint", run, "--out", out), "already exists", "--overwrite")
  proc = _export("--checkpoint", f"{run}@1", "--out", out, "--overwrite",  # RUN_DIR@STEP form
                 subprocess_run=True)
  assert proc.returncode == 0 and "exported step 1" in proc.stdout, proc.stdout + proc.stderr
  (out / "README.md").write_text("my notes")
  before = _snapshot(out)
  _refused(_export("--checkpoint", run, "--out", out, "--overwrite"), "README.md",
           "did not write")
  assert _snapshot(out) == before


@pytest.mark.slow
def test_step_given_twice_must_agree(run, tmp_path):
  _refused(_export("--checkpoint", f"{run}@1", "--step", "2", "--out", tmp_path / "x"),
           "names step 1 but --step is 2")
  assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_out_that_is_a_file_or_under_a_file(run, tmp_path):
  f = tmp_path / "model.bin"
  f.write_bytes(b"data")
  _refused(_export("--checkpoint", run, "--out", f, "--overwrite"), "is an existing file")
  _refused(_export("--checkpoint", run, "--out", f / "sub"), "is a file, not a directory")
  assert f.read_bytes() == b"data"


@contextlib.contextmanager
def _read_only(directory):
  """`directory` made unwritable, for root too (immutable attribute) where chmod is not enough."""
  if os.geteuid() != 0:
    directory.chmod(0o555)
    try:
      yield
    finally:
      directory.chmod(0o755)
    return
  if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode:
    pytest.skip("running as root without chattr +i: no way to make a directory read-only")
  try:
    yield
  finally:
    subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.slow
def test_read_only_destination_is_one_line(run, tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  with _read_only(ro):
    _refused(_export("--checkpoint", run, "--out", ro / "E"), "not writable", str(ro))
  assert list(ro.iterdir()) == []


def test_demo_overwrites_its_export_inside_the_run_dir(tiny, tmp_path):
  model, cfg = tiny
  run_dir = tmp_path / "run"
  (run_dir / "checkpoints").mkdir(parents=True)
  for _ in range(2):  # what ease_jax/demo/run.py does on every demo run
    export.save_pretrained(model, cfg, run_dir / "export", dtype="float32", overwrite=True)
  assert (run_dir / "export" / "model.safetensors").is_file()
  assert (run_dir / "checkpoints").is_dir()


def test_export_mode_follows_umask(tiny, tmp_path):
  model, cfg = tiny
  old = os.umask(0o027)
  try:
    out = export.save_pretrained(model, cfg, tmp_path / "E", dtype="float32")
  finally:
    os.umask(old)
  assert out.stat().st_mode & 0o777 == 0o750
  assert (out / "config.json").stat().st_mode & 0o777 == 0o640


KILLED_EXPORT = """
import os, sys
from pathlib import Path
from ease_jax.hf import export_dir
tmp = export_dir.make_partial(Path(sys.argv[1]))
(tmp / "model.safetensors").write_bytes(b"x" * 1000)
os.kill(os.getpid(), 9)
"""


@pytest.mark.slow
def test_partials_of_killed_exports_are_cleaned_by_the_next_export(tiny, tmp_path):
  model, cfg = tiny
  out = tmp_path / "E"
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_EXPORT), str(out)],
                        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
  assert proc.returncode == -9
  stale = list(tmp_path.glob(".E.partial-*"))
  assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file()
  running = export_dir.make_partial(out)  # this process is alive: its partial stays
  (tmp_path / ".E.partial-empty").mkdir()  # killed before its marker was written
  foreign = tmp_path / ".E.partial-foreign"  # not ours: no marker, not empty
  foreign.mkdir()
  (foreign / "x").write_text("x")
  export.save_pretrained(model, cfg, out, dtype="float32")
  left = sorted(p.name for p in tmp_path.iterdir())
  assert left == sorted(["E", running.name, foreign.name])


def test_disk_full_during_export_is_a_user_error_and_leaves_nothing(tiny, tmp_path, monkeypatch):
  model, cfg = tiny

  def full(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(export, "write_weights", full)
  with pytest.raises(UserError, match="cannot write the export to .*No space left on device"):
    export.save_pretrained(model, cfg, tmp_path / "E", dtype="float32")
  assert list(tmp_path.iterdir()) == []


def test_fresh_export_inside_nothing_it_reads(tiny, tmp_path):
  model, cfg = tiny
  with pytest.raises(UserError, match="refuses to replace .*: it is or contains .*which the "
                                      "export reads"):
    export.save_pretrained(model, cfg, tmp_path, dtype="float32", overwrite=True,
                           protect=(tmp_path / "run",))
