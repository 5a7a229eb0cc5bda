"""The diffuse-extractor's input error: the platform's :class:`diffractflow.errors.InputError`, so that a job whose
files or parameters cannot give a result is rejected at once, while any other exception (a bug) is retried."""
from __future__ import annotations

from diffractflow.errors import InputError as _PlatformInputError


class InputError(_PlatformInputError):
    """An input file is missing, unreadable or inconsistent with the others or the parameters (the message names
    the file or parameter)."""


__all__ = ["InputError"]
