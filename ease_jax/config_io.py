"""Reading a config's text: the YAML file and the ``key.sub=value`` overrides, into a nested
dict that `config.from_dict` builds and checks (the keys themselves are declared in config.py).
Errors name the file or the override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ease_jax.errors import ConfigError


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  """Sets `a.b.0.c` in a nested dict/list tree, creating sections as needed."""
  parts = key.split(".")
  node: Any = tree
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    if isinstance(node, list):
      if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is a list of {len(node)} "
                          f"item(s); use an index 0..{len(node) - 1}")
      part = int(part)
    elif not isinstance(node, dict):
      raise ConfigError(f"override '{key}': '{'.'.join(parts[:i])}' is not a section")
    if last:
      node[part] = value
    else:
      if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
        node[part] = {}
      node = node[part]


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
  """Applies ``key.sub=value`` strings (values are YAML) to a nested tree, in place."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
      raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
      value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    _set_dotted(tree, key.strip(), value)
  return tree


def parse_overrides(overrides: list[str]) -> dict:
  """Parses ``key.sub=value`` strings into a nested dict."""
  return apply_overrides({}, overrides)


def read_yaml(path: str | Path) -> dict:
  """Reads a YAML mapping with the safe loader; errors name the file."""
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  try:
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid YAML: {e}") from None
  if not isinstance(tree, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of config sections")
  return tree
