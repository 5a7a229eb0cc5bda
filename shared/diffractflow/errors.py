"""The platform's one error taxonomy.

A service raises (a subclass of) :class:`InputError` when a job cannot succeed as given: an unreadable or
inconsistent file, a parameter that contradicts the data. The worker runtime rejects such a job at once
(dead letter kind ``bad_input``, no retry). Any other exception is a *failure*: the job is retried with
back-off and, after the last delivery, dead-lettered as a failure with its traceback in the worker log. So a
numpy shape bug is never mistaken for bad input; only code that knows the input is at fault raises this.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class InputError(ValueError):
    """The job's input (files or parameters) cannot give a result; name the file and the problem."""


@contextlib.contextmanager
def reraised_as(cls: type[InputError]) -> Iterator[None]:
    """Re-raise the platform's InputError (e.g. from :mod:`diffractflow.formats`) as a service's own subclass
    ``cls``, same message, so that callers of the service catch one class."""
    try:
        yield
    except cls:
        raise
    except InputError as exc:
        raise cls(str(exc)) from exc


__all__ = ["InputError", "reraised_as"]
