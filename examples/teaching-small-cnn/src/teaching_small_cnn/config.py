"""Load config.toml: the packaged defaults, overlaid with the user's file.

The packaged file lists every key. A key the user writes that is not there is
an error naming the closest real key: a typo must never become a setting that
is silently ignored.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

Config = dict[str, dict[str, Any]]


class ConfigError(ValueError):
    pass


# Keys that moved: a file written for an older version of this project gets
# told where the setting lives now instead of a bare "unknown key".
MOVED = {
    "freeze.unfreeze_at_epoch": "[[unfreeze.stages]] epoch = N, select = <what to release>",
    "freeze.unfreeze_lr_mult": "lr_mult in its [[unfreeze.stages]] table",
}


def default_config() -> Config:
    text = resources.files(__package__).joinpath("config.toml").read_text()
    return tomllib.loads(text)


def load_config(path: str | Path | None = None) -> Config:
    config = default_config()
    if path is None:
        return config
    path = Path(path)
    try:
        user = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from None
    merged = copy.deepcopy(config)
    for section, values in user.items():
        if section not in config or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}]{_near(section, config)}")
        for key, value in values.items():
            if f"{section}.{key}" in MOVED:
                raise ConfigError(f"{path}: {section}.{key} moved; write {MOVED[f'{section}.{key}']}")
            if key not in config[section]:
                raise ConfigError(f"{path}: unknown key {section}.{key}{_near(key, config[section])}")
            _check_type(f"{section}.{key}", value, config[section][key], path)
            merged[section][key] = value
    return merged


def _check_type(name: str, value: Any, default: Any, path: Path) -> None:
    if default == "auto":
        # "auto" or an explicit value; the code that reads the key checks which.
        if not isinstance(value, (str, bool, int, float)):
            raise ConfigError(f'{path}: {name} must be "auto" or a value, got {value!r}')
        return
    expected = type(default)
    # An int is a fine float (lr = 1 is 1.0); a bool is never an int.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
    ok = ok or (expected is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{path}: {name} must be {expected.__name__}, got {value!r}")
    # A freeze list takes any selector: ints (child positions) and strings mix.
    if expected is list and default and not name.startswith("freeze."):
        item_type = type(default[0])
        bad = [v for v in value if not isinstance(v, item_type) or isinstance(v, bool)]
        if bad:
            raise ConfigError(f"{path}: {name} must list {item_type.__name__} values, got {bad[0]!r}")


def _near(word: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
