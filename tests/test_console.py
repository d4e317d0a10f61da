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
