"""diffuse-extractor: masks, physical corrections and per-still {q, I, sigma} from DIALS stills."""
__version__ = "0.1.0"

from .core.extract import COLUMNS, ExtractionParams, GeometryCache, StillExtraction, extract_still  # noqa: E402
from .core.masks import MaskBit, RunPixelStatistics, Shape  # noqa: E402

__all__ = ["__version__", "COLUMNS", "ExtractionParams", "GeometryCache", "StillExtraction", "extract_still",
           "MaskBit", "RunPixelStatistics", "Shape"]
