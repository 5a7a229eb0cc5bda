"""stem-polar: cluster-guided virtual detectors and gated CoM/DPC polarisation mapping for 4D-STEM."""

__version__ = "0.1.0"

from .core.config import PolarConfig, load_config  # noqa: E402
from .core.pipeline import PolarResult, run_pipeline  # noqa: E402
from .core.source import ArraySource, FrameSource  # noqa: E402

__all__ = [
    "__version__",
    "PolarConfig",
    "load_config",
    "PolarResult",
    "run_pipeline",
    "ArraySource",
    "FrameSource",
]
