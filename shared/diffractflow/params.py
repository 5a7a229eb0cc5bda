"""Helpers for the services' parameter models (each service's ``core/params.py``)."""
from __future__ import annotations

from typing import Any

from pydantic import Discriminator


def job_kind(field: str, default: str, *kinds: str) -> Discriminator:
    """A pydantic discriminator that picks a job kind's model by the value of ``field`` in the job's params
    (``default`` when the field is absent), refusing another value with a message naming the kinds, e.g.
    ``mode must be 'extract' or 'background'``. Use it as ``Annotated[Union[Annotated[A, Tag("a")], ...],
    job_kind("mode", "a", "a", ...)]`` on a ``RootModel``."""

    def choose(v: Any) -> str:
        return v.get(field, default) if isinstance(v, dict) else getattr(v, field, default)

    names = [repr(k) for k in kinds]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return Discriminator(choose, custom_error_type=f"invalid_{field}",
                         custom_error_message=f"{field} must be {listed}")


__all__ = ["job_kind"]
