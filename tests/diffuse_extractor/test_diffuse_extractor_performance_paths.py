"""The fast paths against straightforward references: static pixels, Ewald prefilter, geometry cache,
memory reuse, and the v2 artifact (derived and constant columns) read back by the voxel merger."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from diffuse_extractor import ExtractionParams, extract_still, synthetic
from diffuse_extractor.core import corrections as corr
from diffuse_extractor.core import extract as ex
from diffuse_extractor.core import geometry as geo
from diffuse_extractor.core import masks as mk


def _reference_static(det, beam, params, gonio=None):
    """Per-pixel q, |q| and multipliers from panel_geometry and the corrections module (float64)."""
    wl = beam.get_wavelength()
    s0 = np.asarray(beam.get_s0())
    mu_air = corr.air_attenuation_coefficient(wl, params.air_density_g_cm3) * params.air_path_fraction
    out = []
    for i, panel in enumerate(det):
        g = geo.panel_geometry(panel, i)
        ux, uy, uz = (c.ravel() / g.dist.ravel() for c in (g.lab_x, g.lab_y, g.lab_z))
        u = np.stack([ux, uy, uz])
        pol = corr.polarisation_correction(ux / wl, uy / wl, uz / wl, s0, beam.get_polarization_normal(),
                                           beam.get_polarization_fraction())
        eff = 1.0 / corr.detector_efficiency(g.cos_obliquity.ravel(), panel.get_mu(), panel.get_thickness())
        sa = corr.reference_solid_angle(det) / corr.solid_angle(g.pixel_area, g.dist.ravel(), g.cos_obliquity.ravel())
        air = corr.air_correction(g.dist.ravel(), mu_air)
        out.append(dict(u=u, pol=pol, eff=eff, sa=sa, air=air))
    return out


@pytest.mark.parametrize("parallax,tilt", [(True, 25.0), (False, 25.0), (True, 0.0)])
def test_static_pixels_match_the_direct_formulas(parallax, tilt):
    det = synthetic.make_detector(parallax=parallax, tilt_deg=tilt)
    beam = synthetic._beam(1.0, 0.9)
    params = ExtractionParams(air_path_fraction=0.7)
    fast = ex.static_pixels(det, beam, params)
    for pp, ref in zip(fast, _reference_static(det, beam, params)):
        assert geo.PanelFrame(pp.panel).flat_orthonormal  # the separable fast path was taken
        for name, mine in (("pol", pp.polarisation), ("eff", pp.efficiency), ("sa", pp.solid_angle),
                           ("air", pp.air)):
            np.testing.assert_allclose(mine, ref[name], rtol=2e-7, err_msg=name)  # float32 rounding
        np.testing.assert_allclose(pp.u, ref["u"], rtol=0, atol=1.2e-7)
        tot = ref["pol"] * ref["eff"] * ref["sa"] * ref["air"]
        np.testing.assert_allclose(pp.correction, tot, rtol=3e-7)
        assert np.ptp(ref["sa"]) > 0.01 and np.ptp(ref["pol"]) > 0.01


def test_non_orthogonal_panel_takes_the_general_path():
    det = synthetic.make_detector(parallax=True)
    p = det[1]
    f = np.asarray(p.get_fast_axis())
    s = np.asarray(p.get_slow_axis()) * np.cos(1e-9) + f * np.sin(1e-9)  # within dxtbx's orthogonality tolerance
    p.set_frame(tuple(f), tuple(s / np.linalg.norm(s)), p.get_origin())
    assert not geo.PanelFrame(p).flat_orthonormal
    beam = synthetic._beam(1.0, 0.9)
    params = ExtractionParams()
    mine = ex.static_pixels(det, beam, params)[1]
    ref = _reference_static(det, beam, params)[1]
    np.testing.assert_allclose(mine.polarisation, ref["pol"], rtol=3e-7)
    np.testing.assert_allclose(mine.solid_angle, ref["sa"], rtol=3e-7)


def _candidates_by_slabs(experiment, d_min, delpsi_max, margin=2.0):
    """The plain reference: test every (h, k, l) within d_min slab by slab."""
    A = np.asarray(experiment.crystal.get_A()).reshape(3, 3)
    s0 = np.asarray(experiment.beam.get_s0())
    a, b, c = experiment.crystal.get_unit_cell().parameters()[:3]
    hm, km, lm = (int(np.floor(x / d_min)) + 1 for x in (a, b, c))
    h, k = np.meshgrid(np.arange(-hm, hm + 1), np.arange(-km, km + 1), indexing="ij")
    h, k = h.ravel(), k.ravel()
    keep = []
    for l in range(-lm, lm + 1):
        hkl = np.stack([h, k, np.full_like(h, l)])
        q = A @ hkl
        qn = np.linalg.norm(q, axis=0)
        exc = np.abs(np.linalg.norm(q + s0[:, None], axis=0) - np.linalg.norm(s0))
        sel = (qn > 0) & (qn <= 1 / d_min) & (exc <= margin * delpsi_max * qn + 1e-12)
        keep.append(hkl[:, sel].T)
    return np.concatenate(keep)


@pytest.mark.parametrize("delpsi", [0.0015, 0.003, 0.03])
def test_ewald_prefilter_equals_the_slab_search(delpsi):
    e = synthetic.make_experiment()
    d_min = e.detector.get_max_resolution(e.beam.get_s0())
    ref = _candidates_by_slabs(e, d_min, delpsi)
    mine = mk.candidate_indices(e, d_min, delpsi)  # P1: nothing is absent
    assert len(ref) > 20
    np.testing.assert_array_equal(mine, ref)



def test_sys_absent_matches_cctbx_in_every_space_group():
    """The vectorised systematic-absence test gives cctbx's ``sys_absent_flags`` in all 230 space groups (reference
    settings) and in non-standard settings (other axes, centrings, rhombohedral and hexagonal R), on indices that
    include the special rows and planes (h00, 0k0, 00l, hk0, hhl, ...) where absences live."""
    from cctbx import crystal, miller, sgtbx

    rng = np.random.default_rng(5)
    r = np.arange(-9, 10)
    grid = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    special = grid[(grid == 0).sum(1) >= 1]
    hkl = np.concatenate([special, rng.integers(-20, 21, (3000, 3)), grid[(grid[:, 0] == grid[:, 1])]])
    names = [str(n) for n in range(1, 231)] + ["R 3 :R", "R 3 2 :R", "P 1 21/c 1", "P 1 1 21", "B 1 1 2",
                                                "A 1 2 1", "I 1 2 1", "C 1 2/c 1", "I 41/a :2", "F d -3 m :2",
                                                "P 21 21 2 (z,x,y)", "C 2 2 21 (z,x,y)"]
    indices = mk._miller_flex(hkl)
    n_absent = 0
    for name in names:
        info = sgtbx.space_group_info(name)
        sg = info.group()
        sym = crystal.symmetry(unit_cell=info.any_compatible_unit_cell(volume=1000), space_group=sg)
        ref = np.asarray(miller.set(sym, indices, anomalous_flag=True).sys_absent_flags().data(), dtype=bool)
        got = mk.sys_absent(sg, hkl)
        assert got is not None, name
        np.testing.assert_array_equal(got, ref, err_msg=name)
        n_absent += int(ref.sum())
    assert n_absent > 10000  # absences were there to find

def test_geometry_cache_is_keyed_by_the_geometry():
    e = synthetic.make_experiment()
    params = ExtractionParams()
    ex.clear_process_cache()
    c1, c2 = ex.GeometryCache(), ex.GeometryCache()
    p1 = c1.get(e.detector, e.beam, params)
    assert c1.misses == 1 and c2.get(e.detector, e.beam, params) is p1 and c2.hits == 1  # process-wide
    det2 = synthetic.make_detector(distance=100.2)  # a refined distance: another geometry
    p2 = c1.get(det2, e.beam, params)
    assert c1.misses == 2 and p2 is not p1
    fresh = ex.static_pixels(det2, e.beam, params)
    for a, b in zip(p2, fresh):  # computed into recycled memory, same numbers
        np.testing.assert_array_equal(a.correction, b.correction)
        np.testing.assert_array_equal(a.u, b.u)
    assert not np.array_equal(p2[0].solid_angle, fresh[0].solid_angle * 0 + p1[0].solid_angle)
    beam2 = synthetic._beam(1.0, 0.5)  # another polarisation: another key; flux does not matter
    assert c1.key(e.detector, beam2, params) != c1.key(e.detector, e.beam, params)
    beam3 = synthetic._beam(1.0, 0.999)
    beam3.set_flux(123.0)
    assert c1.key(e.detector, beam3, params) == c1.key(e.detector, e.beam, params)
    ex.clear_process_cache()


def test_a_kept_result_is_never_overwritten_by_the_next_still(synthetic_still):
    s = synthetic_still
    p = ExtractionParams(beamstop="none")
    first = extract_still(s.experiment, s.data, s.reflections, params=p)
    snapshot = {k: np.array(v) for k, v in first.table.items()}
    brighter = [2.0 * d for d in s.data]
    second = extract_still(s.experiment, brighter, s.reflections, params=p)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(first.table[k], v, err_msg=k)
    assert not np.shares_memory(first.table["intensity"], second.table["intensity"])
    del first
    third = extract_still(s.experiment, s.data, s.reflections, params=p)  # may reuse the first's memory
    np.testing.assert_array_equal(third.table["intensity"], snapshot["intensity"])
    np.testing.assert_array_equal(second.table["intensity"][:10] > 0, True)


def test_artifact_round_trip_and_voxel_merger_reader(synthetic_still, tmp_path):
    """v5: stored columns bit for bit; derived ones (q components, |q|, x, y, correction, raw) within their
    documented rounding (x, y exactly); the voxel merger's reader streams the same values."""
    from voxel_merger.artifacts import open_still

    from diffuse_extractor.artifacts import DERIVED_COLUMNS, SCHEMA_VERSION, read_still, write_still

    s = synthetic_still
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    path = write_still(tmp_path / "still.h5", res, s.experiment, parameters={}, inputs={})
    a = read_still(path)
    assert int(a["provenance"]["schema_version"]) == SCHEMA_VERSION == 5
    t = res.table
    for c in ("h", "k", "l", "intensity", "sigma", "panel", "polarisation", "efficiency",
              "solid_angle", "air", "lorentz", "background", "exposure"):
        np.testing.assert_array_equal(a["pixels"][c], t[c], err_msg=c)  # stored (or recomputed exactly)
    for c in ("x", "y"):  # derived from the masks: exactly the pixels the extractor tabulated
        assert a["pixels"][c].dtype == np.uint16
        np.testing.assert_array_equal(a["pixels"][c], t[c], err_msg=c)
    for c in ("qx", "qy", "qz"):  # derived: A hkl
        np.testing.assert_allclose(a["pixels"][c], t[c], rtol=0, atol=1e-6)
    # |A hkl| from the float32 indices: within 3e-7 relative (two float32 steps) of the extractor's float32 |q|
    np.testing.assert_allclose(a["pixels"]["q"], t["q"], rtol=3e-7)
    assert np.ptp(t["q"]) > 0.1
    # derived: the float32 product of the stored factors, within rounding of the float64 product applied
    np.testing.assert_allclose(a["pixels"]["correction"], t["correction"], rtol=4e-7)
    np.testing.assert_allclose(a["pixels"]["raw"], t["raw"], rtol=6e-7, atol=1e-6)
    with h5py.File(path, "r") as f:
        g = f["entry/pixels"]
        for c in DERIVED_COLUMNS:
            assert c not in g
        assert {"q", "x", "y"} <= set(DERIVED_COLUMNS)
        for c in ("lorentz", "background"):  # constants: fill value only, no chunk stored
            assert g[c].id.get_storage_size() == 0 and g[c].attrs["constant"] in (0.0, 1.0)
        assert "32001" in g["h"]._filters and g["h"].chunks is not None  # Blosc-compressed, chunked
        assert g["intensity"].dtype == np.float32
        assert not g["intensity"]._filters and g["intensity"].chunks is not None  # PLAIN_COLUMNS: no filter
        np.testing.assert_array_equal(g["intensity"][()], t["intensity"])
    only = read_still(path, columns=["qx", "correction"])
    assert set(only["pixels"]) == {"qx", "correction"}
    with pytest.raises(Exception, match="nope"):
        read_still(path, columns=["nope"])
    with open_still(path) as st:
        assert st.n_obs == len(res)
        chunks = list(st.iter_chunks(10 ** 7))
        for name, col in (("h", "h"), ("l", "l"), ("intensity", "intensity"), ("sigma", "sigma")):
            got = np.concatenate([getattr(c, col) for c in chunks])
            np.testing.assert_array_equal(got, t[name].astype(np.float64), err_msg=name)
        got_q = np.concatenate([c.q_magnitude for c in chunks])  # derived by the format's reader
        np.testing.assert_allclose(got_q, t["q"].astype(np.float64), rtol=3e-7)
        assert st.has_weight  # v4: the exposure column is the merger's weight
        np.testing.assert_array_equal(np.concatenate([c.weight for c in chunks]), t["exposure"].astype(np.float64))
    # the shared part of the layout, read by its owner (diffractflow.formats.still_table): integer version
    from diffractflow.formats.still_table import StillTable

    with h5py.File(path, "r") as f:
        assert isinstance(f.attrs["schema_version"], np.integer)
    with StillTable(path) as tab:
        assert tab.version == 5 and tab.producer == "diffuse-extractor" and tab.has_q
        xy = tab.read_columns(["x", "h", "y", "q"])
        assert list(xy) == ["x", "h", "y", "q"]
        np.testing.assert_array_equal(xy["x"], t["x"])
        np.testing.assert_array_equal(xy["y"], t["y"])
        np.testing.assert_allclose(xy["q"], t["q"], rtol=3e-7)
        if "background_profile" in a:
            np.testing.assert_array_equal(tab.background_profile(), a["background_profile"])


def test_artifact_v4_still_written_and_read(synthetic_still, tmp_path):
    """``schema_version=4`` stores q, x, y as before; both readers return them as stored."""
    from diffractflow.formats.still_table import StillTable

    from diffuse_extractor.artifacts import read_still, write_still

    s = synthetic_still
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    p4 = write_still(tmp_path / "v4.h5", res, s.experiment, parameters={}, inputs={}, schema_version=4)
    p5 = write_still(tmp_path / "v5.h5", res, s.experiment, parameters={}, inputs={})
    with h5py.File(p4, "r") as f:
        assert {"q", "x", "y"} <= set(f["entry/pixels"])
    a = read_still(p4)
    assert int(a["provenance"]["schema_version"]) == 4
    for c in ("q", "x", "y"):
        np.testing.assert_array_equal(a["pixels"][c], res.table[c], err_msg=c)
    with StillTable(p4) as tab:
        assert tab.version == 4 and tab.has_q
        np.testing.assert_array_equal(tab.read_columns(["q"])["q"], res.table["q"])
    assert p5.stat().st_size < 0.95 * p4.stat().st_size


def test_artifact_without_crystal_keeps_q(synthetic_still, tmp_path):
    """No crystal, no hkl: |q| cannot come from A hkl, so a v5 table stores it (x, y still derived)."""
    from dxtbx.model import Experiment

    from diffuse_extractor.artifacts import read_still, write_still

    s = synthetic_still
    e = Experiment(detector=s.experiment.detector, beam=s.experiment.beam)
    res = extract_still(e, s.data, None, params=ExtractionParams(beamstop="none"))
    path = write_still(tmp_path / "nox.h5", res, e, parameters={}, inputs={})
    with h5py.File(path, "r") as f:
        assert "q" in f["entry/pixels"] and "x" not in f["entry/pixels"]
    a = read_still(path, columns=["q", "x", "y", "h"])
    np.testing.assert_array_equal(a["pixels"]["q"], res.table["q"])
    np.testing.assert_array_equal(a["pixels"]["x"], res.table["x"])
    assert np.isnan(a["pixels"]["h"]).all()


def test_v1_artifacts_with_stored_derived_columns_still_read(synthetic_still, tmp_path):
    """A v1 file stored qx/qy/qz, correction and raw: the reader returns them as stored."""
    from diffuse_extractor.artifacts import read_still, write_still

    s = synthetic_still
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    path = write_still(tmp_path / "v1.h5", res, s.experiment, parameters={}, inputs={})
    n = len(res)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = "1"
        g = f["entry/pixels"]
        for c, v in (("qx", 1.5), ("qy", 2.5), ("qz", 3.5), ("correction", 4.5), ("raw", 5.5)):
            g.create_dataset(c, data=np.full(n, v, np.float32))
    px = read_still(path)["pixels"]
    for c, v in (("qx", 1.5), ("qy", 2.5), ("qz", 3.5), ("correction", 4.5), ("raw", 5.5)):
        assert (px[c] == v).all(), c


def test_a_fully_masked_still_writes_an_empty_table(synthetic_still, tmp_path):
    from diffuse_extractor.artifacts import read_still, write_still

    s = synthetic_still
    everything = [mk.Shape.parse(f"polygon:{p}:-1,-1,200,-1,200,200,-1,200") for p in (0, 1)]
    res = extract_still(s.experiment, s.data, None, params=ExtractionParams(beamstop="none", mask_shapes=everything))
    assert len(res) == 0 and all((f & mk.MaskBit.USER).all() for f in res.flags)
    px = read_still(write_still(tmp_path / "empty.h5", res, s.experiment, parameters={}, inputs={}))["pixels"]
    assert all(v.shape == (0,) for v in px.values()) and {"h", "intensity", "qx", "raw"} <= set(px)


def test_uncompressed_artifact_reads_the_same(synthetic_still, tmp_path, monkeypatch):
    """``compression="none"`` (or the environment variable): plain chunks, the same columns read back."""
    from diffuse_extractor import artifacts as art

    s = synthetic_still
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    lz4 = art.write_still(tmp_path / "lz4.h5", res, s.experiment, parameters={}, inputs={})
    plain = art.write_still(tmp_path / "plain.h5", res, s.experiment, parameters={}, inputs={}, compression="none")
    monkeypatch.setenv(art.COMPRESSION_ENV, "none")
    env = art.write_still(tmp_path / "env.h5", res, s.experiment, parameters={}, inputs={})
    with h5py.File(plain, "r") as f, h5py.File(env, "r") as g:
        assert not f["entry/pixels/h"]._filters and not g["entry/pixels/h"]._filters
    a, b = art.read_still(lz4), art.read_still(plain)
    for c in a["pixels"]:
        np.testing.assert_array_equal(a["pixels"][c], b["pixels"][c], err_msg=c)
    monkeypatch.setenv(art.COMPRESSION_ENV, "zip")
    with pytest.raises(ValueError, match="compression"):
        art.write_still(tmp_path / "bad.h5", res, s.experiment, parameters={}, inputs={})
