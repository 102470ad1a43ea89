"""Where exitwise keeps what it makes once and reuses (converted models, kernel timings)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EXITWISE_CACHE`` or ``~/.cache/exitwise``."""
    env = os.environ.get("EXITWISE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "exitwise"
