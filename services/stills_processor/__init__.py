"""stills-processor: DIALS processing of true stills and rotation sequences, with q-vector validation."""

__version__ = "0.1.0"

from .core.params import ProcessingSettings, Symmetry  # noqa: E402
from .core.routing import FrameInfo, WorkUnit, frame_info, plan  # noqa: E402

__all__ = ["__version__", "FrameInfo", "ProcessingSettings", "Symmetry", "WorkUnit", "frame_info", "plan"]
