"""User-facing errors: a mistake in a user's config, data or paths, not a bug."""

import sys
from typing import Callable


class UserError(Exception):
  """An error the user can fix; command-line tools print it without a traceback."""


class DataError(UserError):
  """A bad record or data file: the message names the file, the line and the field."""

  def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
               field: str | None = None):
    where = ":".join(str(p) for p in (path, line) if p is not None)
    prefix = f"{where}: " if where else ""
    suffix = f" (field '{field}')" if field else ""
    super().__init__(f"{prefix}{message}{suffix}")
    self.path, self.line, self.field = path, line, field


class ConfigError(UserError):
  """A bad config key, type or value; the message names the key and what is allowed."""


def run_main(main: Callable[[], int]) -> int:
  """Runs a command-line `main`: a UserError becomes one `error: ...` line and exit code 2."""
  try:
    return main()
  except UserError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
