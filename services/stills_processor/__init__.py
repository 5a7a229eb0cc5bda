"""stills-processor: DIALS processing of true stills and rotation sequences, with q-vector validation."""

__version__ = "0.1.0"

from .core.params import FrameModelJob, JobParams, ProcessingSettings, SequenceJob, StillsJob, Symmetry  # noqa: E402
from .core.routing import FrameInfo, WorkUnit, frame_info, plan  # noqa: E402

__all__ = ["__version__", "FrameInfo", "FrameModelJob", "JobParams", "ProcessingSettings", "SequenceJob", "StillsJob",
           "Symmetry", "WorkUnit", "frame_info", "plan"]
