"""A command's options from one section of a YAML file plus `key=value` words (docs/recipe.md).

`parse_args(ap, argv, section)` replaces `ap.parse_args(argv)`: the command then also takes
`--config FILE.yaml`, whose `SECTION:` mapping gives options by their flag names without `--`
(a training config may carry it: config.TOOL_SECTIONS), and `key=value` words. Precedence,
highest first: `--flag value` on the command line, `key=value`, the YAML section, the argparse
default. Each value goes through the option's own argparse `type`, `choices` and `nargs`, so
every option stays declared once, in the command's parser. Values are taken as written (YAML
text, not YAML types: `ratio: 1:1:2` stays the text 1:1:2); relative paths are left as they
are, so they resolve against the current directory, as the training config's do.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

import yaml

from ease_jax.config import TOOL_SECTIONS
from ease_jax.errors import ConfigError

# The option kinds a file or key=value can set: store, and store_true/false/const (argparse has
# no public name for them; append and count options stay command-line only).
_KINDS = (argparse._StoreAction, argparse._StoreConstAction)


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None,
               section: str) -> argparse.Namespace:
  """`ap.parse_args(argv)` that also reads `--config FILE.yaml` (its `section:`) and `key=value`."""
  if section not in TOOL_SECTIONS:
    raise ValueError(f"section {section!r} is not declared in ease_jax.config.TOOL_SECTIONS")
  ap.add_argument("--config", default="", metavar="FILE.yaml",
                  help=f"options from the `{section}:` section of this YAML file (keys: the\n"
                       "flag names without --); key=value and flags win over it")
  ap.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                  help="an option as key=value (lists comma-separated); wins over --config")
  options = {o[2:]: a for a in ap._actions if isinstance(a, _KINDS) and a.dest != "config"
             for o in a.option_strings if o.startswith("--")}
  actions = {a.dest: a for a in options.values()}
  defaults = {dest: a.default for dest, a in actions.items()}
  required = [a for a in actions.values() if a.required]
  for a in actions.values():  # absent flags stay absent, so what was given is known
    a.required, a.default = False, argparse.SUPPRESS
  try:
    args = ap.parse_intermixed_args(argv)
  finally:
    for dest, a in actions.items():
      a.default = defaults[dest]
  given = {**(_section(args.config, section, options) if args.config else {}),
           **_words(args.overrides, options)}  # key=value wins over the file
  for dest, a in actions.items():
    if hasattr(args, dest):  # a flag on the command line wins over both
      continue
    if dest in given:
      setattr(args, dest, given[dest])
    elif a in required:
      name = a.option_strings[-1].lstrip("-")
      raise ConfigError(f"--{name} is required: give --{name} VALUE, {name}=VALUE, or "
                        f"'{name}:' in the '{section}:' section of a --config file")
    elif isinstance(defaults[dest], str) and a.type:  # argparse converts text defaults
      setattr(args, dest, _one(a, defaults[dest], f"the default of --{dest}"))
    else:
      setattr(args, dest, defaults[dest])
  return args


def _lookup(options: dict[str, argparse.Action], key: str, where: str) -> argparse.Action:
  """The option named `key`, or a ConfigError naming the closest valid key."""
  if key in options:
    return options[key]
  near = difflib.get_close_matches(key, list(options), n=1)
  hint = f" (did you mean '{near[0]}'?)" if near else ""
  raise ConfigError(f"{where}: unknown key '{key}'{hint}; the keys are the flags of --help "
                    "without --")


def _convert(action: argparse.Action, value: str | list[str], where: str) -> Any:
  """A value (text, or a list of texts) checked by the action's own nargs, type and choices."""
  if action.nargs == 0:  # store_true / store_false / store_const
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
      return action.const if value.strip().lower() == "true" else action.default
    raise ConfigError(f"{where}: expected true or false, got {value!r}")
  if not _many(action):
    if isinstance(value, list):
      raise ConfigError(f"{where}: expected one value, got a list")
    return _one(action, value, where)
  items = value if isinstance(value, list) else [value]
  if (action.nargs == "+" and not items) or (isinstance(action.nargs, int)
                                             and len(items) != action.nargs):
    raise ConfigError(f"{where}: expected {'at least 1' if action.nargs == '+' else action.nargs}"
                      f" value(s), got {len(items)}")
  return [_one(action, v, where) for v in items]


def _many(action: argparse.Action) -> bool:
  """Whether the option takes a list (nargs '*', '+' or a count)."""
  return action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 0)


def _one(action: argparse.Action, text: str, where: str) -> Any:
  """One text converted by the action's `type` and checked against its `choices`."""
  convert = action.type or str
  try:
    value = convert(text)
  except argparse.ArgumentTypeError as e:
    raise ConfigError(f"{where}: {e}") from None
  except (TypeError, ValueError):
    raise ConfigError(f"{where}: invalid {getattr(convert, '__name__', 'value')} value: "
                      f"{text!r}") from None
  if action.choices is not None and value not in action.choices:
    raise ConfigError(f"{where}: {value!r} is not allowed; choose one of "
                      f"{', '.join(map(str, action.choices))}")
  return value


def _words(words: list[str], options: dict[str, argparse.Action]) -> dict[str, Any]:
  """`key=value` command-line words by destination (a list option's value: comma-separated)."""
  values = {}
  for word in words:
    key, sep, text = word.partition("=")
    if not sep or not key:
      raise ConfigError(f"unexpected argument {word!r}: expected --option VALUE or key=VALUE")
    action = _lookup(options, key, f"'{word}'")
    items = [t for t in text.split(",") if t] if _many(action) else text
    values[action.dest] = _convert(action, items, f"'{word}'")
  return values


def _section(path: str, section: str, options: dict[str, argparse.Action]) -> dict[str, Any]:
  """The options in the `section:` mapping of a YAML file, by destination, errors located."""
  if not Path(path).is_file():
    raise ConfigError(f"--config file not found: {path}")
  try:
    root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    raise ConfigError(f"{path}:{mark.line + 1}: not valid YAML: {e.problem}") from None
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not valid YAML: {e}") from None
  if not isinstance(root, yaml.MappingNode):
    raise ConfigError(f"{path}: the top level must be a mapping with a '{section}:' section")
  found = [v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == section]
  if not found:
    keys = ", ".join(str(getattr(k, "value", "?")) for k, _ in root.value) or "none"
    raise ConfigError(f"{path}: no '{section}:' section (top-level keys: {keys})")
  node = found[-1]
  if not isinstance(node, yaml.MappingNode):
    raise ConfigError(f"{path}:{node.start_mark.line + 1}: '{section}:' must be a mapping of "
                      "option: value")
  values, seen = {}, set()
  for k, v in node.value:
    key, where = str(k.value), f"{path}:{k.start_mark.line + 1}: {section}.{k.value}"
    action = _lookup(options, key, f"{path}:{k.start_mark.line + 1}: section '{section}:'")
    if key in seen:
      raise ConfigError(f"{where}: given twice")
    seen.add(key)
    if isinstance(v, yaml.ScalarNode) and v.tag != "tag:yaml.org,2002:null":
      value = v.value
    elif isinstance(v, yaml.SequenceNode) and all(isinstance(c, yaml.ScalarNode) for c in v.value):
      value = [c.value for c in v.value]
    else:
      raise ConfigError(f"{where}: expected a value or a list of values (an empty value is "
                        "not one: leave the key out for the default)")
    values[action.dest] = _convert(action, value, where)
  return values
