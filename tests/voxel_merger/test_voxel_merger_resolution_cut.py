"""The run's d_min is a resolution limit, not just the size of the grid's box: observations in the box's corners
(beyond 1/d_min) are not accumulated."""
import numpy as np

from voxel_merger.artifacts import write_still
from voxel_merger.core.grid import CrystalModel, grid_from_spec
from voxel_merger.pipeline import MergeOptions, accumulate_one
from voxel_merger.storage import H5VoxelAccumulator

CELL = (40.0, 40.0, 60.0, 90.0, 90.0, 90.0)


def _measured_s(partial, grid) -> np.ndarray:
    with H5VoxelAccumulator(partial, mode="r") as acc:
        ids = np.concatenate([start + np.flatnonzero(np.asarray(s)[0].sum(axis=0) > 0) for start, s in acc.iter_blocks()])
    return grid.s_of_voxels(ids)


def test_observations_beyond_d_min_are_not_accumulated(tmp_path):
    spec = {"unit_cell": list(CELL), "space_group": "P 43 21 2", "d_min": 4.0, "subdivisions": 3}
    grid = grid_from_spec(spec)
    rng = np.random.default_rng(0)
    n = 200_000
    hkl = rng.uniform(-1, 1, (n, 3)) * np.array([10.0, 10.0, 15.0])  # fills the whole box, corners included
    still = write_still(tmp_path / "still.h5", "s1", hkl[:, 0], hkl[:, 1], hkl[:, 2], np.full(n, 5.0),
                        np.full(n, 1.0), crystal=CrystalModel(CELL, "P 43 21 2"))
    cut = accumulate_one(still, grid, tmp_path / "cut.h5", MergeOptions(d_min=4.0))
    box = accumulate_one(still, grid, tmp_path / "box.h5", MergeOptions())
    s_cut = _measured_s(tmp_path / "cut.h5", grid)
    s_box = _measured_s(tmp_path / "box.h5", grid)
    assert s_cut.max() <= 1 / 4.0 + 1e-9
    assert s_box.max() > 1 / 4.0 * 1.2  # without the cut the corners are there
    assert cut["n_beyond_d_min"] > 0 and cut["n_used"] + cut["n_beyond_d_min"] <= n
