"""scaler: relative scaling of diffuse observations (seed 003) and absolute scaling (seed 002, phase 4)."""
__version__ = "0.1.0"

from .core.errors import (DisabledComponentAccess, ParameterLimitExceeded, RefinementFailure,  # noqa: E402
                          SmootherNotIdentifiable)
from .core.components import PerStillMultiplierComponent, ResolutionSmootherComponent  # noqa: E402
from .core.model import DiffuseScalingModel  # noqa: E402

__all__ = ["DiffuseScalingModel", "SmootherNotIdentifiable", "PerStillMultiplierComponent", "ResolutionSmootherComponent",
           "ParameterLimitExceeded", "DisabledComponentAccess", "RefinementFailure", "__version__"]
