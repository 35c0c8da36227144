"""Command-line plumbing for train.py: one-line errors instead of tracebacks."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
import sys
from typing import Any, Mapping, NoReturn, Optional

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
        fail(unknown_override(argv) or one_line(str(e)))


def unknown_override(argv: list[str], flag_name: str = "config") -> Optional[str]:
    """For the first `--config.a.b=...` whose key the config file does not
    have: which key, and the valid ones at that depth (closest first).
    None when every override names a field (the error is something else)."""
    path, keys = None, []
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag_name}="):
            path = arg.split("=", 1)[1]
        elif arg == f"--{flag_name}" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith(f"--{flag_name}."):
            keys.append(arg[len(flag_name) + 3:].split("=", 1)[0])
    if path is None or not keys:
        return None
    file, _, variant = path.partition(":")
    try:
        config = load_config(file, variant or None)
    except Exception:  # a broken config file reports its own error
        return None
    for key in keys:
        node, walked = config, []
        for part in key.split("."):
            fields = list(node.keys()) if hasattr(node, "keys") else []
            if part not in fields:
                where = f"{flag_name}." + ".".join(walked) if walked else flag_name
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                valid = ", ".join(sorted(fields)) if fields else "none: it is not a section"
                return (f"unknown config field {part!r} in --{flag_name}.{key}{hint}; "
                        f"fields of {where}: {valid}.")
            node, walked = node[part], walked + [part]
    return None


def config_file(flag_name: str = "config") -> str:
    """The `--config` path (without `:variant`); exits if there is no such file.

    config_flags defers a missing file's error to the first attribute access.
    """
    path = flags.FLAGS[flag_name].config_filename.partition(":")[0]
    if not os.path.isfile(path):
        fail(f"--{flag_name}={path}: no such config file.")
    return path


def load_config(path: str, variant: Optional[str] = None,
                overrides: Optional[Mapping[str, Any]] = None):
    """`get_config(variant)` of the config file at `path`, with dotted-key
    overrides applied ({"model.num_experts": 16}); for programs and tests
    that build a config without absl flags."""
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(variant)
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def default_workdir(config_arg: str) -> str:
    """runs/<config name>[_<variant>] for `--config configs/NAME.py[:variant]`."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", name + ("_" + variant.replace(",", "_") if variant else ""))


def define_distributed_flags() -> None:
    """Flags of an explicit multi-process launch; under SLURM none are needed."""
    from jmoe.runtime import distributed as dist

    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit "
                        "multi-process launch; SLURM needs no flags).")
    flags.DEFINE_integer("num_processes", None, "Processes in the job (explicit launch).")
    flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")
    flags.DEFINE_string("local_device_ids", None, "GPUs of this process on its node: 'all' "
                        "or e.g. '0,1,2,3' (default: from SLURM, else all).")
    flags.DEFINE_integer("heartbeat_timeout_s", dist.HEARTBEAT_TIMEOUT_S,
                         "A process silent this long is declared dead and the others abort.")
    flags.DEFINE_integer("init_timeout_s", dist.INIT_TIMEOUT_S,
                         "Seconds for all processes to connect at start-up.")


def distributed_options() -> dict:
    """The distributed flags as keyword arguments of `jmoe.runtime.distributed.initialize`."""
    f = flags.FLAGS
    return dict(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                process_id=f.process_id, local_device_ids=f.local_device_ids,
                heartbeat_timeout_s=f.heartbeat_timeout_s, init_timeout_s=f.init_timeout_s)
