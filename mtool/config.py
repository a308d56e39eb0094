"""Settings precedence: flag > environment (MTOOL_*) > config file > default.

Flags and environment are click's (each option names its MTOOL_<OPTION> variable); the config
file (`--config FILE` or MTOOL_CONFIG, YAML or JSON of option names to values) becomes click's
default_map for every command, so its keys apply wherever an option of that name exists.
"""

from __future__ import annotations

from mtool.errors import ConfigError


def envvar(long_name: str) -> str:
    return "MTOOL_" + long_name.lstrip("-").replace("-", "_").upper()


def load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    import yaml

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def default_map_for(command, flat: dict) -> dict:
    """click default_map: the flat settings at every level of the command tree."""
    out = dict(flat)
    for name, sub in getattr(command, "commands", {}).items():
        out[name] = default_map_for(sub, flat)
    return out


def uuid_value(value: str, what: str) -> str:
    """The canonical form of a UUID given on the command line; a usage error naming `what`."""
    import uuid

    from mtool.errors import UsageError

    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise UsageError(f"{what} {value!r} is not a UUID") from None


def state_dir() -> str:
    from mtool.db.embedded import default_home

    return str(default_home())
