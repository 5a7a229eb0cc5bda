"""Merging partials: Bragg-centred voxels left out on request (MergeOptions.exclude_bragg_voxels)."""
from __future__ import annotations

import numpy as np

from voxel_merger.core.grid import CrystalModel, build_grid
from voxel_merger.pipeline import bragg_voxel_mask


def test_bragg_voxels_are_those_centred_on_integer_hkl():
    grid = build_grid(CrystalModel((40.0, 40.0, 60.0, 90, 90, 90), "P 1"), ndiv=3, d_min=4.0)
    ids = np.arange(grid.n_voxels)
    hkl = grid.voxel_hkl(ids)
    mask = bragg_voxel_mask(grid, ids)
    integer = np.all(np.abs(hkl - np.rint(hkl)) < 1e-9, axis=1)
    assert np.array_equal(mask, integer)
    assert abs(mask.mean() - 1 / 27) < 0.01  # one voxel in 27 at 3 subdivisions
    grid1 = build_grid(CrystalModel((40.0, 40.0, 60.0, 90, 90, 90), "P 1"), ndiv=1, d_min=4.0)
    try:
        bragg_voxel_mask(grid1, np.arange(5))
    except ValueError as exc:
        assert "subdivisions" in str(exc)
    else:
        raise AssertionError("ndiv 1 must be refused: every voxel is a Bragg voxel")
