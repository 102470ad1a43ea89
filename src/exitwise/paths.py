"""Where exitwise keeps what it makes once and reuses (converted models, kernel timings), and
where it looks for local data when none is given."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$EXITWISE_CACHE`` or ``~/.cache/exitwise``."""
    env = os.environ.get("EXITWISE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "exitwise"


def data_root() -> Path | None:
    """The folder of local data used when a command is given none: ``$EXITWISE_DATA``, else
    ``../shared/data`` or ``shared/data`` relative to the working directory (this project's
    layout); None when neither exists. Never searched relative to the installed package."""
    env = os.environ.get("EXITWISE_DATA")
    if env:
        return Path(env).expanduser()
    for c in (Path.cwd() / "../shared/data", Path.cwd() / "shared/data"):
        if c.is_dir():
            return c.resolve()
    return None
