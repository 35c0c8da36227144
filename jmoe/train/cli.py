"""Command-line plumbing for train.py: one-line errors instead of tracebacks."""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from absl import flags


def fail(msg: str, code: int = 2) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def one_line(msg: str) -> str:
    """Squeezes an absl / config_flags error into one readable line."""
    msg = " ".join(msg.replace("\\n", " ").split())
    if "Traceback" in msg:  # config_flags folds the config file's traceback in
        msg = msg.rsplit("Error: ", 1)[-1]
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', msg)
    if hint:
        msg = f"unknown config field {hint.group(2)!r} (did you mean {hint.group(1)!r}?)"
    return msg


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a bad flag or `--config.*` override exits with one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        fail(one_line(str(e)))


def config_file(flag_name: str = "config") -> str:
    """The `--config` path (without `:variant`); exits if there is no such file.

    config_flags defers a missing file's error to the first attribute access.
    """
    path = flags.FLAGS[flag_name].config_filename.partition(":")[0]
    if not os.path.isfile(path):
        fail(f"--{flag_name}={path}: no such config file.")
    return path


def default_workdir(config_arg: str) -> str:
    """runs/<config name>[_<variant>] for `--config configs/NAME.py[:variant]`."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", name + ("_" + variant.replace(",", "_") if variant else ""))
