"""Science of the voxel merger: grid, accumulation, merging (no files, no bus)."""
from .grid import CrystalModel, GlobalGrid, average_crystal_model, build_grid, grid_from_spec, s_max_of_hkl
from .accumulate import FIELDS, VoxelAccumulator, half_of_still, observation_weights, scale_sums
from .merge import (AsuMapper, cc_half_by_shell, dense_map, laue_group, leave_one_out_z, leave_one_out_z_sums, merge_sums,
                    radial_profile, symmetry_merge)

__all__ = [
    "CrystalModel", "GlobalGrid", "average_crystal_model", "build_grid", "grid_from_spec", "s_max_of_hkl",
    "FIELDS", "VoxelAccumulator", "half_of_still", "observation_weights", "scale_sums",
    "AsuMapper", "cc_half_by_shell", "dense_map", "laue_group", "leave_one_out_z", "leave_one_out_z_sums", "merge_sums",
    "radial_profile", "symmetry_merge",
]
