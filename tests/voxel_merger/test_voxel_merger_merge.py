"""Merging: symmetry against cctbx, outlier rejection, CC1/2, radial profile."""
import numpy as np
import pytest

from voxel_merger.core.accumulate import VoxelAccumulator, half_of_still
from voxel_merger.core.grid import CrystalModel, build_grid
from voxel_merger.core.merge import (AsuMapper, cc_half_by_shell, dense_map, intrinsic_spread, leave_one_out_terms,
                                     leave_one_out_z, leave_one_out_z_sums, merge_sums,
                                     radial_profile, symmetry_merge)
from voxel_merger.synthetic import synthetic_still


@pytest.mark.parametrize("space_group,cell", [
    ("P 41 21 2", (57.8, 57.8, 150.3, 90, 90, 90)),
    ("P 61 2 2", (40.0, 40.0, 90.0, 90, 90, 120)),
    ("C 1 2 1", (60.0, 40.0, 30.0, 90, 110, 90)),
])
def test_symmetry_merge_equals_cctbx_merge_equivalents(space_group, cell):
    """Integer hkl observations spread over symmetry equivalents: our weighted means == cctbx's."""
    from cctbx import crystal, miller, sgtbx
    from cctbx.array_family import flex

    cs = crystal.symmetry(unit_cell=cell, space_group_symbol=space_group)
    grid = build_grid(CrystalModel(cell, space_group), ndiv=1, d_min=6.0)
    rng = np.random.default_rng(0)
    base = miller.build_set(cs, anomalous_flag=False, d_min=6.5).indices()
    ops = list(sgtbx.space_group_info(space_group).group().build_derived_laue_group().all_ops())
    obs_h, I, sig = [], [], []
    for h in base:
        for _ in range(rng.integers(1, 5)):
            r = ops[rng.integers(len(ops))].r()
            obs_h.append(_apply(h, r))
            I.append(rng.normal(50, 10))
            sig.append(rng.uniform(1, 5))
    H = np.array(obs_h, dtype=float)
    I, sig = np.array(I), np.array(sig)
    acc = VoxelAccumulator(grid)
    acc.add(H[:, 0], H[:, 1], H[:, 2], I, sig)
    asu = VoxelAccumulator(grid)
    mapper = AsuMapper(grid, space_group)
    assert symmetry_merge(acc, asu, mapper) == 0
    ids = np.flatnonzero(asu.totals()[0] > 0)
    mean, sigma, count = merge_sums(asu.totals()[:, ids])
    ours = {tuple(int(x) for x in row): (m, s) for row, m, s in zip(grid.voxel_hkl_scaled(ids), mean, sigma)}
    ma = miller.array(miller.set(cs, flex.miller_index(obs_h), anomalous_flag=False),
                      data=flex.double(I), sigmas=flex.double(sig))
    merged = ma.merge_equivalents(use_internal_variance=False).array()  # sigma = 1/sqrt(sum w)
    assert merged.size() == len(ours)
    for h, d, s in zip(merged.indices(), merged.data(), merged.sigmas()):
        m, e = ours[tuple(h)]
        assert m == pytest.approx(d, rel=1e-10)
        assert e == pytest.approx(s, rel=1e-10)


def _apply(h, r):
    """h' = h · R for a cctbx rotation matrix (row vector convention of Miller indices)."""
    R = np.array(r.num()).reshape(3, 3)
    return tuple(int(x) for x in np.array(h) @ R)


@pytest.mark.parametrize("space_group", ["P 41 21 2", "P 3 2 1", "P 21 21 21"])
def test_fractional_voxels_map_inside_cctbx_asu_onto_an_equivalent(space_group):
    from cctbx import sgtbx

    cell = (50.0, 50.0, 70.0, 90, 90, 120) if "3" in space_group else (50.0, 50.0, 70.0, 90, 90, 90)
    grid = build_grid(CrystalModel(cell, space_group), ndiv=3, hkl_max=(3, 3, 3))
    mapper = AsuMapper(grid, space_group)
    ids = np.random.default_rng(1).choice(grid.n_voxels, 3000, replace=False)
    mapped = mapper(ids)
    ok = mapped >= 0
    assert ok.mean() > 0.9
    H = grid.voxel_hkl_scaled(ids[ok])
    A = grid.voxel_hkl_scaled(mapped[ok])
    laue = sgtbx.space_group_info(space_group).group().build_derived_laue_group()
    asu = sgtbx.reciprocal_space_asu(sgtbx.space_group_type(laue))
    rots = [np.array(op.r().num()).reshape(3, 3) for op in laue.all_ops()]
    for h, a in zip(H, A):
        assert asu.is_inside(tuple(int(x) for x in a))
        assert any((h @ R == a).all() for R in rots)


def test_symmetric_function_recovered_and_expanded_map_is_symmetric():
    sg, cell = "P 41 21 2", (30.0, 30.0, 45.0, 90, 90, 90)
    grid = build_grid(CrystalModel(cell, sg), ndiv=3, d_min=2.5)
    mapper = AsuMapper(grid, sg)
    rots = mapper.rotations

    def f_sym(h, k, l):  # invariant under the Laue group: sum of g over all equivalents
        ids = grid.voxel_ids(h, k, l)
        c = grid.voxel_hkl(np.maximum(ids, 0))
        out = np.zeros(len(c))
        for R in rots:
            e = c @ R
            out += np.cos(0.9 * e[:, 0] + 0.4 * e[:, 1]) + 0.1 * e[:, 2]
        return 100 + out

    rng = np.random.default_rng(2)
    stills = [synthetic_still(f"s{i}", cell, f_sym, rng, space_group=sg, n_side=80, pixel=1.0, sigma0=1.0)
              for i in range(8)]
    acc = VoxelAccumulator(grid)
    for s in stills:
        acc.add(s.h, s.k, s.l, s.intensity, s.sigma)
    asu = VoxelAccumulator(grid)
    symmetry_merge(acc, asu, mapper)
    mean, sigma, count = dense_map(asu, mapper)
    meas = np.flatnonzero(count.ravel() > 0)
    truth = f_sym(*grid.voxel_hkl(meas).T)
    z = (mean.ravel()[meas] - truth) / sigma.ravel()[meas]
    assert z.std() == pytest.approx(1.0, abs=0.06)
    # symmetry increased the multiplicity: more measured voxels than in P1
    p1 = dense_map(acc)[2]
    assert (count > 0).sum() > 3 * (p1 > 0).sum()
    # every equivalent of a measured voxel carries the same value
    H = grid.voxel_hkl_scaled(meas[:500])
    for R in rots:
        tgt = grid.ids_from_scaled_hkl(H @ R)
        ok = tgt >= 0
        np.testing.assert_array_equal(mean.ravel()[tgt[ok]], mean.ravel()[meas[:500]][ok])


@pytest.mark.parametrize("weighted", [False, True], ids=["w=1/sigma2", "w=exposure"])
def test_leave_one_out_z_against_direct_computation(weighted):
    """z of each observation against the weighted mean of the others and its propagated variance, computed directly."""
    rng = np.random.default_rng(3)
    I = rng.normal(10, 2, 6)
    sig = rng.uniform(0.5, 2, 6)
    w = rng.uniform(0.2, 1.0, 6) if weighted else 1 / sig ** 2
    if weighted:  # exposures: counts-like errors, above the Poisson floor m/w (tested separately below)
        sig = rng.uniform(8.0, 10.0, 6)
    b = 1.7
    Is, ss, ws = I / b, sig / b, b * w  # the scaled observations
    tot = np.array([[6.0] * 6, [ws.sum()] * 6, [(ws * Is).sum()] * 6, [(ws ** 2 * ss ** 2).sum()] * 6])
    z = leave_one_out_z(I, sig, tot, scale=b, weight=w if weighted else None)
    for i in range(6):
        o = np.arange(6) != i
        m = (ws[o] * Is[o]).sum() / ws[o].sum()
        var_m = (ws[o] ** 2 * ss[o] ** 2).sum() / ws[o].sum() ** 2
        assert z[i] == pytest.approx((Is[i] - m) / np.sqrt(ss[i] ** 2 + var_m), rel=1e-10)
    if weighted:  # a member that saw no photon (σ = 0): its variance is the Poisson one at the others' mean, m/w
        sig0 = sig.copy()
        sig0[0] = 0.0
        I0 = I.copy()
        I0[0] = 0.0
        ss0, Is0 = sig0 / b, I0 / b
        tot0 = np.array([[6.0] * 6, [ws.sum()] * 6, [(ws * Is0).sum()] * 6, [(ws ** 2 * ss0 ** 2).sum()] * 6])
        z0 = leave_one_out_z(I0, sig0, tot0, scale=b, weight=w)[0]
        o = np.arange(6) != 0
        m = (ws[o] * Is0[o]).sum() / ws[o].sum()
        var_m = (ws[o] ** 2 * ss0[o] ** 2).sum() / ws[o].sum() ** 2
        assert z0 == pytest.approx(-m / np.sqrt(m / ws[0] + var_m), rel=1e-10)


def _voxel_members(rng, rel_slope: float, n_voxels: int = 600, n_stills: int = 20, exposure: float = 200.0):
    """Members (4, n_voxels, n_stills) of voxels whose stills each sample their own slice of the voxel: a halo
    varying by ``rel_slope`` across it (0: flat), ~10^4 counts per still-voxel (counting error ~1 %)."""
    pos = rng.uniform(-0.5, 0.5, (n_voxels, n_stills))
    truth = 50.0 * (1.0 + rel_slope * pos)
    counts = rng.poisson(truth * exposure).astype(float)
    return np.stack([np.ones_like(counts), np.full_like(counts, exposure), counts, counts]), truth


def _z_and_spread(own):
    tot = own.sum(axis=2, keepdims=True) * np.ones_like(own[0])
    kappa = intrinsic_spread(*leave_one_out_terms(own, tot, poisson_floor=True))
    return leave_one_out_z_sums(own, tot, poisson_floor=True, intrinsic_rel=kappa), kappa, tot


def test_outlier_test_keeps_real_structure_within_a_voxel_and_catches_zingers():
    """Each still samples its own slice of a voxel; across a 1/3-cell voxel a diffuse halo can change ~2x, so at
    high counts the stills of one voxel differ by many counting sigmas for real. The spread the members show
    beyond counting is measured (robustly, by the median) and added to their errors: real structure is kept
    (counting errors alone rejected it, and biased a rendered sweep's map by 1.7 % at low resolution), a zinger
    (5x the voxel's mean) is still caught, and on a flat voxel the test stays a pure counting test."""
    rng = np.random.default_rng(7)
    own, truth = _voxel_members(rng, rel_slope=1.0)  # members from 0.5x to 1.5x of the voxel mean
    z, kappa, tot = _z_and_spread(own)
    assert 0.2 < kappa < 0.4, kappa  # uniform over +-0.5 of the mean: sd 0.29
    assert (np.abs(z) > 5.0).mean() < 1e-3
    z_counting = leave_one_out_z_sums(own, tot, poisson_floor=True)
    assert (np.abs(z_counting) > 5.0).mean() > 0.3  # what counting errors alone would have rejected
    zinger = own.copy()
    zinger[2, :, 0] += 5.0 * truth.mean(axis=1) * 200.0
    zinger[3, :, 0] = zinger[2, :, 0]
    z, kappa_z, _ = _z_and_spread(zinger)
    assert abs(kappa_z - kappa) < 0.05 * kappa  # a zinger in 1 of 20 members barely moves the estimate
    assert (np.abs(z[:, 0]) > 5.0).all() and (np.abs(z[:, 1:]) > 5.0).mean() < 1e-3
    flat, _ = _voxel_members(rng, rel_slope=0.0)
    assert _z_and_spread(flat)[1] < 0.005  # counting explains a flat voxel: no allowance, outliers at 5 sigma


def test_cc_half_tracks_signal_to_noise():
    grid = build_grid(CrystalModel((20.0, 20.0, 20.0, 90, 90, 90)), ndiv=1, d_min=1.5)
    rng = np.random.default_rng(4)
    n = grid.n_voxels
    signal = rng.normal(0, 1, n)
    ids = np.repeat(np.arange(n), 4)

    def cc(noise):
        acc = VoxelAccumulator(grid, n_halves=2)
        for half in (0, 1):
            I = signal[ids] + rng.normal(0, noise, ids.size)
            acc.add_ids(ids, I, np.full(ids.size, noise), half=half)
        return cc_half_by_shell(acc, grid, n_shells=5)

    strong, weak = cc(0.1), cc(2.0)
    assert strong["overall"] > 0.99
    # expected CC1/2 = var(signal) / (var(signal) + noise²/4 per half-mean) = 1/(1+1) = 0.5
    assert weak["overall"] == pytest.approx(0.5, abs=0.03)
    assert all(c is not None and c == pytest.approx(0.5, abs=0.1) for c in weak["cc_half"])
    assert sum(weak["n_voxels"]) == weak["n_voxels_total"]
    noise_only = VoxelAccumulator(grid, n_halves=2)
    for half in (0, 1):
        noise_only.add_ids(ids, rng.normal(0, 1, ids.size), np.ones(ids.size), half=half)
    assert abs(cc_half_by_shell(noise_only, grid)["overall"]) < 0.03


def test_radial_profile_of_a_radial_function():
    grid = build_grid(CrystalModel((25.0, 25.0, 25.0, 90, 90, 90)), ndiv=3, d_min=2.0)
    ids = np.arange(grid.n_voxels)
    s = grid.s_of_voxels(ids)
    acc = VoxelAccumulator(grid)
    acc.add_ids(ids, 10 * np.exp(-s), np.ones(ids.size))
    prof = radial_profile(acc, grid, n_bins=20)
    sc = np.array(prof["s_centres"])
    m = np.array([np.nan if v is None else v for v in prof["mean_intensity"]])
    ok = np.isfinite(m) & (sc > 0.1)
    np.testing.assert_allclose(m[ok], 10 * np.exp(-sc[ok]), rtol=0.03)


def test_half_split_is_deterministic_and_balanced():
    halves = [half_of_still(f"still_{i}", seed=7) for i in range(2000)]
    assert halves == [half_of_still(f"still_{i}", seed=7) for i in range(2000)]
    assert 0.45 < np.mean(halves) < 0.55


@pytest.mark.parametrize("symmetry", [None, "P 41 21 2"])
def test_outlier_rejection_removes_planted_outliers(symmetry):
    from voxel_merger.pipeline import accumulate_still

    sg, cell = "P 41 21 2", (30.0, 30.0, 45.0, 90, 90, 90)
    grid = build_grid(CrystalModel(cell, sg), ndiv=3, d_min=2.5)
    mapper = AsuMapper(grid, symmetry) if symmetry else None
    rng = np.random.default_rng(5)

    def const(h, k, l):
        return np.full(h.shape, 100.0)  # flat inside voxels: deviations are noise or outliers only

    stills = [synthetic_still(f"s{i}", cell, const, rng, space_group=sg, n_side=120, pixel=0.25, sigma0=1.0)
              for i in range(10)]
    planted = []
    for s in stills:
        bad = rng.random(s.n_obs) < 0.01
        s.intensity[bad] += 30.0  # +30 σ
        planted.append(bad)
    ref = VoxelAccumulator(grid)
    for s in stills:
        accumulate_still(s, grid, ref, mapper=mapper)
    ref2 = VoxelAccumulator(grid)
    for s in stills:
        accumulate_still(s, grid, ref2, mapper=mapper, reference=[ref], reject_sigma=5.0)
    clean = VoxelAccumulator(grid)
    n_rej = 0
    for s in stills:
        n_rej += accumulate_still(s, grid, clean, mapper=mapper, reference=[ref, ref2],
                                  reject_sigma=5.0)["n_rejected"]
    n_planted = sum(int(b.sum()) for b in planted)
    # nearly all planted outliers go (those alone or paired in a voxel cannot be judged), few clean ones do
    assert 0.9 * n_planted < n_rej < 1.05 * n_planted
    # judged voxels (>= 3 observations) no longer show the outliers
    m_ref, s_ref, c_ref = merge_sums(ref.totals())
    m_clean, s_clean, c_clean = merge_sums(clean.totals())
    judged = c_ref >= 3
    off_ref = int((np.abs(m_ref - 100) / s_ref > 5)[judged].sum())
    off_clean = int((np.abs(m_clean - 100) / s_clean > 5)[judged & (c_clean > 0)].sum())
    assert off_ref > 100 and off_clean <= 0.05 * off_ref, (off_ref, off_clean)


def test_stills_in_a_non_reference_setting_are_reindexed_onto_the_reference_grid():
    from voxel_merger.core.grid import hkl_change_of_basis_matrix, reindex_to_reference
    from voxel_merger.pipeline import MergeOptions, accumulate_still, define_grid

    cell_c = (30.0, 36.0, 42.0, 90.0, 90.0, 105.0)  # P 1 1 21: unique axis c
    M = hkl_change_of_basis_matrix(reindex_to_reference(CrystalModel(cell_c, "P 1 1 21")))

    def f_ref(h, k, l):  # planted in the reference (b-unique) setting, piecewise constant per voxel
        hr = np.round(3 * (np.stack([h, k, l], 1) @ M)) / 3
        return 100 + 20 * np.cos(hr[:, 0]) + 10 * np.sin(hr[:, 1] + 2 * hr[:, 2])

    rng = np.random.default_rng(8)
    stills = [synthetic_still(f"m{i}", cell_c, f_ref, rng, space_group="P 1 1 21", n_side=70, pixel=1.0,
                              sigma0=0.5) for i in range(4)]
    grid, info = define_grid(stills, MergeOptions(d_min=2.5))
    assert grid.space_group == "P 1 21 1" and info["n_reindexed"] == 4
    assert grid.unit_cell[4] == pytest.approx(105.0)
    acc = VoxelAccumulator(grid)
    for s in stills:
        accumulate_still(s, grid, acc)
    mean, sigma, count = merge_sums(acc.totals())
    ids = np.flatnonzero(count > 0)
    hr = grid.voxel_hkl(ids)
    truth = 100 + 20 * np.cos(hr[:, 0]) + 10 * np.sin(hr[:, 1] + 2 * hr[:, 2])
    z = (mean[ids] - truth) / sigma[ids]
    assert z.std() == pytest.approx(1.0, abs=0.1)


def test_mappers_of_one_grid_and_symmetry_share_their_memo_and_others_do_not():
    """A worker's merges of one run map each voxel once (the memo is shared per grid and symmetry); another
    symmetry or grid gets its own memo and its own, correct mapping (cctbx's, without any memo)."""
    cell = (50.0, 50.0, 70.0, 90, 90, 90)
    grid = build_grid(CrystalModel(cell, "P 41 21 2"), ndiv=3, hkl_max=(3, 3, 3))
    ids = np.random.default_rng(4).choice(grid.n_voxels, 2000, replace=False)
    a, b = AsuMapper(grid, "P 41 21 2"), AsuMapper(grid, "P 41 21 2")
    first = a(ids)
    assert b._memo_array() is a._memo_array()
    np.testing.assert_array_equal(b(ids), first)
    other = AsuMapper(grid, "P 2 2 2")  # Laue mmm: another ASU on the same grid
    mapped = other(ids)
    assert other._memo_array() is not a._memo_array()
    np.testing.assert_array_equal(mapped, other._map_ids(ids))
    assert (mapped != first).any()
    np.testing.assert_array_equal(AsuMapper(grid, "P 41 21 2")(ids), a._map_ids(ids))
