"""Checks shared by the options of training strategies and exit heads.

``bool(value)`` reads any non-empty string as True, so ``train_backbone="false"`` once meant
True; an option that is a switch takes a real boolean or is refused.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def flag(owner: str, name: str, value: Any) -> bool:
    """``value`` as a bool, or a ConfigError naming ``owner``'s option ``name``."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's too
        return bool(value)
    raise ConfigError(f"{owner}: {name} must be True or False; got {value!r}")
