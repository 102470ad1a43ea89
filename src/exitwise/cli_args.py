"""Value types of the ``exitwise`` command line's options (argparse ``type=`` callables),
shared by its encoder and decoder-LM commands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .errors import ConfigError


def json_default(o: Any) -> Any:
    return str(o)


def layers(value: str) -> Any:
    if value == "all" or value.startswith("every:"):
        return value
    return [int(v) for v in value.split(",")]


def delta(value: str) -> float | None:
    if value.strip().lower() in ("none", "off", ""):
        return None
    return float(value)


def key_values(items: list[str]) -> dict[str, Any]:
    """["p_max=0.2", "kd=null"] -> {"p_max": 0.2, "kd": None} (values read as JSON, else
    kept as strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option wants KEY=VALUE; got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def ints(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers separated by commas, e.g. 1,32; got {value!r}") from None


def positive(kind: type) -> Any:
    """An argparse type: a number of ``kind`` (int or float) above 0."""
    def parse(value: str) -> Any:
        try:
            out = kind(value)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}; got {value!r}") from None
        if not out > 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0; got {value!r}")
        return out
    return parse


positive_int, positive_float = positive(int), positive(float)


def positive_ints(value: str) -> list[int]:
    """"1,32" -> [1, 32], each a whole number above 0 (repeats dropped, order kept)."""
    return list(dict.fromkeys(positive_int(v) for v in value.split(",")))
