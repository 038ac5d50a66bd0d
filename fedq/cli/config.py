"""Every option from three places besides the command line: the environment, a secret file, a TOML file.

Precedence, highest first: the command line; ``FEDQ_<OPTION>`` (``--state-dir`` is ``FEDQ_STATE_DIR``);
``FEDQ_<OPTION>_FILE``, a file holding the value (secrets such as ``FEDQ_AMQP_URL_FILE``, the way container
secrets are mounted); the TOML file named by ``--config-file`` or ``FEDQ_CONFIG_FILE``; the built-in default.

The TOML file holds top-level keys, which apply to every command that has the option, and one table per
command, which wins over them::

    amqp-url-file = "/run/secrets/fedq-amqp-url"    # a key ending in -file reads the value from that file
    namespace = "prod"

    [aggregator]
    shards = 2
    state-dir = "/var/lib/fedq"

    [broker.add-client]
    password-file = "/run/secrets/alice"

A key no command knows is an error (a typo must not be ignored silently). Values are never printed: ``--help``
shows defaults with passwords replaced by ``***``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedq.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ENV_PREFIX = "FEDQ_"
CONFIG_FILE_ENV = "FEDQ_CONFIG_FILE"
FILE_SUFFIX = "-file"


def load_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def options_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by TOML key (``--state-dir`` -> ``state-dir``); positionals and help excluded."""
    out: dict[str, argparse.Action] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long and not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            out[long[0][2:]] = action
    return out


def table_for(config: Mapping[str, Any], words: tuple[str, ...]) -> dict[str, Any]:
    """Top-level keys overlaid with the command's own table (``[aggregator]``, ``[broker.add-client]``)."""
    values = {k: v for k, v in config.items() if not isinstance(v, dict)}
    table: Any = config
    for word in words:
        table = table.get(word, {}) if isinstance(table, dict) else {}
    return values | {k: v for k, v in table.items() if not isinstance(v, dict)}


def check_keys(config: Mapping[str, Any], known: Mapping[tuple[str, ...], set[str]], path: Path) -> None:
    """Refuse keys that no command has (top level) or that the table's command does not have."""
    everywhere = set().union(*known.values()) if known else set()

    def key_name(key: str) -> str:
        return key[: -len(FILE_SUFFIX)] if key.endswith(FILE_SUFFIX) else key

    def walk(table: Mapping[str, Any], words: tuple[str, ...]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                if not any(k[: len(words) + 1] == (*words, key) for k in known):
                    raise ConfigError(f"{path}: no command {' '.join((*words, key))!r} (table [{key}])")
                walk(value, (*words, key))
            elif key_name(key).replace("_", "-") not in (known.get(words, set()) if words else everywhere):
                where = f"command {' '.join(words)!r}" if words else "any command"
                raise ConfigError(f"{path}: {key!r} is not an option of {where}")

    walk(config, ())


def defaults_from(
    parser: argparse.ArgumentParser, table: Mapping[str, Any], environ: Mapping[str, str]
) -> dict[str, Any]:
    """The defaults this parser takes from the environment and the config table, by argparse dest."""
    out: dict[str, Any] = {}
    for key, action in options_of(parser).items():
        value = _from_env(key, action, environ)
        if value is None:
            value = _from_table(key, action, table)
        if value is not None:
            out[action.dest] = value
            action.required = False  # a required option (--init) may come from here too
    return out


def _from_env(key: str, action: argparse.Action, environ: Mapping[str, str]) -> Any:
    name = ENV_PREFIX + key.upper().replace("-", "_")
    if name in environ:
        return _cast(action, environ[name], name)
    if name + "_FILE" in environ and name + "_FILE" != CONFIG_FILE_ENV:  # not the aggregator's --config
        return _cast(action, _read_secret(Path(environ[name + "_FILE"]), name + "_FILE"), name)
    return None


def _from_table(key: str, action: argparse.Action, table: Mapping[str, Any]) -> Any:
    for spelling in (key, key.replace("-", "_")):
        if spelling in table:
            return _cast(action, table[spelling], spelling)
        if spelling + FILE_SUFFIX in table or spelling + "_file" in table:
            path = table.get(spelling + FILE_SUFFIX) or table[spelling + "_file"]
            return _cast(action, _read_secret(Path(str(path)), spelling + FILE_SUFFIX), spelling)
    return None


def _read_secret(path: Path, what: str) -> str:
    """A secret's file: its content without the trailing newline (editors and ``echo`` add one)."""
    try:
        return path.read_text().rstrip("\n")
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def _cast(action: argparse.Action, value: Any, source: str) -> Any:
    """An environment string or a TOML value as the option expects it (strings are left to argparse's
    ``type``, which converts string defaults when the option is not given)."""
    flags = argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction
    if isinstance(action, flags):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ConfigError(f"{source}: {value!r} is not a boolean (true/false)")
        return text in ("1", "true", "yes", "on")
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [v for v in str(value).split(",") if v]
        return [_converted(action, item, source) for item in items]
    return _converted(action, value, source)


def _converted(action: argparse.Action, value: Any, source: str) -> Any:
    if action.type is None or not isinstance(value, str):
        return value
    try:
        converted = action.type(value)  # type: ignore[operator]
    except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {value!r}: {exc}") from exc
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{source}: {value!r} is not one of {choices}")
    return converted
