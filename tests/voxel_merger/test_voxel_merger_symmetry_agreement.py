"""Agreement of symmetry-equivalent voxels before merging: high for data with the space group's symmetry, near
zero for data that only has P1 symmetry, and lowered by noise as CC½ is."""
import numpy as np
from cctbx import crystal, miller, sgtbx

from voxel_merger.core.accumulate import VoxelAccumulator
from voxel_merger.core.grid import CrystalModel, build_grid
from voxel_merger.core.merge import AsuMapper, symmetry_agreement, symmetry_merge

SG, CELL = "P 41 21 2", (57.8, 57.8, 150.3, 90, 90, 90)


def _observations(symmetric: bool, noise: float, seed: int = 1):
    """Every equivalent of every reflection observed once; values equal within an orbit (symmetric) or not."""
    rng = np.random.default_rng(seed)
    cs = crystal.symmetry(unit_cell=CELL, space_group_symbol=SG)
    base = miller.build_set(cs, anomalous_flag=False, d_min=8.0).indices()
    ops = [np.array(op.r().num()).reshape(3, 3) for op in
           sgtbx.space_group_info(SG).group().build_derived_laue_group().all_ops()]
    H, I = [], []
    for h in base:
        level = rng.exponential(100.0)
        for R in ops:
            H.append(np.array(h) @ R)
            I.append((level if symmetric else rng.exponential(100.0)) + rng.normal(0, noise))
    H = np.array(H, dtype=float)
    return H, np.array(I), np.full(len(I), max(noise, 1.0))


def _agreement(symmetric: bool, noise: float) -> dict:
    grid = build_grid(CrystalModel(CELL, SG), ndiv=1, d_min=7.5)
    H, I, sig = _observations(symmetric, noise)
    p1 = VoxelAccumulator(grid)
    p1.add(H[:, 0], H[:, 1], H[:, 2], I, sig)
    mapper = AsuMapper(grid, SG)
    asu = VoxelAccumulator(grid)
    symmetry_merge(p1, asu, mapper)
    return symmetry_agreement(p1, asu, mapper, grid, n_shells=4)


def test_symmetric_data_agree_p1_data_do_not():
    good = _agreement(True, noise=5.0)
    bad = _agreement(False, noise=5.0)
    assert good["n_voxels_total"] > 1000
    assert good["overall"] > 0.95, good
    assert abs(bad["overall"]) < 0.2, bad
    assert all(c is None or c > 0.9 for c in good["cc"])


def test_noise_lowers_the_agreement():
    quiet = _agreement(True, noise=5.0)["overall"]
    noisy = _agreement(True, noise=100.0)["overall"]
    # equal variances of signal and noise: CC between one voxel and the mean of 15 mates ~ 1/sqrt(2 (1 + 1/15))
    assert 0.5 < noisy < quiet - 0.2
