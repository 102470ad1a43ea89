"""Exceptions raised by exitwise.

Every user-facing mistake (bad config, bad input, bad data file) raises a subclass of
:class:`ExitwiseError` with a message that says what was wrong and how to fix it, instead of
letting a shape error surface from deep inside torch.
"""

from __future__ import annotations


class ExitwiseError(Exception):
    """Base class of every error exitwise raises on purpose."""


class ConfigError(ExitwiseError, ValueError):
    """An exit configuration, policy parameter or option is invalid."""


class UnsupportedModelError(ExitwiseError, ValueError):
    """The backbone's architecture is not in the adapter table."""


class InputError(ExitwiseError, ValueError):
    """A batch given to a model, policy or calibrator is malformed (empty, NaN, bad labels)."""


class DataError(ExitwiseError, ValueError):
    """A data file or dataset is missing or malformed."""


class CheckpointError(ExitwiseError, ValueError):
    """Saved exit heads do not fit the backbone they are loaded into."""
