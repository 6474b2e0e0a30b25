"""``--config TRAIN.yaml`` of the training commands: a YAML mapping whose keys are the command's flags.

``learning-rate: 1.0e-4`` (or ``learning_rate``) is ``--learning-rate 1.0e-4``; ``lora: true`` is ``--lora``;
a list is one comma-separated value (``lora-targets: [q_proj, v_proj]``). The file's settings go before the
command line's, so a flag given on the command line wins. The file is read as a chain file is (small,
shallow, no anchors); an unknown key is refused naming the closest flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftrecycle.cli.suggest import flag_hint
from ftrecycle.errors import ConfigError
from ftrecycle.recycle.chainfile import read_plain_yaml

CONFIG_COMMANDS = ("finetune", "recycle-finetune")
CONFIG_HELP = (
    "YAML file of settings whose keys are this command's flags without the dashes (learning-rate: 1.0e-4, "
    "lora: true, lora-targets: [q_proj, v_proj]); flags given on the command line override it"
)
_NOT_IN_FILE = ("--config", "--help")


def add_config_argument(p: argparse.ArgumentParser) -> None:
    """Add ``--config`` (read by :func:`with_config_file` before parsing; kept in the namespace for the record)."""
    p.add_argument("--config", metavar="TRAIN.yaml", default=None, help=CONFIG_HELP)


def _config_path(args: Sequence[str]) -> str | None:
    """The value of ``--config`` in ``args`` (the last one given), or None."""
    found = None
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--config" and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
    return found


def with_config_file(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` with a training command's ``--config`` file expanded into flags placed before its own.

    Args:
        parser: the ``ftrecycle`` parser (its subparsers say which flags each command takes).
        argv: the command line, without the program name.

    Returns:
        The command line to parse (``argv`` unchanged without ``--config``).

    Raises:
        ConfigError: the file cannot be read, is not a mapping, has an unknown key (naming the closest flag)
            or a value of a kind its flag does not take.
    """
    args = list(argv)
    path = _config_path(args[1:]) if args and args[0] in CONFIG_COMMANDS else None
    if path is None:
        return args
    sub = _subparser(parser, args[0])
    return [args[0], *config_argv(Path(path), sub), *args[1:]]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise ConfigError(f"no {name} command")  # the parser is built with every command: not reached


def config_argv(p: Path, sub: argparse.ArgumentParser) -> list[str]:
    """The flags a training settings file stands for (see the module docstring).

    Raises:
        ConfigError: as :func:`with_config_file`, naming the file and the key.
    """
    raw = read_plain_yaml(p, "training settings file")
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of flag: value (learning-rate: 1.0e-4), got a {type(raw).__name__}")
    actions = {s: a for a in sub._actions for s in a.option_strings if s.startswith("--") and s not in _NOT_IN_FILE}
    out: list[str] = []
    for key, value in raw.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in actions:
            hint = flag_hint(flag, list(actions))
            raise ConfigError(
                f"{p}: unknown setting {str(key)!r:.60}"
                + (f" (did you mean {hint.removeprefix('--')}?)" if hint else "")
                + f"; keys are the flags of `ftrecycle {sub.prog.split()[-1]}` without the dashes"
            )
        out += _flag_value(p, str(key), flag, actions[flag], value)
    return out


def _flag_value(p: Path, key: str, flag: str, action: argparse.Action, value: Any) -> list[str]:
    """The command-line words for one setting of the file."""
    if action.nargs == 0:  # a switch: true or false
        if not isinstance(value, bool):
            raise ConfigError(f"{p}: {key}: expected true or false, got {value!r:.60}")
        return [flag] if value else []
    if value is None:
        return []  # the flag's default
    if isinstance(value, bool):  # YAML 1.1 reads unquoted on/off/yes/no as booleans
        raise ConfigError(f"{p}: {key}: got {str(value).lower()}; quote the value ('on', 'off') to mean the word")
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return [flag, ",".join(str(v) for v in value)]
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{p}: {key}: expected a single value, got a {type(value).__name__}")
    return [flag, str(value)]
