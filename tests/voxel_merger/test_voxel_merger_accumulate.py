"""Accumulation: planted function recovered, exact additivity, HDF5 backend == in-memory."""
import numpy as np
import pytest

from voxel_merger.core.accumulate import VoxelAccumulator, blocked_sums, half_of_still
from voxel_merger.core.grid import CrystalModel, build_grid
from voxel_merger.core.merge import merge_sums
from voxel_merger.storage import H5VoxelAccumulator
from voxel_merger.synthetic import synthetic_still

CELL = (20.0, 24.0, 28.0, 90.0, 90.0, 90.0)


def _grid(ndiv=3, d_min=2.0):
    return build_grid(CrystalModel(CELL, "P 21 21 21"), ndiv=ndiv, d_min=d_min)


def _stills(n, func, seed=0, n_side=90, **kw):
    rng = np.random.default_rng(seed)
    return [synthetic_still(f"s{i:03d}", CELL, func, rng, n_side=n_side, pixel=1.0, **kw) for i in range(n)]


def _reference_sums(grid, stills, scale_of=None, weight_of=None):
    """Brute-force reference: np.add.at over every observation (independent of bincount/blocking).

    An observation (I, σ, w) scaled by b is (I/b, σ/b, b·w), w = the given weight or 1/σ² of the
    unscaled σ; fields (count, Σw, Σw·I, Σw²σ²) of the scaled observation.
    """
    ref = np.zeros((4, grid.n_voxels))
    for s in stills:
        ids = grid.voxel_ids(s.h, s.k, s.l)
        w0 = 1.0 / s.sigma ** 2 if weight_of is None else weight_of[s.still_id]
        ok = (ids >= 0) & np.isfinite(s.intensity) & np.isfinite(s.sigma) & np.isfinite(w0)
        ok &= (s.sigma > 0) if weight_of is None else ((s.sigma >= 0) & (w0 > 0))
        b = 1.0 if scale_of is None else scale_of[s.still_id]
        I, sig, w = s.intensity[ok] / b, s.sigma[ok] / b, b * w0[ok]
        for f, v in enumerate((np.ones_like(w), w, w * I, w * w * sig * sig)):
            np.add.at(ref[f], ids[ok], v)
    return ref


def _centre_value(grid, func):
    def f(h, k, l):
        ids = grid.voxel_ids(h, k, l)
        c = grid.voxel_hkl(np.maximum(ids, 0))
        return np.where(ids >= 0, func(c[:, 0], c[:, 1], c[:, 2]), 0.0)
    return f


def smooth(h, k, l):
    return 100.0 + 30.0 * np.cos(2 * np.pi * h / 5.0) * np.sin(2 * np.pi * k / 7.0 + 0.3) + 5.0 * l


def test_piecewise_constant_function_is_recovered_with_correct_errors():
    grid = _grid()
    stills = _stills(12, _centre_value(grid, smooth), seed=1, sigma0=2.0)
    acc = VoxelAccumulator(grid)
    for s in stills:
        acc.add(s.h, s.k, s.l, s.intensity, s.sigma, still_id=s.still_id)
    mean, sigma, count = merge_sums(acc.totals())
    m = count >= 1
    assert m.sum() > 5000
    truth = smooth(*grid.voxel_hkl(np.flatnonzero(m)).T)
    np.testing.assert_allclose(sigma[m], 2.0 / np.sqrt(count[m]), rtol=1e-12)
    z = (mean[m] - truth) / sigma[m]
    assert abs(z.mean()) < 0.05
    assert z.std() == pytest.approx(1.0, abs=0.05)  # errors are right, not just small
    assert acc.n_obs == sum(int((grid.voxel_ids(s.h, s.k, s.l) >= 0).sum()) for s in stills)


from voxel_merger.core import kernels

KERNELS = [dict(kernel="vector", use_torch=True), dict(kernel="vector", use_torch=False)]
if kernels.available():  # the fused loop exists only where numba imports; the vector paths always run
    KERNELS.append(dict(kernel="numba"))


@pytest.mark.parametrize("with_weight", [False, True], ids=["w=1/sigma2", "w=exposure"])
@pytest.mark.parametrize("kw", KERNELS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_sums_equal_a_brute_force_reference(kw, with_weight):
    grid = _grid()
    stills = _stills(4, smooth, seed=2, sigma0=3.0)
    scale_of = {s.still_id: 1.0 + 0.25 * i for i, s in enumerate(stills)}
    rng = np.random.default_rng(12)
    weight_of = {} if with_weight else None
    acc = VoxelAccumulator(grid, **kw)
    by_ids = VoxelAccumulator(grid, **kw)
    for s in stills:
        # a few invalid observations must be skipped identically by every path
        I = s.intensity.copy()
        I[::97] = np.nan
        sig = s.sigma.copy()
        sig[5::101] = 0.0  # invalid with w = 1/σ², valid (zero counts) with a stored weight
        sig[7::131] = -1.0
        w = None
        if with_weight:
            w = rng.uniform(0.3, 1.0, I.size)
            w[11::113] = 0.0
            w[13::127] = np.inf
            weight_of[s.still_id] = w
        acc.add(s.h, s.k, s.l, I, sig, scale=scale_of[s.still_id], weight=w)
        by_ids.add_ids(grid.voxel_ids(s.h, s.k, s.l), I, sig, scale=np.full(I.size, scale_of[s.still_id]), weight=w)
        s.intensity, s.sigma = I, sig
    ref = _reference_sums(grid, stills, scale_of, weight_of)
    np.testing.assert_allclose(acc.totals(), ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(by_ids.totals(), ref, rtol=1e-12, atol=1e-300)
    assert acc.n_obs == by_ids.n_obs == int(ref[0].sum())
    assert acc.n_dropped == sum(s.n_obs for s in stills) - acc.n_obs
    if with_weight:  # zero-σ observations were kept
        assert acc.n_obs > sum(int(((grid.voxel_ids(s.h, s.k, s.l) >= 0) & (s.sigma > 0) & np.isfinite(s.intensity)
                                     & (weight_of[s.still_id] > 0) & np.isfinite(weight_of[s.still_id])).sum())
                               for s in stills)


def _assert_sums_close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())


def test_merge_of_parts_equals_merge_of_the_whole_in_any_order_and_partition():
    grid = _grid()
    stills = _stills(6, smooth, seed=3, sigma0=1.5)
    whole = VoxelAccumulator(grid)
    for s in stills:
        whole.add(s.h, s.k, s.l, s.intensity, s.sigma, still_id=s.still_id)
    # one accumulator per still, combined in reverse order with +
    parts = []
    for s in stills:
        a = VoxelAccumulator(grid)
        a.add(s.h, s.k, s.l, s.intensity, s.sigma, still_id=s.still_id)
        parts.append(a)
    total = parts[-1]
    for p in reversed(parts[:-1]):
        total = total + p
    _assert_sums_close(total.sums, whole.sums)
    assert sorted(total.still_ids) == sorted(whole.still_ids)
    # all observations pooled, shuffled and cut into uneven chunks
    rng = np.random.default_rng(0)
    cols = [np.concatenate([getattr(s, c) for s in stills]) for c in ("h", "k", "l", "intensity", "sigma")]
    perm = rng.permutation(cols[0].size)
    cols = [c[perm] for c in cols]
    shuffled = VoxelAccumulator(grid)
    cuts = np.sort(rng.integers(0, cols[0].size, 7))
    for piece in zip(*[np.split(c, cuts) for c in cols]):
        shuffled.add(*piece)
    _assert_sums_close(shuffled.sums, whole.sums)


def test_blocked_and_dense_scatter_paths_agree():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 100_000, 30_000)
    w = rng.random(30_000)
    dense = np.bincount(ids, weights=w, minlength=100_000)
    out = np.zeros(100_000)
    for blk, length, (part,) in blocked_sums(ids, [w], shift=12):
        out[blk << 12:(blk << 12) + length] += part
    np.testing.assert_allclose(out, dense, rtol=1e-13)


@pytest.mark.parametrize("kw", KERNELS, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
@pytest.mark.parametrize("with_weight", [False, True], ids=["w=1/sigma2", "w=exposure"])
def test_per_still_scale_applied_to_sums_equals_scaling_the_observations(kw, with_weight):
    """Scale after the fact (on the sums) == scale at accumulation == observations (I/b, σ/b, b·w)."""
    grid = _grid()
    s = _stills(1, smooth, seed=4, sigma0=2.0, scale=2.5)[0]
    w = np.random.default_rng(1).uniform(0.2, 1.0, s.n_obs) if with_weight else None
    direct = VoxelAccumulator(grid, **kw)
    direct.add(s.h, s.k, s.l, s.intensity, s.sigma, scale=2.5, weight=w)
    raw = VoxelAccumulator(grid, **kw)
    raw.add(s.h, s.k, s.l, s.intensity, s.sigma, weight=w)
    _assert_sums_close(raw.scaled(2.5).sums, direct.sums)
    manual = VoxelAccumulator(grid, **kw)
    w0 = 1.0 / s.sigma ** 2 if w is None else w
    manual.add(s.h, s.k, s.l, s.intensity / 2.5, s.sigma / 2.5, weight=2.5 * w0)
    _assert_sums_close(direct.sums, manual.sums)
    # the merged means and errors are those of the scaled observations, whatever the path
    m_d, s_d, _ = merge_sums(direct.totals())
    m_r, s_r, _ = merge_sums(raw.totals())
    ok = np.isfinite(m_d)
    np.testing.assert_allclose(m_d[ok], m_r[ok] / 2.5, rtol=1e-12)
    np.testing.assert_allclose(s_d[ok], s_r[ok] / 2.5, rtol=1e-12)


@pytest.mark.parametrize("cache_bytes", [64 * 1024, 1 << 30], ids=["blocked-tiny-cache", "dense-fast-path"])
def test_hdf5_backend_equals_in_memory_with_eviction_and_reopen(tmp_path, cache_bytes):
    grid = _grid()
    stills = _stills(5, smooth, seed=6, sigma0=2.0)
    mem = VoxelAccumulator(grid, n_halves=2)
    # tiny blocks and a tiny cache force many evictions and reloads; a big cache takes the dense path
    with H5VoxelAccumulator(tmp_path / "acc.h5", grid, n_halves=2, mode="w", cache_bytes=cache_bytes,
                            block_shift=12, buffer_obs=5000) as h5:
        assert (h5._dense is None) == (cache_bytes < 1 << 20)
        for s in stills:
            half = half_of_still(s.still_id)
            mem.add(s.h, s.k, s.l, s.intensity, s.sigma, half=half, still_id=s.still_id)
            h5.add(s.h, s.k, s.l, s.intensity, s.sigma, half=half, still_id=s.still_id)
        assert h5.n_blocks > 20
    with H5VoxelAccumulator(tmp_path / "acc.h5", mode="r") as h5:
        back = h5.to_memory()
        assert h5.still_ids == mem.still_ids and h5.n_obs == mem.n_obs
        ids = np.flatnonzero(mem.totals()[0] > 0)[::7]
        _assert_sums_close(h5.gather(ids), mem.totals()[:, ids])
        stored = int(h5._nonempty.sum())
        assert stored < h5.n_blocks  # sparse: untouched blocks were never written
    _assert_sums_close(back.sums, mem.sums)
    # reopening for append continues where the file left off
    extra = stills[0]
    with H5VoxelAccumulator(tmp_path / "acc.h5", mode="a", cache_bytes=cache_bytes) as h5:
        h5.add(extra.h, extra.k, extra.l, extra.intensity, extra.sigma, half=1)
    mem.add(extra.h, extra.k, extra.l, extra.intensity, extra.sigma, half=1)
    with H5VoxelAccumulator(tmp_path / "acc.h5", mode="r") as h5:
        _assert_sums_close(h5.to_memory().sums, mem.sums)
        assert h5.n_obs == mem.n_obs


@pytest.mark.parametrize("with_weight", [False, True], ids=["w=1/sigma2", "w=exposure"])
def test_hdf5_partials_merge_like_in_memory_parts(tmp_path, with_weight):
    """Scale after the fact on HDF5 partials (blocked backend) == scale at accumulation in memory."""
    grid = _grid()
    stills = _stills(4, smooth, seed=7, sigma0=1.0)
    rng = np.random.default_rng(3)
    mem = VoxelAccumulator(grid, n_halves=2)
    with H5VoxelAccumulator(tmp_path / "merged.h5", grid, n_halves=2, mode="w", cache_bytes=128 * 1024,
                            block_shift=12) as merged:
        for i, s in enumerate(stills):
            w = rng.uniform(0.3, 1.0, s.n_obs) if with_weight else None
            b = 1.7 + 0.2 * i
            with H5VoxelAccumulator(tmp_path / f"p{i}.h5", grid, mode="w", cache_bytes=64 * 1024,
                                    block_shift=12) as p:
                assert p._dense is None
                p.add(s.h, s.k, s.l, s.intensity, s.sigma, still_id=s.still_id, weight=w)
            with H5VoxelAccumulator(tmp_path / f"p{i}.h5", mode="r") as p:
                merged.merge(p, scale=b, half=i % 2)
            mem.add(s.h, s.k, s.l, s.intensity, s.sigma, half=i % 2, scale=b, still_id=s.still_id, weight=w)
        _assert_sums_close(merged.to_memory().sums, mem.sums)


def test_bad_observations_are_dropped_and_counted():
    grid = _grid()
    acc = VoxelAccumulator(grid)
    h = np.array([0.0, 0.0, 0.0, 0.0, 99.0])
    I = np.array([1.0, np.nan, 1.0, 1.0, 1.0])
    sig = np.array([1.0, 1.0, 0.0, -1.0, 1.0])
    assert acc.add(h, h * 0, h * 0, I, sig) == 1
    assert acc.n_dropped == 4
    with pytest.raises(ValueError, match="same shape"):
        acc.add_ids(np.zeros(3, dtype=np.int64), np.zeros(2), np.ones(3))
