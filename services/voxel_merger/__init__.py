"""voxel-merger: global reciprocal grid, voxel accumulation (in memory or HDF5) and inverse-variance merging."""
__version__ = "0.1.0"

from .core import (  # noqa: E402
    AsuMapper,
    CrystalModel,
    GlobalGrid,
    VoxelAccumulator,
    average_crystal_model,
    build_grid,
    cc_half_by_shell,
    dense_map,
    merge_sums,
    symmetry_merge,
)

__all__ = [
    "__version__", "AsuMapper", "CrystalModel", "GlobalGrid", "VoxelAccumulator", "average_crystal_model",
    "build_grid", "cc_half_by_shell", "dense_map", "merge_sums", "symmetry_merge",
]
