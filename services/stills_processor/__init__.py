"""stills-processor: DIALS processing of true stills and rotation sequences, with q-vector validation."""

__version__ = "0.1.0"

from .core.params import ProcessingSettings, Symmetry  # noqa: E402
from .core.routing import WorkUnit, plan  # noqa: E402

__all__ = ["__version__", "ProcessingSettings", "Symmetry", "WorkUnit", "plan"]
