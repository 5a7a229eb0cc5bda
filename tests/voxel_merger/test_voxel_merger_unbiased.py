"""Unbiased merging at real count levels: exposure weights, propagated errors, still-voxel outlier rejection.

Ground truth is planted: Poisson counts drawn with numpy from a known mean, per-pixel exposure
(1/correction) varying over a factor ~3 and per-still scales, turned into the extractor's
(I, σ, exposure) as documented there: I = net counts / exposure, σ² = counts / exposure².
"""
import json
import logging

import h5py
import numpy as np
import pytest

from voxel_merger.core.accumulate import VoxelAccumulator
from voxel_merger.core.grid import CrystalModel, GlobalGrid, build_grid, grid_from_spec
from voxel_merger.core.merge import merge_sums

N_VOX, N_STILLS, N_PIX = 2000, 10, 20  # voxels, stills, pixels per voxel and still


def _grid_of(n):
    return GlobalGrid(1, (0, 0, 0), (n, 1, 1), (50.0, 50.0, 50.0, 90, 90, 90))


def _draw(rng, mu, n_vox=N_VOX):
    """Per still: voxel ids, raw counts, exposures, the still's scale; truth J with mean counts/pixel = mu."""
    scales = np.exp(rng.normal(0, 0.3, N_STILLS))
    e = [rng.uniform(0.5, 1.5, n_vox * N_PIX) for _ in range(N_STILLS)]  # factor 3, like solid angle x polarisation
    J = mu / (np.mean(scales) * 1.0)  # mean exposure 1
    ids = np.repeat(np.arange(n_vox), N_PIX)
    raw = [rng.poisson(scales[s] * J * e[s]) for s in range(N_STILLS)]
    return ids, raw, e, scales, J


@pytest.mark.parametrize("mu", [0.5, 2.0, 5.0, 30.0])
def test_exposure_weighted_merge_is_unbiased_at_low_counts(mu):
    rng = np.random.default_rng(int(mu * 10))
    ids, raw, e, scales, J = _draw(rng, mu)
    grid = _grid_of(N_VOX)
    acc = VoxelAccumulator(grid)
    for s in range(N_STILLS):
        I = raw[s] / e[s]
        sig = np.sqrt(raw[s]) / e[s]  # zero counts -> sigma 0: valid with a stored weight
        acc.add_ids(ids, I, sig, scale=scales[s], weight=e[s])
    mean, sigma, count = merge_sums(acc.totals())
    assert (count == N_STILLS * N_PIX).all()
    # the estimator Σraw / Σ(b e) of each voxel has variance J / Σ(b e) (Poisson): tolerance 4σ of the average
    sum_be = sum(np.bincount(ids, weights=scales[s] * e[s], minlength=N_VOX) for s in range(N_STILLS))
    se = np.sqrt(np.sum(J / sum_be)) / N_VOX
    assert abs(mean.mean() - J) < 4 * se, (mu, mean.mean() / J - 1, se / J)
    # the 1/σ² weighting with σ from each pixel's own counts (the extractor's floor of one count), in numpy:
    if mu == 5.0:
        num = np.zeros(N_VOX)
        den = np.zeros(N_VOX)
        for s in range(N_STILLS):
            I = raw[s] / e[s] / scales[s]
            var = np.maximum(raw[s], 1) / (e[s] * scales[s]) ** 2
            num += np.bincount(ids, weights=I / var, minlength=N_VOX)
            den += np.bincount(ids, weights=1 / var, minlength=N_VOX)
        biased = (num / den).mean() / J - 1
        assert biased < -0.10, biased


@pytest.mark.parametrize("mu", [2.0, 30.0])
def test_merged_sigma_matches_the_scatter_over_repeated_poisson_draws(mu):
    """σ = √(Σw²σ²)/Σw against the empirical standard deviation of the merged mean over 400 draws."""
    rng = np.random.default_rng(7)
    n_vox, reps = 5, 400
    scales = np.exp(rng.normal(0, 0.3, N_STILLS))
    e = [rng.uniform(0.5, 1.5, n_vox * N_PIX) for _ in range(N_STILLS)]
    J = mu / np.mean(scales)
    grid = _grid_of(n_vox * reps)
    acc = VoxelAccumulator(grid)
    base = np.repeat(np.arange(n_vox), N_PIX)
    for s in range(N_STILLS):
        for r in range(reps):  # each repetition is its own set of voxels, same exposures and scales
            raw = rng.poisson(scales[s] * J * e[s])
            acc.add_ids(base + r * n_vox, raw / e[s], np.sqrt(raw) / e[s], scale=scales[s], weight=e[s])
    mean, sigma, _ = merge_sums(acc.totals())
    mean, sigma = mean.reshape(reps, n_vox), sigma.reshape(reps, n_vox)
    empirical = mean.std(axis=0, ddof=1)
    reported = np.sqrt(np.mean(sigma ** 2, axis=0))
    np.testing.assert_allclose(reported / empirical, 1.0, atol=0.10)
    assert abs(mean.mean() / J - 1) < 0.01


def test_files_with_an_exposure_column_merge_to_pooled_counts(tmp_path):
    """Through the reader and `run`: a voxel's merged value is Σ net counts / Σ (b · exposure)."""
    from voxel_merger.artifacts import open_still, read_map, write_still
    from voxel_merger.pipeline import MergeOptions, run
    from voxel_merger.synthetic import synthetic_still

    cell = (20.0, 24.0, 28.0, 90.0, 90.0, 90.0)
    rng = np.random.default_rng(4)
    paths, per_still = [], []
    for i in range(3):
        s = synthetic_still(f"e{i}", cell, lambda h, k, l: np.full(h.shape, 3.0), rng, n_side=60, pixel=1.0)
        expo = rng.uniform(0.5, 1.5, s.n_obs)
        raw = rng.poisson(3.0 * expo).astype(float)
        paths.append(write_still(tmp_path / f"s{i}.h5", s.still_id, s.h, s.k, s.l, raw / expo, np.sqrt(raw) / expo,
                                 s.q_magnitude, s.crystal, weight=expo))
        per_still.append((s, raw, expo))
    with open_still(paths[0]) as st:
        assert st.has_weight
        np.testing.assert_allclose(next(iter(st.iter_chunks())).weight, per_still[0][2])
    out, stats = run(paths, tmp_path / "out", MergeOptions(d_min=3.0, backend="memory"))
    m = read_map(out["map"])
    grid = m.grid
    num = np.zeros(grid.n_voxels)
    den = np.zeros(grid.n_voxels)
    for s, raw, expo in per_still:
        ids = grid.voxel_ids(s.h, s.k, s.l)
        ok = ids >= 0
        num += np.bincount(ids[ok], weights=raw[ok], minlength=grid.n_voxels)
        den += np.bincount(ids[ok], weights=expo[ok], minlength=grid.n_voxels)
    meas = m.counts.ravel() > 0
    np.testing.assert_allclose(m.intensity.ravel()[meas], num[meas] / den[meas], rtol=1e-10)
    np.testing.assert_allclose(m.sigma.ravel()[meas], np.sqrt(num[meas]) / den[meas], rtol=1e-10)
    assert abs(np.nanmean(m.intensity) / 3.0 - 1) < 0.01


def test_extractor_file_without_exposure_falls_back_with_one_warning(tmp_path, caplog):
    from voxel_merger import artifacts
    from voxel_merger.artifacts import open_still

    rng = np.random.default_rng(2)
    for i in range(2):
        with h5py.File(tmp_path / f"x{i}.h5", "w") as f:
            f.attrs["schema"] = "diffractflow.diffuse_still"
            f.attrs["schema_version"] = 3
            px = f.create_group("entry").create_group("pixels")
            for n in ("h", "k", "l", "intensity"):
                px[n] = rng.normal(size=10).astype(np.float32)
            px["sigma"] = np.ones(10, np.float32)
    artifacts._warned_no_weight.clear()
    with caplog.at_level(logging.WARNING, logger="voxel_merger"):
        for i in range(2):
            with open_still(tmp_path / f"x{i}.h5") as st:
                assert not st.has_weight and next(iter(st.iter_chunks())).weight is None
    msgs = [r.getMessage() for r in caplog.records if "exposure" in r.getMessage()]
    assert len(msgs) == 1 and "x0.h5" in msgs[0] and "1/sigma^2" in msgs[0]


# ------------------------------------------------------------------ merge of partials: outliers, crystal, grid_spec
CELL = (30.0, 32.0, 36.0, 90.0, 90.0, 90.0)


@pytest.fixture(scope="module")
def partial_set(tmp_path_factory):
    """8 stills of a per-voxel constant truth (Poisson counts, exposures, scales); clean and corrupted partials."""
    from voxel_merger.artifacts import write_still
    from voxel_merger.pipeline import MergeOptions, accumulate_one
    from voxel_merger.synthetic import synthetic_still

    d = tmp_path_factory.mktemp("partials")
    grid = build_grid(CrystalModel((30.3, 32.3, 36.4, 90, 90, 90), "P 21 21 21"), 3, d_min=2.5)  # config cell, 1 % off

    def truth(h, k, l):
        c = grid.voxel_hkl(np.maximum(grid.voxel_ids(h, k, l), 0))
        return 500.0 + 200.0 * np.cos(c[:, 0]) * np.sin(c[:, 1] + c[:, 2])  # photons per unit exposure

    from scipy.spatial.transform import Rotation

    from voxel_merger.synthetic import random_rotation

    rng = np.random.default_rng(21)
    U0 = random_rotation(rng)  # nearby orientations (within ~1°), so many voxels hold >= 3 stills
    scales, planted, stills = {}, {}, []
    clean, bad = [], []
    for i in range(8):
        b = float(np.exp(rng.normal(0, 0.3)))
        s = synthetic_still(f"p{i:02d}", CELL, truth, rng, space_group="P 21 21 21", n_side=110, pixel=0.5,
                            sigma0=1.0, scale=b, cell_jitter=0.002,
                            U=Rotation.from_rotvec(rng.normal(0, 0.01, 3)).as_matrix() @ U0)
        expo = rng.uniform(0.5, 1.5, s.n_obs)
        raw = rng.poisson(b * truth(s.h, s.k, s.l) * expo).astype(float)  # counts, as the extractor sees them
        I, sig = raw / expo, np.sqrt(raw) / expo
        scales[s.still_id] = b
        stills.append(s)
        ids = grid.voxel_ids(s.h, s.k, s.l)
        occ = np.unique(ids[ids >= 0])
        hit = rng.choice(occ, size=len(occ) // 50, replace=False) if i % 3 == 0 else np.array([], dtype=np.int64)
        planted[s.still_id] = set(hit.tolist())
        I_bad = I.copy()
        I_bad[np.isin(ids, hit)] *= 1.6  # a still-voxel set 60 % too bright (e.g. an unmasked streak)
        for tag, inten, lst in (("clean", I, clean), ("bad", I_bad, bad)):
            p = write_still(d / f"{tag}_{i}.h5", s.still_id, s.h, s.k, s.l, inten, sig, s.q_magnitude, s.crystal,
                            weight=expo)
            out = d / f"{tag}_part_{i}.h5"
            accumulate_one(p, grid, out, MergeOptions())
            lst.append(out)
    (d / "scales.json").write_text(json.dumps(scales))
    return dict(dir=d, grid=grid, truth=truth, clean=clean, bad=bad, planted=planted, stills=stills)


def test_merge_partials_rejects_planted_still_voxels_and_leaves_clean_data(partial_set, tmp_path):
    from voxel_merger.artifacts import read_map, read_observation_table
    from voxel_merger.pipeline import MergeOptions, merge_partials
    from voxel_merger.storage import H5VoxelAccumulator

    P = partial_set
    opt = MergeOptions(reject_sigma=5.0)
    scales = P["dir"] / "scales.json"
    _, st_clean = merge_partials(P["clean"], tmp_path / "clean", opt, scales_path=scales)
    assert st_clean["n_rejected"] == 0 and st_clean["reject_sigma"] == 5.0
    _, st_bad = merge_partials(P["bad"], tmp_path / "bad", opt, scales_path=scales)
    _, st_off = merge_partials(P["bad"], tmp_path / "off", MergeOptions(), scales_path=scales)
    assert st_off["n_rejected"] == 0
    # planted still-voxels that can be judged: the voxel holds >= 3 stills
    n_stills = np.zeros(P["grid"].n_voxels)
    for p in P["clean"]:
        with H5VoxelAccumulator(p, mode="r") as a:
            n_stills += a.totals_range(0, P["grid"].n_voxels)[0] > 0
    judgeable = sum(int((n_stills[sorted(v)] >= 3).sum()) for v in P["planted"].values() if v)
    assert judgeable > 30
    assert judgeable <= st_bad["n_rejected"] <= sum(len(v) for v in P["planted"].values())
    assert st_bad["n_stills_with_rejections"] == 3
    # after rejection, the judged planted voxels carry the clean values again
    clean, bad, off = (read_map(tmp_path / t / "map.h5") for t in ("clean", "bad", "off"))
    planted_ids = np.array(sorted(set().union(*P["planted"].values())))
    sel = planted_ids[n_stills[planted_ids] >= 3]
    z_off = (off.intensity.ravel()[sel] - clean.intensity.ravel()[sel]) / clean.sigma.ravel()[sel]
    z_bad = (bad.intensity.ravel()[sel] - clean.intensity.ravel()[sel]) / clean.sigma.ravel()[sel]
    assert np.median(z_off) > 5 and np.median(np.abs(z_bad)) < 1.0, (np.median(z_off), np.median(np.abs(z_bad)))
    hkl = P["grid"].voxel_hkl(sel)
    assert np.median(np.abs(bad.intensity.ravel()[sel] / P["truth"](*hkl.T) - 1)) < 0.02
    # the scaler's table lost exactly the rejected rows
    t_bad = read_observation_table(tmp_path / "bad" / "observations.h5")
    t_off = read_observation_table(tmp_path / "off" / "observations.h5")
    assert t_off["intensity"].size - t_bad["intensity"].size == st_bad["n_rejected"]
    assert (t_bad["weight"] > 0).all()


def test_merge_partials_uses_the_average_refined_cell_for_resolution(partial_set, tmp_path):
    from voxel_merger.artifacts import read_map
    from voxel_merger.pipeline import MergeOptions, merge_partials

    P = partial_set
    _, stats = merge_partials(P["clean"], tmp_path / "m", MergeOptions(backend="memory"))
    cells = np.array([s.crystal.unit_cell for s in P["stills"]])
    np.testing.assert_allclose(stats["average_unit_cell"][:3], cells[:, :3].mean(axis=0), rtol=2e-4)
    assert abs(stats["average_unit_cell"][0] - P["grid"].unit_cell[0]) > 0.2  # not the configured cell
    m = read_map(tmp_path / "m" / "map.h5")
    np.testing.assert_allclose(m.grid.unit_cell, stats["average_unit_cell"], rtol=1e-12)
    assert m.grid.shape == P["grid"].shape and m.grid.lo == P["grid"].lo
    # |s| of the table rows is computed in the average cell
    from voxel_merger.artifacts import read_observation_table

    t = read_observation_table(tmp_path / "m" / "observations.h5")
    from cctbx import uctbx

    hkl = P["grid"].voxel_hkl(t["voxel_id"][:50])
    F = np.array(uctbx.unit_cell(tuple(stats["average_unit_cell"])).fractionalization_matrix()).reshape(3, 3)
    want = np.linalg.norm(hkl @ F, axis=1)  # s = B h with B = Fᵀ (cctbx's reciprocal basis)
    np.testing.assert_allclose(t["q_magnitude"][:50], want, rtol=1e-9)


def test_old_partials_are_refused_with_a_clear_message(partial_set, tmp_path):
    import shutil

    from voxel_merger.artifacts import InputError
    from voxel_merger.pipeline import MergeOptions, merge_partials

    old = tmp_path / "old.h5"
    shutil.copy(partial_set["clean"][0], old)
    with h5py.File(old, "a") as f:
        f["accumulator"].attrs["schema_version"] = "1.0"
    with pytest.raises(InputError, match=r"old\.h5.*schema version '1\.0'.*re-accumulate"):
        merge_partials([old], tmp_path / "o", MergeOptions())


def test_grid_from_spec_builds_the_reference_setting_grid_around_the_resolution_sphere():
    spec = {"unit_cell": [30.0, 36.0, 42.0, 90.0, 90.0, 105.0], "space_group": "P 1 1 21", "d_min": 3.0,
            "subdivisions": 3}
    g = grid_from_spec(spec)
    assert g.space_group == "P 1 21 1" and g.ndiv == 3
    assert sorted(g.unit_cell[:3]) == pytest.approx([30.0, 36.0, 42.0]) and g.unit_cell[4] == pytest.approx(105.0)
    # every point of the resolution sphere is on the grid (cctbx d-spacing of the reflections at d >= 3 Å)
    from cctbx import crystal, miller

    cs = crystal.symmetry(unit_cell=g.unit_cell, space_group_symbol=g.space_group)
    H = np.array(miller.build_set(cs, anomalous_flag=True, d_min=3.0).expand_to_p1().indices(), dtype=float)
    assert (g.voxel_ids(*H.T) >= 0).all()
    with pytest.raises(ValueError, match="d_min"):
        grid_from_spec({"unit_cell": [30, 30, 30, 90, 90, 90]})


def test_diffuse_extractor_artifact_merges_to_net_counts_over_exposure(tmp_path):
    """A real extractor artifact (schema v4, stored ``exposure``): each voxel's value is Σ(raw − background)/Σ exposure
    of the extractor's own table, i.e. the pooled counts, not a 1/σ²-weighted mean."""
    from diffuse_extractor import synthetic
    from diffuse_extractor.artifacts import write_still as write_extracted
    from diffuse_extractor.core.extract import ExtractionParams, extract_still

    from voxel_merger.artifacts import open_still, read_map
    from voxel_merger.pipeline import MergeOptions, run

    s = synthetic.render(synthetic.make_experiment())
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    path = write_extracted(tmp_path / "x.h5", res, s.experiment, parameters={}, inputs={})
    with open_still(path) as st:
        assert st.has_weight
    out, stats = run([path], tmp_path / "out", MergeOptions(backend="memory", reference_setting=False, d_min=2.0))
    m = read_map(out["map"])
    t = res.table
    ids = m.grid.voxel_ids(t["h"].astype(float), t["k"].astype(float), t["l"].astype(float))
    ok = ids >= 0
    net = np.bincount(ids[ok], weights=(t["raw"] - t["background"])[ok].astype(float), minlength=m.grid.n_voxels)
    expo = np.bincount(ids[ok], weights=t["exposure"][ok].astype(float), minlength=m.grid.n_voxels)
    meas = m.counts.ravel() > 0
    assert meas.sum() > 100
    np.testing.assert_allclose(m.intensity.ravel()[meas], net[meas] / expo[meas], rtol=1e-5,
                               atol=1e-6 * np.abs(net[meas] / expo[meas]).max())


@pytest.mark.parametrize("mode", ["observations", "partials"])
def test_outlier_rejection_keeps_zero_count_members_at_weak_signal(tmp_path, mode):
    """At 0.1 photon per pixel most pixels (and many still-voxels) see nothing, σ from their counts is 0;
    a 5σ test must not take them for outliers (that would bias the mean up): unbiased, ~nothing rejected."""
    from voxel_merger.core.sources import ArrayStill
    from voxel_merger.pipeline import MergeOptions, accumulate_still, merge_partials

    rng = np.random.default_rng(17)
    n_vox, n_pix, n_st, mu = 300, 40, 12, 0.1  # ~48 counts per voxel: a silent member is ~7σ from the others
    grid = _grid_of(n_vox)
    stills = []
    for s in range(n_st):
        e = rng.uniform(0.5, 1.5, n_vox * n_pix)
        raw = rng.poisson(mu * e)
        h = np.repeat(np.arange(n_vox), n_pix).astype(float)
        stills.append(ArrayStill(f"w{s}", h, 0 * h, 0 * h, raw / e, np.sqrt(raw) / e, weight=e))
    truth_se = np.sqrt(mu / (n_st * n_pix)) / np.sqrt(n_vox)  # per-voxel Poisson error, averaged over voxels
    if mode == "observations":
        ref = VoxelAccumulator(grid)
        for st in stills:
            accumulate_still(st, grid, ref, reference_setting=False)
        acc = VoxelAccumulator(grid)
        n_rej = sum(accumulate_still(st, grid, acc, reference=[ref], reject_sigma=5.0,
                                     reference_setting=False)["n_rejected"] for st in stills)
        mean = merge_sums(acc.totals())[0]
    else:
        from voxel_merger.storage import H5VoxelAccumulator
        from voxel_merger.artifacts import read_map

        parts = []
        for st in stills:
            with H5VoxelAccumulator(tmp_path / f"{st.still_id}.h5", grid, mode="w") as a:
                a.add(st.h, st.k, st.l, st.intensity, st.sigma, still_id=st.still_id, weight=st.weight)
                a.set_meta("weighting", "exposure")
            parts.append(tmp_path / f"{st.still_id}.h5")
        _, stats = merge_partials(parts, tmp_path / "m", MergeOptions(reject_sigma=5.0, write_table=False))
        n_rej = stats["n_rejected"]
        mean = read_map(tmp_path / "m" / "map.h5").intensity.ravel()
    n_members = n_st * n_vox * (n_pix if mode == "observations" else 1)
    assert n_rej < 1e-3 * n_members, n_rej
    assert abs(np.nanmean(mean) - mu) < 4 * truth_se, (np.nanmean(mean) / mu - 1)


def test_merge_can_leave_out_bragg_voxels_and_keeps_the_others(partial_set, tmp_path):
    """exclude_bragg_voxels empties exactly the integer-hkl voxels of the map and of the scaler's table, and leaves
    every other voxel's value unchanged."""
    from voxel_merger.artifacts import read_map, read_observation_table
    from voxel_merger.pipeline import MergeOptions, merge_partials

    P = partial_set
    scales = P["dir"] / "scales.json"
    with_b, _ = merge_partials(P["clean"], tmp_path / "all", MergeOptions(reject_sigma=5.0), scales_path=scales)
    without, st = merge_partials(P["clean"], tmp_path / "nob", MergeOptions(reject_sigma=5.0, exclude_bragg_voxels=True),
                                 scales_path=scales)
    assert st["bragg_voxels_excluded"] is True
    a, b = read_map(with_b["map"]), read_map(without["map"])
    ia, ib = np.asarray(a.intensity), np.asarray(b.intensity)
    hh, kk, ll = np.meshgrid(*(a.grid.axis(i) for i in range(3)), indexing="ij")
    integer = (np.abs(hh - np.rint(hh)) < 1e-6) & (np.abs(kk - np.rint(kk)) < 1e-6) & (np.abs(ll - np.rint(ll)) < 1e-6)
    measured = np.isfinite(ia) & (np.asarray(a.counts) > 0)
    assert (measured & integer).sum() > 50  # the case has Bragg voxels to leave out
    assert not np.any(np.isfinite(ib[integer]) & (np.asarray(b.counts)[integer] > 0))
    other = measured & ~integer
    np.testing.assert_allclose(ib[other], ia[other], rtol=1e-9)
    ta, tb = read_observation_table(with_b["observations"]), read_observation_table(without["observations"])
    assert 0 < len(tb["intensity"]) < len(ta["intensity"])
