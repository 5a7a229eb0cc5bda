"""Sparse single-still partials (accumulator version 3): the sums an accumulate job writes equal a brute-force
per-voxel sum of the still's observations, the merge gives the same map from sparse and from blocked (version 2)
partials, and a sparse file is read-only."""
import h5py
import numpy as np
import pytest

from diffractflow.formats import accumulator as accumulator_format
from voxel_merger.artifacts import write_still
from voxel_merger.core.accumulate import VoxelAccumulator
from voxel_merger.core.grid import CrystalModel, GlobalGrid
from voxel_merger.pipeline import MergeOptions, accumulate_one, accumulate_still, merge_partials
from voxel_merger.artifacts import open_still
from voxel_merger.storage import H5VoxelAccumulator

CELL = (30.0, 30.0, 40.0, 90.0, 90.0, 90.0)


def _still(path, still_id, rng, n=3000):
    """Observations over a small grid's box and beyond it, with unusable rows (NaN, zero or negative weight)."""
    hkl = rng.uniform(-2.6, 2.6, (n, 3))
    I = rng.gamma(2.0, 3.0, n) - 1.0  # some negative net intensities, as background subtraction gives
    sig = rng.uniform(0.5, 2.0, n)
    w = rng.uniform(0.2, 1.0, n)
    sig[:5] = np.nan
    w[5:10] = 0.0
    w[10:12] = -1.0
    I[12:14] = np.inf
    sig[14:20] = 0.0  # zero counts: sigma 0 with an exposure weight is usable
    write_still(path, still_id, *hkl.T, I, sig, weight=w, crystal=CrystalModel(CELL, "P 1"))
    return hkl, I, sig, w


def _brute_force(grid, hkl, I, sig, w, s_max):
    """Per-voxel (count, Σw, Σw·I, Σw²σ²) by a plain loop over the observations."""
    out = {}
    nd = grid.ndiv
    for (h, k, l), x, s, wt in zip(hkl, I, sig, w):
        if not (np.isfinite(x) and np.isfinite(s) and s >= 0 and np.isfinite(wt) and wt > 0):
            continue
        idx = [int(np.floor(v * nd + 0.5)) - lo for v, lo in zip((h, k, l), grid.lo)]
        if not all(0 <= i < n for i, n in zip(idx, grid.shape)):
            continue
        vid = (idx[0] * grid.shape[1] + idx[1]) * grid.shape[2] + idx[2]
        if s_max is not None and grid.s_of_voxels(np.array([vid]))[0] > s_max:
            continue
        acc = out.setdefault(vid, [0.0, 0.0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += wt
        acc[2] += wt * x
        acc[3] += wt * wt * s * s
    ids = np.array(sorted(out), dtype=np.int64)
    return ids, np.array([out[i] for i in ids]).T.reshape(4, -1)


@pytest.mark.parametrize("chunk", [1 << 22, 700])  # one chunk, and a still read in several chunks
def test_sparse_partial_holds_the_brute_force_sums(tmp_path, chunk):
    grid = GlobalGrid(ndiv=3, lo=(-7, -7, -7), shape=(15, 15, 15), unit_cell=CELL)
    rng = np.random.default_rng(11)
    obs = _still(tmp_path / "s.h5", "img_0001.cbf#0", rng)
    d_min = 15.0  # |s| <= 1/15: cuts the box's corners
    info = accumulate_one(tmp_path / "s.h5", grid, tmp_path / "p.h5", MergeOptions(d_min=d_min, chunk=chunk))
    ids_ref, sums_ref = _brute_force(grid, *obs, s_max=1 / d_min)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        assert f["accumulator"].attrs["schema_version"] == 3
        ids, sums = f["accumulator/voxel_ids"][()], f["accumulator/sums"][()]
    np.testing.assert_array_equal(ids, ids_ref)
    np.testing.assert_allclose(sums[:, 0], sums_ref, rtol=1e-12)
    assert info["n_used"] == int(sums_ref[0].sum()) and info["n_beyond_d_min"] > 0
    with H5VoxelAccumulator(tmp_path / "p.h5", mode="r") as acc:  # dense readers see the same sums
        assert acc.still_ids == ["img_0001.cbf#0"] and acc.n_obs == info["n_used"]
        assert acc.n_obs + acc.n_dropped == len(obs[0])
        dense = acc.read_range(0, grid.n_voxels)[:, 0]
        np.testing.assert_allclose(dense[:, ids_ref], sums_ref, rtol=1e-12)
        assert np.count_nonzero(dense[0]) == ids_ref.size
        blocks = {start: np.array(s) for start, s in acc.iter_blocks()}
        assert sum(int(np.count_nonzero(s[0])) for s in blocks.values()) == ids_ref.size
        assert acc.get_meta("weighting") == "exposure"


@pytest.mark.parametrize("path", ["kernel", "no numba", "grid too large for the slot map"])
def test_sparse_partial_equals_the_streaming_accumulator_bit_for_bit(tmp_path, monkeypatch, path):
    """The accumulate job's sums are exactly those of the dense in-memory accumulator (same order of addition)."""
    from voxel_merger.core import accumulate

    if path == "no numba":
        monkeypatch.setattr(accumulate.kernels, "available", lambda: False)
    elif path != "kernel":
        monkeypatch.setattr(accumulate, "SLOT_MAP_MAX_VOXELS", 100)
    grid = GlobalGrid(ndiv=3, lo=(-7, -7, -7), shape=(15, 15, 15), unit_cell=CELL)
    _still(tmp_path / "s.h5", "a", np.random.default_rng(5), n=20000)
    accumulate_one(tmp_path / "s.h5", grid, tmp_path / "p.h5", MergeOptions(d_min=15.0))
    dense = VoxelAccumulator(grid, 1)
    with open_still(tmp_path / "s.h5") as src:
        accumulate_still(src, grid, dense, s_max=1 / 15.0)
    with H5VoxelAccumulator(tmp_path / "p.h5", mode="r") as acc:
        ids, sums = acc.sparse()
        assert acc.n_obs == dense.n_obs and acc.n_dropped == dense.n_dropped
    want = dense.sums[:, 0]
    np.testing.assert_array_equal(ids, np.flatnonzero(want[0] > 0))
    np.testing.assert_array_equal(sums[:, 0], want[:, ids])


def test_merge_of_sparse_and_blocked_partials_is_the_same_map(tmp_path):
    """Old (version 2, blocked) partials stay readable: a run mixing them with new ones merges to the same map."""
    grid = GlobalGrid(ndiv=3, lo=(-7, -7, -7), shape=(15, 15, 15), unit_cell=CELL, space_group="P 1")
    rng = np.random.default_rng(2)
    sparse, blocked = [], []
    for i in range(4):
        still = tmp_path / f"s{i}.h5"
        _still(still, f"img_{i:04d}.cbf#0", rng)
        sparse.append(tmp_path / f"sparse{i}.h5")
        accumulate_one(still, grid, sparse[-1], MergeOptions())
        blocked.append(tmp_path / f"blocked{i}.h5")
        with H5VoxelAccumulator(blocked[-1], grid, mode="w", block_shift=6) as acc, open_still(still) as src:
            accumulate_still(src, grid, acc)
            acc.set_meta("weighting", "exposure")
        with h5py.File(blocked[-1], "r") as f:
            assert f["accumulator"].attrs["schema_version"] == 2
    opt = MergeOptions(symmetry="P 1", reject_sigma=3.0, reject_min_count=3)
    _, a = merge_partials(sparse, tmp_path / "m_sparse", opt)
    _, b = merge_partials(blocked[:2] + sparse[2:], tmp_path / "m_mixed", opt)
    with h5py.File(tmp_path / "m_sparse" / "map.h5", "r") as fa, h5py.File(tmp_path / "m_mixed" / "map.h5", "r") as fb:
        ia, ib = fa["entry/map/intensity"][()], fb["entry/map/intensity"][()]
    assert np.isfinite(ia).sum() > 100
    np.testing.assert_array_equal(np.isfinite(ia), np.isfinite(ib))
    np.testing.assert_allclose(ia[np.isfinite(ia)], ib[np.isfinite(ib)], rtol=1e-12)
    assert a["n_observations"] == b["n_observations"]


def test_sparse_partial_is_read_only_and_checked(tmp_path):
    grid = GlobalGrid(ndiv=3, lo=(-7, -7, -7), shape=(15, 15, 15), unit_cell=CELL)
    _still(tmp_path / "s.h5", "a", np.random.default_rng(1))
    p = tmp_path / "p.h5"
    accumulate_one(tmp_path / "s.h5", grid, p, MergeOptions())
    with pytest.raises(ValueError, match="read only"):
        H5VoxelAccumulator(p, mode="a")
    with h5py.File(p, "a") as f:
        del f["accumulator/voxel_ids"]
    with h5py.File(p, "r") as f, pytest.raises(Exception, match=r"p\.h5.*lacks \['voxel_ids'\]"):
        accumulator_format.check(p, f["accumulator"], [])


def test_merge_without_figures_writes_the_same_map_and_no_pngs(tmp_path):
    grid = GlobalGrid(ndiv=3, lo=(-7, -7, -7), shape=(15, 15, 15), unit_cell=CELL, space_group="P 1")
    rng = np.random.default_rng(4)
    parts = []
    for i in range(3):
        _still(tmp_path / f"s{i}.h5", f"img_{i:04d}.cbf#0", rng)
        parts.append(tmp_path / f"p{i}.h5")
        accumulate_one(tmp_path / f"s{i}.h5", grid, parts[-1], MergeOptions())
    with_figs, _ = merge_partials(parts, tmp_path / "a", MergeOptions(symmetry="P 1"))
    without, _ = merge_partials(parts, tmp_path / "b", MergeOptions(symmetry="P 1", figures=False))
    assert any(str(p).endswith(".png") for p in with_figs.values())
    assert not any(str(p).endswith(".png") for p in without.values()) and not list((tmp_path / "b").glob("*.png"))
    with h5py.File(with_figs["map"], "r") as fa, h5py.File(without["map"], "r") as fb:
        np.testing.assert_array_equal(fa["entry/map/intensity"][()], fb["entry/map/intensity"][()])
