"""The config file: option defaults per command, in TOML.

    # ~/.config/rnngen/config.toml
    [generate]
    temperature = 0.7
    top-p = 0.95

    [serve]
    port = 50051
    max-active = 128

Precedence, highest first: the command line, then the environment
(RNNGEN_<COMMAND>_<OPTION>, or the variable an option names itself, such as
RNNGEN_PORT), then this file, then the built-in default. Every section and key
is checked against the commands' options, so a typo is an error that names
what is allowed rather than a setting silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from rnngen.errors import InvalidParameterError


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "rnngen" / "config.toml"


def config_defaults(path: Path | None, group: Any) -> dict[str, dict[str, Any]] | None:
    """Read `path` (or the default file when it exists) into click's default_map, checked against `group`."""
    explicit = path is not None
    path = path if explicit else default_config_path()
    if not path.is_file():
        if explicit:
            raise InvalidParameterError(f"config: {path} is not a file")
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"config: {path} is not valid TOML: {exc}") from None
    commands = getattr(group, "commands", {})
    defaults: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section not in commands:
            raise InvalidParameterError(
                f"config: {path}: [{section}] is not a command; sections are {', '.join(sorted(commands))}")
        if not isinstance(values, dict):
            raise InvalidParameterError(f"config: {path}: {section} must be a [{section}] table of options")
        # Keys are the long option names as typed on the command line, without the dashes.
        options = {opt[2:]: p for p in commands[section].params if getattr(p, "param_type_name", "") == "option"
                   for opt in p.opts if opt.startswith("--")}
        section_defaults = {}
        for key, value in values.items():
            if key not in options:
                raise InvalidParameterError(f"config: {path}: [{section}] {key} is not an option of {section}; "
                                            f"options are {', '.join(sorted(options))}")
            # Values are converted and checked like command-line values (a bad one names its option).
            section_defaults[options[key].name] = value
        defaults[section] = section_defaults
    return defaults
