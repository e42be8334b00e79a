"""``--config FILE``: the flags of ``train``, ``compress`` and ``evaluate`` read from a YAML file.

A key is a flag's name without the leading dashes (``lr-search`` or ``lr_search``); its value is what the flag would
take (``true``/``false`` for a switch, a list for a repeatable flag). The file's values replace the flags' defaults,
so a flag given on the command line overrides the file. A key of another of the three commands is not applied (one
file serves ``compress`` and the ``evaluate`` of its output); a key no command knows is refused, naming the closest
known key. The key ``about`` is the file's own record (the script it follows, the number it should reproduce) and
sets nothing. A switch is written ``amp: true`` / ``amp: false`` (not ``no-amp``); a repeatable flag given on the
command line replaces the file's list.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any

from upop.errors import UPopError

CONFIG_COMMANDS = ("train", "compress", "evaluate")
ABOUT = "about"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the upop parser has no commands")


def _flags(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The long flags of a command, by name without dashes (a switch's ``--no-`` form is not a key: ``amp: false``)."""
    return {
        name[2:]: action
        for action in sub._actions
        for name in action.option_strings[:1]
        if name.startswith("--") and name not in ("--help", "--config")
    }


def config_path(argv: list[str], options: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (the last one, as argparse would take it; a prefix argparse would read
    as ``--config`` too), or None. ``options``: the command's option strings."""
    found = None
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if not name.startswith("--") or not "--config".startswith(name):
            continue
        if name != "--config" and [o for o in options if o.startswith(name)] != ["--config"]:
            continue  # another flag, or a prefix argparse would refuse as ambiguous
        if eq:
            found = value
        elif i + 1 < len(argv):
            found = argv[i + 1]
    return found


def read_config(path: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` (read with the safe loader)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UPopError(f"--config {path}: no such file (accepted: a YAML file of flag: value lines)")
    try:
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UPopError(f"--config {path} is not valid YAML{line} (accepted: flag: value lines)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UPopError(f"--config {path} holds a {type(data).__name__}, not a mapping of flag: value lines")
    return data


def _convert(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """``value`` as the flag would have parsed it, or a one-line error naming the file and key."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise UPopError(f"--config {path}: {key}: expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [_convert_one(action, key, v, path) for v in values]
    return _convert_one(action, key, value, path)


def _convert_one(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    if value is None:
        return None
    if isinstance(value, (dict, list, bool)):
        raise UPopError(f"--config {path}: {key}: expected one value, got {value!r}")
    try:
        converted = action.type(str(value)) if callable(action.type) else str(value)
    except argparse.ArgumentTypeError as e:
        raise UPopError(f"--config {path}: {key}: {e}") from None
    except (ValueError, TypeError):
        kind = getattr(action.type, "__name__", "value")
        raise UPopError(f"--config {path}: {key}: {value!r} is not a valid {kind}") from None
    if action.choices is not None and converted not in action.choices:
        raise UPopError(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """Make the values of the ``--config`` file in ``argv`` the defaults of its command's flags; returns what it set
    (flag name -> value), {} without ``--config``."""
    subs = _subparsers(parser)
    command = argv[0] if argv else None
    if command not in CONFIG_COMMANDS:
        return {}
    path = config_path(argv, [o for a in subs[command]._actions for o in a.option_strings])
    if path is None:
        return {}
    data = read_config(path)
    known = {name for c in CONFIG_COMMANDS for name in _flags(subs[c])}
    mine = _flags(subs[command])
    applied: dict[str, Any] = {}
    for raw, value in data.items():
        key = str(raw).replace("_", "-")
        if key == ABOUT:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known | {ABOUT}), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UPopError(
                f"--config {path}: unknown key {raw!r}{hint} (accepted: the flags of upop {command} --help)"
            )
        if key not in mine:
            continue  # another command's flag
        action = mine[key]
        applied[key] = _convert(action, key, value, path)
        action.required = False
        subs[command].set_defaults(**{action.dest: applied[key]})
    return applied


def replace_listed(args: argparse.Namespace, applied: dict[str, Any]) -> None:
    """A repeatable flag given on the command line replaces the file's list (argparse would append to it)."""
    for key, value in applied.items():
        dest = key.replace("-", "_")
        if isinstance(value, list) and dest in args.given and isinstance(getattr(args, dest, None), list):
            current = getattr(args, dest)
            if current[: len(value)] == value:
                setattr(args, dest, current[len(value) :])


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags written on the command line (not those a config file or a default set)."""
    command = argv[0] if argv else None
    subs = _subparsers(parser)
    if command not in subs:
        return set()
    by_option = {name: a.dest for a in subs[command]._actions for name in a.option_strings}
    given = set()
    for token in argv[1:]:
        name = token.split("=", 1)[0]
        matches = [o for o in by_option if o == name] or [o for o in by_option if o.startswith(name)]
        if name.startswith("--") and len(matches) == 1:  # argparse takes unique prefixes too
            given.add(by_option[matches[0]])
    return given
