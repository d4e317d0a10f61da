"""The `ease_jax` logger prints what users read: bare info lines on stdout, `warning: ...` on
stderr, into whatever the streams are at the time (captured, redirected)."""

import logging

from ease_jax.console import ConsoleHandler, get_logger


def test_info_bare_on_stdout_warning_prefixed_on_stderr(capsys):
  log = get_logger("ease_jax.train.loop")
  log.info("starting at step 0 of 10")
  log.warning("checkpoint 4 is damaged; resuming from step 2")
  out, err = capsys.readouterr()
  assert out == "starting at step 0 of 10\n"
  assert err == "warning: checkpoint 4 is damaged; resuming from step 2\n"


def test_one_handler_however_often_asked_and_a_user_can_quiet_it(capsys):
  for _ in range(3):
    get_logger("ease_jax.x")
  root = logging.getLogger("ease_jax")
  assert sum(isinstance(h, ConsoleHandler) for h in root.handlers) == 1
  root.setLevel(logging.WARNING)
  try:
    get_logger("ease_jax.x").info("hidden")
    assert capsys.readouterr().out == ""
  finally:
    root.setLevel(logging.INFO)


def test_progress_is_a_bare_info_line_on_stderr_and_quiets_with_the_level(capsys):
  from ease_jax.generation import files
  from ease_jax.recipe import diagnose
  diagnose.log("diagnose: judged 2/4 with refusal")
  files._log("  2/4 prompts  9 new tokens")
  out, err = capsys.readouterr()
  assert out == "" and err == "diagnose: judged 2/4 with refusal\n  2/4 prompts  9 new tokens\n"
  root = logging.getLogger("ease_jax")
  root.setLevel(logging.WARNING)
  try:
    diagnose.log("hidden")
    assert capsys.readouterr() == ("", "")
  finally:
    root.setLevel(logging.INFO)


def test_lost_peer_logs_one_error_line_then_exits_at_once(capsys, monkeypatch):
  from ease_jax import distributed

  def fake_exit(code):
    raise SystemExit(code)

  monkeypatch.setattr(distributed.os, "_exit", fake_exit)
  try:
    distributed.lost_peer(RuntimeError("gloo:\n  connection reset"))
  except SystemExit as e:
    assert e.code == distributed.LOST_PEER
  else:
    raise AssertionError("lost_peer returned")
  out, err = capsys.readouterr()
  assert out == "" and err == (
      "error: process 0: a collective with the other processes failed (gloo: connection reset);"
      " another process of this run probably died or was killed. Start all processes again to "
      "resume from the last checkpoint\n")
