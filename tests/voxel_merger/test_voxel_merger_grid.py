"""Global grid: voxel centres, bounds, average crystal model, reference setting (against cctbx)."""
import numpy as np
import pytest

from voxel_merger.core.grid import (CrystalModel, GlobalGrid, average_crystal_model, build_grid,
                                    hkl_change_of_basis_matrix, reindex_to_reference, s_max_of_hkl)


def test_integer_hkl_sit_at_voxel_centres_and_boundaries_are_half_a_subvoxel():
    g = build_grid(CrystalModel((30, 40, 50, 90, 90, 90), "P 1"), ndiv=3, hkl_max=(4, 4, 4))
    rng = np.random.default_rng(1)
    hkl = rng.integers(-4, 5, size=(500, 3)).astype(float)
    ids = g.voxel_ids(hkl[:, 0], hkl[:, 1], hkl[:, 2])
    assert (ids >= 0).all()
    np.testing.assert_array_equal(g.voxel_hkl(ids), hkl)
    # anything within ±1/(2·ndiv) of a centre falls into that voxel, just beyond falls into the neighbour
    eps = 1e-9
    inside = hkl + rng.uniform(-1, 1, size=hkl.shape) * (1 / 6 - eps)
    np.testing.assert_array_equal(g.voxel_ids(*inside.T), ids)
    beyond = hkl.copy()
    beyond[:, 2] += 1 / 6 + eps
    np.testing.assert_allclose(g.voxel_hkl(g.voxel_ids(*beyond.T))[:, 2], hkl[:, 2] + 1 / 3)


def test_out_of_grid_and_nan_observations_get_minus_one():
    g = build_grid(CrystalModel((30, 30, 30, 90, 90, 90)), ndiv=3, hkl_max=(2, 2, 2))
    h = np.array([0.0, 2.49, 2.51, -2.51, np.nan, 0.0])  # edge voxel spans to 2.5
    k = np.array([0.0, 0.0, 0.0, 0.0, 0.0, np.inf])
    ids = g.voxel_ids(h, k, np.zeros_like(h))
    assert (ids[:2] >= 0).all() and (ids[2:] == -1).all()


def test_resolution_bounds_hold_the_whole_sphere_for_a_triclinic_cell():
    cell = (26.75, 31.31, 33.67, 88.69, 71.53, 68.14)  # the nanoBragg example cell
    from voxel_merger.synthetic import B_matrix

    g = build_grid(CrystalModel(cell), ndiv=3, d_min=2.0)
    rng = np.random.default_rng(2)
    v = rng.normal(size=(20000, 3))
    v *= (0.5 * rng.uniform(0, 1, size=(20000, 1)) ** (1 / 3)) / np.linalg.norm(v, axis=1, keepdims=True)
    hkl = v @ np.linalg.inv(B_matrix(cell)).T
    assert (g.voxel_ids(*hkl.T) >= 0).all()
    # |s| from the grid's metric equals |B h|
    np.testing.assert_allclose(g.s_of_hkl(hkl), np.linalg.norm(v, axis=1), rtol=1e-10)
    assert s_max_of_hkl(cell, *hkl.T) == pytest.approx(np.linalg.norm(v, axis=1).max(), rel=1e-10)


def test_average_cell_is_the_symmetrised_mean_metric():
    rng = np.random.default_rng(3)
    cells = []
    for _ in range(50):
        a = 57.8 * (1 + 0.003 * rng.normal())
        b = 57.8 * (1 + 0.003 * rng.normal())
        c = 150.3 * (1 + 0.003 * rng.normal())
        cells.append(CrystalModel((a, b, c, 90, 90, 90), "P 41 21 2"))
    avg, ops = average_crystal_model(cells)
    assert avg.space_group == "P 41 21 2"
    assert all(op.is_identity_op() for op in ops)
    a, b, c = avg.unit_cell[:3]
    assert a == pytest.approx(b, abs=1e-9)  # tetragonal constraint applied
    # independent reference: root-mean-square edges of the cells (the mean metric's diagonal)
    ref_c = np.sqrt(np.mean([m.unit_cell[2] ** 2 for m in cells]))
    ref_ab = np.sqrt(np.mean([m.unit_cell[0] ** 2 for m in cells] + [m.unit_cell[1] ** 2 for m in cells]))
    assert c == pytest.approx(ref_c, rel=1e-9)
    assert a == pytest.approx(ref_ab, rel=1e-9)
    assert abs(a - 57.8) < 0.1 and abs(c - 150.3) < 0.2


def test_reindexing_to_the_reference_setting_matches_cctbx_on_miller_indices():
    from cctbx.array_family import flex

    m = CrystalModel((40.0, 50.0, 60.0, 90.0, 90.0, 103.0), "P 1 1 21")  # c-unique monoclinic
    cb = reindex_to_reference(m)
    assert not cb.is_identity_op()
    M = hkl_change_of_basis_matrix(cb)
    rng = np.random.default_rng(4)
    H = rng.integers(-9, 10, size=(50, 3))
    ref = np.array(cb.apply(flex.miller_index([tuple(int(x) for x in r) for r in H])))
    np.testing.assert_allclose(H @ M, ref, atol=1e-12)
    avg, ops = average_crystal_model([m, m])
    assert avg.space_group == "P 1 21 1"
    # the reference-setting cell has the unique angle as beta
    assert avg.unit_cell[4] == pytest.approx(103.0) and avg.unit_cell[5] == pytest.approx(90.0)


def test_grid_round_trips_through_a_dict():
    g = build_grid(CrystalModel((30, 40, 50, 90, 95, 90), "P 1 21 1"), ndiv=5, d_min=3.0)
    assert GlobalGrid.from_dict(g.to_dict()) == g
    with pytest.raises(ValueError, match="odd"):
        build_grid(CrystalModel((30, 40, 50, 90, 90, 90)), ndiv=4, d_min=3.0)
