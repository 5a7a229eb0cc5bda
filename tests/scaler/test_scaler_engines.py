"""The fused numba kernels against the chunked numpy engine, and the bounded-memory data path
(chunked HDF5 read, in-place block reorder and outlier compaction) against the plain numpy versions."""
import numpy as np
import pytest

from scaler.artifacts import read_observations, stream_observations, write_observations
from scaler.core import kernels
from scaler.core.model import DiffuseScalingModel, compact_ids, outlier_mask
from scaler.core.refine import ObservationSet, ScalingProblem, SmootherSetup, count_per_index, reorder_for_locality
from scaler.core.smoother import GaussianSmoother1D
from scaler.pipeline import build_config, load_observation_set, observation_set_from_table

needs_numba = pytest.mark.skipif(not kernels.available(), reason="numba not importable: numpy engine only")


def _obs(n=30_000, N=23, G=700, seed=3, float32=False):
    rng = np.random.default_rng(seed)
    ft = np.float32 if float32 else np.float64
    s = rng.integers(0, N, n).astype(np.int32)
    g = rng.integers(0, G, n).astype(np.int32)
    q = rng.uniform(0.1, 0.5, n).astype(ft)
    inten = rng.gamma(3, 10, n).astype(ft)
    w = (1 / rng.uniform(1, 3, n) ** 2).astype(ft)
    w[::97] = 0.0  # some invalid observations
    return ObservationSet(s, g, q, inten, w, np.arange(N), G), rng


@needs_numba
@pytest.mark.parametrize("smoother,float32", [(False, False), (True, False), (False, True), (True, True)])
def test_kernel_engine_equals_numpy_engine(smoother, float32):
    obs, rng = _obs(float32=float32)
    sm = SmootherSetup(GaussianSmoother1D((0.1, 0.5), 5), n_q_bins=512) if smoother else None
    # 2 threads x 15000 observations exercises the per-thread accumulators
    pk = ScalingProblem(obs, sm, use_kernels=True, n_threads=2)
    pk._ranges = lambda: [(0, 15_000), (15_000, obs.n_obs)]
    pn = ScalingProblem(obs, sm, chunk=4099, use_kernels=False)
    assert pk.use_kernels and not pn.use_kernels
    if smoother:
        np.testing.assert_array_equal(pk.qbin, pn.qbin)
    b = rng.uniform(0.7, 1.3, obs.n_stills)
    c = rng.uniform(0.8, 1.2, 5) if smoother else None
    gb = pk.g_bins(c)
    ihk, vk = pk.reference(b, gb)
    ihn, vn = pn.reference(b, gb)
    np.testing.assert_allclose(ihk, ihn, rtol=1e-12)
    np.testing.assert_allclose(vk, vn, rtol=1e-12)
    if smoother:  # projection sums for other scales than the last reference pass: recomputed, not reused
        b2 = b * 1.1
        np.testing.assert_allclose(pk.normal_equations(b2, c, gb, ihn, vn, True)["Asc"],
                                   pn.normal_equations(b2, c, gb, ihn, vn, True)["Asc"], rtol=1e-10)
    for var, refine_b in ((None, True), (vn, True), (vn, False)):
        nk = pk.normal_equations(b, c, gb, ihn, var, refine_b)
        nn = pn.normal_equations(b, c, gb, ihn, var, refine_b)
        assert set(nk) == set(nn)
        for key in nn:
            np.testing.assert_allclose(nk[key], nn[key], rtol=1e-10, atol=1e-9 * np.max(np.abs(nn[key])), err_msg=key)
    assert pk.sum_abs_I == pytest.approx(pn.sum_abs_I, rel=1e-12)
    np.testing.assert_array_equal(pk.group_counts(), pn.group_counts())
    # outlier test: plant a few gross outliers
    ih = ihn.copy()
    ih[:5] *= 3
    np.testing.assert_array_equal(outlier_mask(pk, b, c, ih, vn, 4.0), outlier_mask(pn, b, c, ih, vn, 4.0))
    assert outlier_mask(pk, b, c, ih, vn, 4.0).sum() > 10


@needs_numba
@pytest.mark.parametrize("min_per_thread", [1 << 30, 1000])  # one range / two threads with their own offsets
def test_block_reorder_and_inplace_compaction_match_numpy(monkeypatch, min_per_thread):
    from scaler.core import refine as refine_mod

    split = refine_mod.split_ranges
    monkeypatch.setattr(refine_mod, "split_ranges", lambda n, nt, m=None: split(n, 2, min_per_thread))
    obs, rng = _obs(n=50_000, G=70_000)
    ref = ObservationSet(*(a.copy() for a in (obs.still_index, obs.group_index, obs.q, obs.intensity, obs.weight)),
                         obs.still_ids, obs.n_groups)
    out = reorder_for_locality(obs, block=1024, min_obs=0, inplace=True)
    assert out is obs
    monkeypatch.undo()
    monkeypatch.setattr(kernels, "available", lambda: False)
    expect = reorder_for_locality(ref, block=1024, min_obs=0, inplace=False)
    for name in ("still_index", "group_index", "q", "intensity", "weight"):
        np.testing.assert_array_equal(getattr(out, name), getattr(expect, name), err_msg=name)
    assert np.all(np.diff(out.group_index >> 10) >= 0)
    monkeypatch.undo()
    drop = rng.random(obs.n_obs) < 0.1
    sel = out.select(~drop)
    comp = out.drop_inplace(drop)
    for name in ("still_index", "group_index", "q", "intensity", "weight"):
        np.testing.assert_array_equal(getattr(comp, name), getattr(sel, name), err_msg=name)
    np.testing.assert_array_equal(count_per_index(comp.still_index, 23), np.bincount(sel.still_index, minlength=23))


@pytest.mark.parametrize("ids", [np.array([5, 3, 5, 9, 3, 1000]), np.array([-4, 7, 7, -4, 2]),
                                 np.array([2**40, 3, 2**40, 17], dtype=np.int64), np.arange(10, dtype=np.int32)[::-1],
                                 np.array([9, 2**63 + 5, 9], dtype=np.uint64), np.array([7, 3, 7], dtype=np.uint32),
                                 np.random.default_rng(0).integers(-1000, 500_000, 1_200_000)])  # 2 threads
def test_compact_ids_equals_unique(ids):
    idx, keys = compact_ids(ids)
    k2, i2 = np.unique(ids, return_inverse=True)
    np.testing.assert_array_equal(keys, k2)
    np.testing.assert_array_equal(idx, i2)
    assert idx.dtype == np.int32


def test_streamed_table_equals_whole_table_read(tmp_path, planted):
    """Chunked HDF5 read (tiny chunks, bad rows, int64 ids) gives the same indexed set as the whole-table path."""
    d = planted(n_stills=30, n_per_still=200, n_voxels=300, seed=5)
    sig = d["sigma"].copy()
    inten = d["intensity"].copy()
    sig[::53] = 0.0
    sig[7] = np.nan
    inten[11] = np.inf
    q = d["q_magnitude"].copy()
    q[13] = np.nan
    p = write_observations(tmp_path / "obs.h5", d["still_id"].astype(np.int64) + 2**33, d["voxel_id"] * 5 + 1, q,
                           inten, sig)
    old = observation_set_from_table({k: v for k, v in read_observations(p).items() if k != "still_names"})
    st = stream_observations(p, chunk=777)
    assert st["still_id"].dtype == np.int64 and st["voxel_id"].dtype == np.int32
    assert st["q_range"] == (np.nanmin(q), np.nanmax(q))
    new, extra = load_observation_set(p, keep_q=True)
    for name in ("still_index", "group_index", "q", "intensity", "weight", "still_ids"):
        np.testing.assert_array_equal(getattr(new, name), getattr(old, name), err_msg=name)
    assert new.n_groups == old.n_groups
    assert (new.weight == 0).sum() == 6000 // 53 + 1 + 3  # sigma <= 0 rows, NaN sigma, inf I, NaN q
    no_q, _ = load_observation_set(p, keep_q=False)
    assert no_q.q is None
    np.testing.assert_array_equal(no_q.weight, old.weight)


def test_refinement_without_q_equals_refinement_with_q(planted):
    """Without a smoother |q| is not needed: dropping it changes nothing (kernels or numpy)."""
    d = planted(n_stills=40, n_per_still=300, n_voxels=400, seed=9)
    base, _ = compact_ids(d["voxel_id"])
    res = []
    for q in (d["q_magnitude"].copy(), None):
        obs = ObservationSet(d["still_id"].astype(np.int32), base.copy(), q, d["intensity"].copy(),
                             1 / d["sigma"] ** 2, np.arange(40), int(base.max()) + 1)
        model = DiffuseScalingModel(build_config(), still_ids=list(range(40)))
        refined, stats = model.refine_observation_set(obs, {}, reorder_inplace=True)
        res.append((np.array([refined[i]["multiplicative_scale"] for i in range(40)]), stats))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    assert res[0][1]["final_r_factor"] == res[1][1]["final_r_factor"]


@needs_numba
def test_refinement_same_with_both_engines_and_outlier_compaction(planted, monkeypatch):
    """End to end (smoother, planted outliers, rejection cycles): numba kernels + in-place compaction give the
    numpy engine's result with select() copies."""
    d = planted(n_stills=50, n_per_still=400, n_voxels=500, seed=13, resolution_factor=lambda q: np.exp(-2 * q * q),
                voxel_q_halfwidth=0.03)
    idx = np.random.default_rng(1).choice(d["intensity"].size, 40, replace=False)
    d["intensity"][idx] *= 8.0
    cfg = build_config(smoother=True, n_control_points=4, q_range=(0.1, 0.6))
    out = []
    for engine, inplace in (("numba", True), ("numpy", False)):
        monkeypatch.setenv("SCALER_KERNELS", engine)
        gidx, keys = compact_ids(d["voxel_id"])
        obs = ObservationSet(d["still_id"].astype(np.int32), gidx, d["q_magnitude"].copy(), d["intensity"].copy(),
                             1 / d["sigma"] ** 2, np.arange(50), len(keys))
        model = DiffuseScalingModel(cfg, still_ids=list(range(50)))
        refined, stats = model.refine_observation_set(obs, {"convergence_tolerance": 1e-8}, reorder_inplace=inplace)
        out.append((np.array([refined[i]["multiplicative_scale"] for i in range(50)]), model.smoother.values, stats))
    (bk, ck, sk), (bn, cn, sn) = out
    assert sk["n_outliers_rejected"] == sn["n_outliers_rejected"] >= 30
    assert sk["n_iterations"] == sn["n_iterations"]
    np.testing.assert_allclose(bk, bn, rtol=1e-9)
    np.testing.assert_allclose(ck, cn, rtol=1e-9)
    assert sk["final_r_factor"] == pytest.approx(sn["final_r_factor"], rel=1e-10)


def test_streamed_reader_refuses_bad_tables_naming_the_file(tmp_path):
    import h5py
    from diffractflow.formats import write_header
    from diffractflow.formats.observations import SCHEMA

    from scaler.artifacts import InputError

    n = 40
    good = dict(still_id=np.arange(n) % 4, voxel_id=np.arange(n) % 9, q_magnitude=np.linspace(0.1, 0.5, n),
                intensity=np.ones(n), sigma=np.ones(n))
    cases = {"floatids": dict(good, still_id=np.arange(n) * 0.5), "strings": dict(good, sigma=np.array([b"x"] * n)),
             "ragged": dict(good, sigma=np.ones(n - 1)), "twod": dict(good, intensity=np.ones((n // 2, 2))),
             "empty": {k: v[:0] for k, v in good.items()}}
    for name, cols in cases.items():
        p = tmp_path / f"{name}.h5"
        with h5py.File(p, "w") as f:
            write_header(f, schema=SCHEMA, version=1, producer="test")
            for k, v in cols.items():
                f[k] = v
        with pytest.raises(InputError, match=f"{name}.h5"):
            stream_observations(p)
    (tmp_path / "group.h5").write_bytes(b"")
    with h5py.File(tmp_path / "group.h5", "w") as f:
        write_header(f, schema=SCHEMA, version=1, producer="test")
        for k, v in good.items():
            f[k] = v
        del f["sigma"]
        f.create_group("sigma")
    with pytest.raises(InputError, match=r"group\.h5.*lacks dataset\(s\) \['sigma'\]"):
        stream_observations(tmp_path / "group.h5")
    p = tmp_path / "trunc.h5"
    write_observations(p, **good)
    p.write_bytes(p.read_bytes()[:1500])
    with pytest.raises(InputError, match="trunc.h5"):
        stream_observations(p)


@needs_numba
def test_q_bins_kernel_equals_bin_index_including_out_of_range():
    sm = SmootherSetup(GaussianSmoother1D((0.1, 0.5), 4), n_q_bins=700)
    q = np.concatenate([np.random.default_rng(2).uniform(0.0, 0.7, 5000), [0.1, 0.5, -1e30, 1e30, np.inf, -np.inf]])
    out = np.empty(q.size, dtype=np.int16)
    kernels.q_bins(q, sm.smoother.x0, sm.n_q_bins / (sm.smoother.x1 - sm.smoother.x0), sm.n_q_bins, out)
    np.testing.assert_array_equal(out, sm.bin_index(q))
