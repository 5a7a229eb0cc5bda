"""The v1 model's error conditions (seed 003), each with the seed's exact message.

``str(exc)`` is exactly the seed's message; the specific reason is kept in ``exc.detail``
(and shown by the CLI) so callers can match on the message without parsing.

Which are input errors (:class:`diffractflow.errors.InputError`: the bus rejects the job without retry):
``ParameterLimitExceeded`` and ``DisabledComponentAccess`` (the user's parameters ask for what v1 forbids) and
``SmootherNotIdentifiable`` (the parameters ask for a smoother these observations cannot determine).
``RefinementFailure`` is not: the minimiser failing on valid input may be a bug, so it is a failure (retried,
then dead-lettered with its traceback).
"""
from __future__ import annotations

from diffractflow.errors import InputError


class _SeedError(Exception):
    MESSAGE = ""

    def __init__(self, detail: str = ""):
        super().__init__(self.MESSAGE)
        self.detail = detail

    def __str__(self) -> str:  # exactly the seed's message
        return self.MESSAGE

    def describe(self) -> str:
        """Message plus the specific reason, for logs and the CLI."""
        return f"{self.MESSAGE}: {self.detail}" if self.detail else self.MESSAGE


class ParameterLimitExceeded(_SeedError, InputError):
    """Total free parameters > 5 + N_stills, or a resolution smoother with > 5 control points."""

    MESSAGE = "v1 model parameter limit exceeded"


class DisabledComponentAccess(_SeedError, InputError):
    """Panel, spatial or additive-offset components requested: hard-disabled in v1."""

    MESSAGE = "Advanced component disabled in v1"


class RefinementFailure(_SeedError, RuntimeError):
    """The minimiser failed (no descent possible, non-finite values) or parameters became invalid."""

    MESSAGE = "Parameter refinement failed"


class SmootherNotIdentifiable(_SeedError, InputError):
    """The resolution smoother was asked for but the observations cannot determine it (see ``detail``)."""

    MESSAGE = "resolution smoother not identifiable from these observations"
