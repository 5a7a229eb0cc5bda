"""Exposure column identities, background from frames and exposure scaling, isotropic estimate, Lorentz option."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from diffuse_extractor import ExtractionParams, extract_still, synthetic

N = 240  # single-panel test detector (pixels per side)


def _unindexed_still_expt(cbf: Path, out: Path) -> Path:
    """The CBF imported as a still (no crystal), written as an .expt."""
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model.experiment_list import ExperimentListFactory

    el = ExperimentListFactory.from_filenames([str(cbf)])
    iset = ImageSetFactory.imageset_from_anyset(el[0].imageset)
    iset.set_scan(None, 0)
    iset.set_goniometer(None, 0)
    el = ExperimentListFactory.from_imageset_and_crystal(iset, None)
    el.as_file(str(out))
    return out


# --------------------------------------------------------------------------- exposure column
def test_exposure_identities_against_counts_read_by_dxtbx(thaumatin_cbfs, tmp_path):
    """intensity * exposure = raw - background and (sigma * exposure)^2 = variance of the net counts, in the
    artifact, against the counts dxtbx reads from the CBFs (a real PILATUS 6M still; background: another
    still x 0.5, whose Poisson variance x 0.25 adds to the variance)."""
    import dxtbx

    from diffuse_extractor import pipeline
    from diffuse_extractor.artifacts import read_still

    expt = _unindexed_still_expt(thaumatin_cbfs[0], tmp_path / "still.expt")
    raw = dxtbx.load(str(thaumatin_cbfs[0])).get_raw_data().as_numpy_array().astype(np.float64)
    bimg = dxtbx.load(str(thaumatin_cbfs[1])).get_raw_data().as_numpy_array().astype(np.float64)
    plain = pipeline.process(expt, tmp_path / "plain", params=ExtractionParams(outlier_nsigma=None), pngs=False,
                             hot_dead=False)[0]["artifact"]
    sub = pipeline.process(expt, tmp_path / "sub", params=ExtractionParams(outlier_nsigma=None, background_scale=0.5),
                           background_path=thaumatin_cbfs[1], pngs=False, hot_dead=False)[0]["artifact"]
    for path, b_img, scale in ((plain, np.zeros_like(bimg), 0.0), (sub, bimg, 0.5)):
        a = read_still(path, columns=["intensity", "sigma", "exposure", "background", "x", "y", "raw"])
        px = a["pixels"]
        assert px["exposure"].dtype == np.float32 and len(px["exposure"]) > 5e6
        r = raw[px["y"], px["x"]]
        b = scale * b_img[px["y"], px["x"]]
        net = px["intensity"].astype(np.float64) * px["exposure"]
        assert (np.abs(net - (r - b)) <= 2e-6 * np.maximum(np.abs(r) + np.abs(b), 1)).all()
        var = (px["sigma"].astype(np.float64) * px["exposure"]) ** 2
        np.testing.assert_allclose(var, np.maximum(r, 1.0) + scale * scale * np.maximum(b_img[px["y"], px["x"]], 0),
                                   rtol=2e-6)
        assert np.ptp(px["exposure"]) > 0.1  # the corrections really vary over the detector
        assert a["attrs"]["background_method"] == ("image" if scale else "none")


def test_old_artifacts_derive_exposure(synthetic_still, tmp_path):
    """v3 files have no exposure column: the reader gives 1 / correction."""
    from diffuse_extractor.artifacts import read_still, write_still

    s = synthetic_still
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    p3 = write_still(tmp_path / "v3.h5", res, s.experiment, parameters={}, inputs={}, schema_version=3)
    p4 = write_still(tmp_path / "v4.h5", res, s.experiment, parameters={}, inputs={})
    e3 = read_still(p3, columns=["exposure"])["pixels"]["exposure"]
    a4 = read_still(p4)
    np.testing.assert_allclose(e3, a4["pixels"]["exposure"], rtol=5e-7)
    np.testing.assert_allclose(e3 * a4["pixels"]["correction"], 1.0, rtol=5e-7)
    assert a4["background_profile"].shape[1] == 3


# --------------------------------------------------------------------------- background frames
def _detector_and_beam(transmission: float):
    from dxtbx.model import Beam, Detector

    det = Detector()
    p = det.add_panel()
    px = 0.172
    p.set_frame((1, 0, 0), (0, -1, 0), (-120.5 * px, 110.3 * px, -120.0))
    p.set_image_size((N, N))
    p.set_pixel_size((px, px))
    p.set_trusted_range((-1, 1e6))
    p.set_thickness(0.45)
    p.set_material("Si")
    b = Beam((0, 0, 1), 1.0)
    b.set_transmission(transmission)
    return det, b


def _write_cbf(path: Path, counts: np.ndarray, exposure_s: float, transmission: float) -> Path:
    from dials.array_family import flex
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import ScanFactory

    det, beam = _detector_and_beam(transmission)
    scan = ScanFactory.make_scan((1, 1), exposure_s, (0, 0), [0])
    FormatCBFMini.as_file(det, beam, None, scan, flex.int(np.ascontiguousarray(counts, dtype=np.int32)), str(path))
    return path


def _planted():
    yy, xx = np.mgrid[0:N, 0:N] + 0.5
    rate = 30.0 * (1.0 + 0.8 * np.exp(-((xx - 90) ** 2 + (yy - 150) ** 2) / (2 * 60.0 ** 2))) + 0.03 * xx  # counts/s at T=1
    r = np.hypot(xx - 120.5, yy - 110.3)
    signal = 40.0 + 30.0 * np.exp(-((r - 80.0) / 15.0) ** 2) + 10.0 * np.cos(np.arctan2(yy - 110.3, xx - 120.5)) ** 2
    gap = (yy > 100) & (yy < 106)  # a module gap: -1 in every image
    return rate, signal, gap


@pytest.fixture(scope="module")
def frames_run(tmp_path_factory):
    """4 background frames (1 s, transmission 0.5, one with a zinger) and a still (2 s, transmission 1) on a
    volume; background artifact made by the worker (mode=background), still extracted by the worker."""
    from diffractflow.artifacts import sha256_file
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import run_inline

    from diffuse_extractor.worker import STAGE

    rng = np.random.default_rng(7)
    rate, signal, gap = _planted()
    vol = tmp_path_factory.mktemp("vol")
    (vol / "in").mkdir()
    bkg_per_frame = rate * 1.0 * 0.5
    frames = {}
    for k in range(4):
        img = rng.poisson(bkg_per_frame).astype(np.int32)
        if k == 2:
            img[60, 200] = 5000  # a zinger in one frame
        img[gap] = -1
        p = _write_cbf(vol / "in" / f"bkg_{k + 1:04d}.cbf", img, 1.0, 0.5)
        frames[f"frame{k}"] = ArtifactRef(path=f"in/{p.name}", sha256=sha256_file(p))
    still = rng.poisson(rate * 2.0 * 1.0 + signal).astype(np.int32)
    still[gap] = -1
    sp = _write_cbf(vol / "in" / "still_0001.cbf", still, 2.0, 1.0)
    expt = _unindexed_still_expt(sp, vol / "in" / "still.expt")
    settings = Settings(volume=vol)
    bjob = JobRequest(job_id="bg-1", service="diffuse-extractor", inputs=frames,
                      params={"mode": "background", "beamstop": "none", "bin_px": 8})
    bctx = run_inline(STAGE, bjob, settings)
    bpath = bctx.outputs["background"]
    rel = Path(bpath).relative_to(vol)
    ejob = JobRequest(job_id="ex-1", service="diffuse-extractor",
                      inputs={"experiments": ArtifactRef(path="in/still.expt", sha256=sha256_file(expt)),
                              "background": ArtifactRef(path=str(rel), sha256=sha256_file(bpath))},
                      params={"pngs": False, "beamstop": "none", "outlier_nsigma": None})
    ectx = run_inline(STAGE, ejob, settings)
    return {"rate": rate, "signal": signal, "gap": gap, "bkg_per_frame": bkg_per_frame, "background": bpath,
            "still": ectx.outputs["still_0000"], "bctx": bctx, "ectx": ectx}


def test_background_from_frames_recovers_the_planted_background(frames_run):
    import h5py
    import hdf5plugin  # noqa: F401

    from diffuse_extractor.artifacts import read_background_artifact

    b = read_background_artifact(frames_run["background"])
    truth = frames_run["bkg_per_frame"]
    ok = ~frames_run["gap"]
    est, var = b["mean"][0], b["variance"][0]
    assert b["n_frames"] == 4 and b["exposure_time_s"] == 2.0 / 2 and b["transmission"] == 0.5
    err = (est - truth)[ok]
    # per pixel the estimate is far better than one frame's Poisson noise (sqrt(15..30) ~ 4-5 counts)
    assert np.sqrt(np.mean(err ** 2)) < 0.25 and abs(np.mean(err)) < 0.05
    # the recorded variance describes the error (it is a slight overestimate by construction)
    z = err / np.sqrt(var[ok])
    assert 0.5 < np.sqrt(np.mean(z ** 2)) < 1.3
    assert abs(est[60, 200] - truth[60, 200]) < 1.0  # the zinger did not leak into the background
    assert b["info"]["n_zinger_pixels"] >= 1
    with h5py.File(frames_run["background"], "r") as f:
        assert f.attrs["schema"] == "diffractflow.diffuse_background" and f.attrs["job_id"] == "bg-1"


def test_frames_background_scaled_by_exposure_and_subtracted(frames_run):
    """The still (2 s at transmission 1) gets 4x the frames' background (1 s at 0.5); what remains after
    subtraction is the planted signal, within counting statistics, with sigma describing the scatter."""
    from diffuse_extractor.artifacts import read_still

    a = read_still(frames_run["still"], columns=["intensity", "sigma", "exposure", "background", "x", "y"])
    px = a["pixels"]
    assert a["attrs"]["background_method"] == "frames"
    assert a["info"]["background_exposure_ratio"] == pytest.approx(4.0, rel=1e-9)
    assert frames_run["ectx"].metrics["background_method"] == "frames"
    net = px["intensity"].astype(np.float64) * px["exposure"]
    s = frames_run["signal"][px["y"], px["x"]]
    r = net - s
    sig = px["sigma"].astype(np.float64) * px["exposure"]
    n = r.size
    assert n > 0.95 * N * N
    assert abs(r.mean()) < 4 * np.sqrt(np.mean(sig ** 2) / n) + 0.05  # background is ~ 60-110 counts here
    # in 20 x 20 pixel blocks too (no spatial structure left)
    blocks = (px["y"] // 20) * (N // 20) + px["x"] // 20
    cnt = np.bincount(blocks)
    z = np.bincount(blocks, r) / np.sqrt(np.bincount(blocks, sig ** 2))
    assert np.abs(z[cnt > 100]).max() < 5.0
    assert 0.95 < np.std(r / sig) < 1.05  # sigma includes the background's own variance
    # background column = the scaled estimate (ADU): 4 x frames' background
    rel = px["background"] / (4.0 * frames_run["bkg_per_frame"][px["y"], px["x"]]) - 1
    assert np.sqrt(np.mean(rel ** 2)) < 0.015 and np.abs(rel).max() < 0.08


def test_exposure_ratio_from_headers_and_missing_values():
    from diffuse_extractor.artifacts import exposure_ratio

    r, notes = exposure_ratio({"exposure_time_s": 0.5, "transmission": 0.2},
                              {"exposure_time_s": 1.0, "transmission": 0.8})
    assert r == pytest.approx(0.125) and not notes
    r, notes = exposure_ratio({"exposure_time_s": 0.5, "transmission": None},
                              {"exposure_time_s": 1.0, "transmission": 0.8})
    assert r == pytest.approx(0.5) and len(notes) == 1 and "transmission" in notes[0]


def test_thaumatin_header_exposure(thaumatin_cbfs):
    from diffuse_extractor.artifacts import image_exposure

    v = image_exposure(thaumatin_cbfs[0])  # "# Exposure_time 0.0190000 s", "# Filter_transmission 0.2547"
    assert v == {"exposure_time_s": pytest.approx(0.019), "transmission": pytest.approx(0.2547)}


def test_background_mode_without_frames_is_rejected(tmp_path):
    from diffractflow.config import Settings
    from diffractflow.messages import JobRequest
    from diffractflow.runtime import BadInput, run_inline

    from diffuse_extractor.worker import STAGE

    (tmp_path / "v").mkdir()
    job = JobRequest(job_id="bg-x", service="diffuse-extractor", inputs={}, params={"mode": "background"})
    with pytest.raises(BadInput, match="frame0"):
        run_inline(STAGE, job, Settings(volume=tmp_path / "v"))


# --------------------------------------------------------------------------- isotropic estimate
def _pixel_q_and_reference_correction(experiment):
    """|q| per pixel from dxtbx's lab coordinates and the independent correction of ``synthetic.render``."""
    from dials.array_family import flex

    s = synthetic.render(experiment)
    s0 = np.asarray(experiment.beam.get_s0())
    wl = experiment.beam.get_wavelength()
    qs = []
    for panel in experiment.detector:
        nx, ny = panel.get_image_size()
        yy, xx = np.mgrid[0:ny, 0:nx]
        pts = flex.vec2_double(list(zip((xx.ravel() + 0.5).tolist(), (yy.ravel() + 0.5).tolist())))
        lab = np.asarray(panel.get_lab_coord(panel.pixel_to_millimeter(pts))).reshape(-1, 3)
        q = lab / np.linalg.norm(lab, axis=1)[:, None] / wl - s0
        qs.append(np.linalg.norm(q, axis=1).reshape(ny, nx))
    return qs, s.reference_correction


def _b_iso(q):
    return 60.0 + 50.0 * np.exp(-(((q - 0.22) / 0.08) ** 2))


@pytest.fixture(scope="module")
def isotropic_case():
    return _isotropic_case()


def _isotropic_case():
    from dxtbx.model import Experiment

    full = synthetic.make_experiment()
    expt = Experiment(beam=full.beam, detector=full.detector)  # no crystal: no Bragg peaks, no hkl
    qs, corr = _pixel_q_and_reference_correction(full)
    rng = np.random.default_rng(3)
    data, feats = [], []
    for p, (q, c) in enumerate(zip(qs, corr)):
        ny, nx = q.shape
        yy, xx = np.mgrid[0:ny, 0:nx] + 0.5
        f = np.zeros((ny, nx))
        k = 0
        while k < 5:  # anisotropic blobs (diffuse halos), ~4x the background at their centres, off the beam
            cx, cy = rng.uniform(10, nx - 10), rng.uniform(10, ny - 10)
            if p == 0 and np.hypot(cx - 40.3, cy - 80.7) < 40:
                continue
            f += 300.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 5.0 ** 2))
            k += 1
        truth = _b_iso(q) + f  # corrected intensity
        data.append(rng.poisson(truth / c).astype(np.float64))
        feats.append(f)
    return expt, data, feats


def test_isotropic_estimate_recovers_planted_isotropic_background(isotropic_case):
    expt, data, feats = isotropic_case
    res = extract_still(expt, data, None, params=ExtractionParams(beamstop="none", outlier_nsigma=None))
    t = res.table
    prof = res.background_profile
    got, _ = prof.at(t["q"])
    want = _b_iso(t["q"].astype(np.float64))
    rel = got / want - 1.0
    # within 4 % everywhere (the faint tails of the features are indistinguishable from noise), 1.5 % on average
    assert np.abs(rel).max() < 0.04 and np.abs(np.mean(rel)) < 0.015, (np.abs(rel).max(), np.mean(rel))
    # the features matter: a plain mean of the same pixels would be biased high by far more
    f = np.concatenate([fp.ravel() for fp in feats])[np.flatnonzero(np.concatenate([fl.ravel() for fl in res.flags]) == 0)]
    assert np.mean(f) / np.mean(want) > 3 * abs(np.mean(rel)), (np.mean(f) / np.mean(want), np.mean(rel))
    assert res.info["background_method"] == "none" and res.info["isotropic_background"]["n_shells_fitted"] >= 16
    # subtracting it leaves the anisotropic features (and the exposure identity holds)
    sub = extract_still(expt, data, None, params=ExtractionParams(beamstop="none", outlier_nsigma=None,
                                                                  isotropic_background=True))
    ts = sub.table
    assert sub.info["background_method"] == "isotropic"
    quiet = f < 0.5
    assert abs(np.mean(ts["intensity"][quiet])) < 0.02 * np.mean(want[quiet])
    loud = f > 100
    np.testing.assert_allclose(np.mean(ts["intensity"][loud]), np.mean(f[loud]), rtol=0.03)
    np.testing.assert_allclose(ts["intensity"] * ts["exposure"], ts["raw"] - ts["background"], rtol=0,
                               atol=1e-4 * np.max(ts["raw"]))


# --------------------------------------------------------------------------- Lorentz option
def test_lorentz_option_on_a_rotation_frame(synthetic_still):
    from dials.algorithms.integration import Corrections
    from dxtbx.model import Experiment, GoniometerFactory, ScanFactory

    s = synthetic_still
    e0 = s.experiment
    gonio = GoniometerFactory.known_axis((1.0, 0.0, 0.0))
    scan = ScanFactory.make_scan((1, 10), 0.1, (0.0, 0.5), list(range(10)))
    e = Experiment(beam=e0.beam, detector=e0.detector, goniometer=gonio, scan=scan, crystal=e0.crystal)
    p = dict(beamstop="none", use_observed_spots=False, outlier_nsigma=None)
    off = extract_still(e, s.data, None, params=ExtractionParams(**p), image_index=2)
    on = extract_still(e, s.data, None, params=ExtractionParams(lorentz=True, **p), image_index=2)
    assert (off.table["lorentz"] == 1).all() and off.info["lorentz_applied"] is False
    np.testing.assert_allclose(off.table["correction"], off.table["polarisation"] * off.table["efficiency"]
                               * off.table["solid_angle"] * off.table["air"], rtol=1e-6)
    t = on.table
    assert on.info["lorentz_applied"] is True and np.ptp(t["lorentz"]) > 0.05
    ref = Corrections(e.beam, gonio, e.detector)
    sel = np.arange(0, len(on), 211)
    s1 = (np.stack([t["qx"][sel], t["qy"][sel], t["qz"][sel]], 1).astype(np.float64)
          + np.asarray(e.beam.get_s0())[None])
    dials_lp = np.array([ref.lp(tuple(v)) for v in s1])
    np.testing.assert_allclose(t["lorentz"][sel] * t["polarisation"][sel], dials_lp, rtol=2e-6)
    np.testing.assert_allclose(on.table["intensity"] / off.table["intensity"], t["lorentz"], rtol=2e-6)


@pytest.mark.parametrize("photons", [1.0, 3.0, 30.0])
def test_isotropic_estimate_is_unbiased_at_a_few_photons(photons):
    """Poisson counts of a flat B at 1-30 photons per pixel (exposure varying 0.5-1 over the pixels): the
    clipped shell means, corrected for the cut-off Poisson tail, give B within 1.5 % (without that correction,
    cutting the upper tail biases B low at a few photons)."""
    from diffuse_extractor.core.background import isotropic_profile

    rng = np.random.default_rng(11)
    n = 400_000
    q = rng.uniform(0.05, 0.45, n).astype(np.float32)
    e = rng.uniform(0.5, 1.0, n).astype(np.float32)
    B = photons / 0.75
    inten = (rng.poisson(B * e) / e).astype(np.float32)
    prof = isotropic_profile(q, inten, e)
    assert np.nanmean(prof.b) / B - 1 == pytest.approx(0, abs=0.015)
    assert np.isfinite(prof.b).sum() >= 32


def test_beamstop_found_once_per_run_across_calls(thaumatin_cbfs, tmp_path):
    """One still per call (as one job per still on the bus): with the same run key the later stills reuse the
    beamstop of the run's first, with another run key it is searched again; the masks agree."""
    from diffuse_extractor import pipeline
    from diffuse_extractor.artifacts import read_still

    e1 = _unindexed_still_expt(thaumatin_cbfs[0], tmp_path / "a.expt")
    e2 = _unindexed_still_expt(thaumatin_cbfs[1], tmp_path / "b.expt")
    kw = dict(params=ExtractionParams(outlier_nsigma=None), pngs=False, hot_dead=False)
    r1 = pipeline.process(e1, tmp_path / "1", run_key="run-A", **kw)[0]["artifact"]
    r2 = pipeline.process(e2, tmp_path / "2", run_key="run-A", **kw)[0]["artifact"]
    r3 = pipeline.process(e2, tmp_path / "3", run_key="run-B", **kw)[0]["artifact"]
    a1, a2, a3 = (read_still(p, columns=["x"]) for p in (r1, r2, r3))
    assert a1["info"]["beamstop_mode"] == "auto" and a3["info"]["beamstop_mode"] == "auto"
    assert a2["info"]["beamstop_mode"].startswith("auto (from the run")
    bs = [(a["masks"][0] & 2) != 0 for a in (a1, a2, a3)]
    assert bs[0].sum() > 1000 and np.array_equal(bs[0], bs[1])
    assert (bs[2] != bs[1]).mean() < 0.01  # the run's first still's shadow is this still's too


# --------------------------------------------------------------------------- hot/dead from running statistics
def test_running_pixel_statistics_hot_dead_rule(tmp_path):
    """Hot (bright in every still) and dead (0 in every still) pixels are found from the run file; a pixel hit
    by a Bragg peak in one still only, and peaks that move, are not; a still counted twice counts once."""
    from diffuse_extractor.core import runstats
    from diffuse_extractor.core.masks import MaskBit

    rng = np.random.default_rng(5)
    path = tmp_path / "run" / "pixel_stats.h5"
    shapes = [(160, 160), (120, 160)]
    for k in range(5):
        frame = [rng.poisson(30.0, s).astype(np.float32) for s in shapes]
        frame[0][20 + 10 * k, 100] = 5000.0  # a moving Bragg peak
        if k == 1:
            frame[0][50, 50] = 8000.0  # a peak on one pixel in one still only
        frame[0][77, 33] = rng.poisson(900.0)  # hot
        frame[1][12, 140] = 0.0  # dead
        flags = [np.zeros(s, np.uint8) for s in shapes]
        st = runstats.update_run_stats(path, f"still{k}", frame, flags)
        if k == 2:  # a redelivered job: not counted again
            st = runstats.update_run_stats(path, f"still{k}", frame, flags)
            assert st.n_stills == 3
    st = runstats.read_run_stats(path)
    assert st.n_stills == 5 and int(st.n[0][0, 0]) == 5
    np.testing.assert_allclose(st.total[0][50, 50] / 5, (8000 + 4 * 30) / 5, rtol=0.05)
    hd = st.hot_dead_flags()
    assert hd[0][77, 33] & MaskBit.HOT and hd[1][12, 140] & MaskBit.DEAD
    assert not hd[0][50, 50] and int((hd[0] != 0).sum() + (hd[1] != 0).sum()) == 2
    # one part file per process (written at the latest when the process flushes), no lock file shared
    runstats.flush(path)
    assert not path.with_name(path.name + ".lock").exists()
    assert len(list(runstats.parts_dir(path).glob("*.h5"))) == 1


def test_running_pixel_statistics_from_several_workers(tmp_path, monkeypatch):
    """Stills counted by different worker processes (each its own part file) add up to the statistics of one
    process counting them all, bit for bit, with the same HOT/DEAD flags; a still redelivered to another worker
    is not counted twice; the numba and numpy paths give the same sums and flags."""
    from diffuse_extractor.core import runstats
    from diffuse_extractor.core.masks import MaskBit

    rng = np.random.default_rng(11)
    shapes = [(90, 70), (40, 70)]
    frames, flags = [], []
    for k in range(6):
        fr = [rng.poisson(25.0, s).astype(np.float32) for s in shapes]
        fr[0][30, 20] = rng.poisson(700.0)  # hot
        fr[1][5, 60] = 0.0  # dead
        fr[0][10 + 5 * k, 50] = 4000.0  # moving peak
        fl = [np.zeros(s, np.uint8) for s in shapes]
        fl[0][:, 0] = MaskBit.UNTRUSTED  # a gap column: never counted
        fl[1][2, 2] = MaskBit.OVERLOAD if k % 2 else 0
        frames.append(fr)
        flags.append(fl)
    one = tmp_path / "one" / "pixel_stats.h5"
    for k in range(6):
        runstats.update_run_stats(one, f"s{k}", frames[k], flags[k])
    many = tmp_path / "many" / "pixel_stats.h5"
    for k in range(6):
        runstats.flush()  # the previous process wrote its part when it stopped
        runstats._VIEWS.clear()  # a new process (another replica, or a restarted worker): a new part file
        runstats.update_run_stats(many, f"s{k}", frames[k], flags[k])
    runstats.flush()
    runstats._VIEWS.clear()
    st = runstats.update_run_stats(many, "s3", frames[3], flags[3])  # redelivered to yet another worker
    assert st.n_stills == 6 and len(list(runstats.parts_dir(many).glob("*.h5"))) == 6
    a, b = runstats.read_run_stats(one), runstats.read_run_stats(many)
    for x, y in ((a.n, b.n), (a.total, b.total), (a.sumsq, b.sumsq), (a.n_zero, b.n_zero)):
        for u, v in zip(x, y):
            assert np.array_equal(u, v)
    assert int(a.n[0][0, 0]) == 0 and int(a.n[1][2, 2]) == 3 and int(a.n[0][1, 1]) == 6
    fa, fb = a.hot_dead_flags(), b.hot_dead_flags()
    assert all(np.array_equal(u, v) for u, v in zip(fa, fb))
    assert fa[0][30, 20] == MaskBit.HOT and fa[1][5, 60] == MaskBit.DEAD
    assert int(sum((f != 0).sum() for f in fa)) == 2
    # the numpy path (no numba): same sums and flags
    monkeypatch.setenv("DIFFUSE_EXTRACTOR_KERNELS", "numpy")
    c = runstats.RunningPixelStats.empty(shapes)
    for k in range(6):
        c.add(frames[k], flags[k], f"s{k}")
    for x, y in ((a.n, c.n), (a.total, c.total), (a.sumsq, c.sumsq), (a.n_zero, c.n_zero)):
        assert all(np.array_equal(u, v) for u, v in zip(x, y))
    assert all(np.array_equal(u, v) for u, v in zip(fa, c.hot_dead_flags()))


def test_running_pixel_statistics_deferred_write_and_crash_rule(tmp_path, monkeypatch):
    """The part file is rewritten at most once per flush interval (by a timer, or at flush/exit), never half:
    a worker killed before writing loses only its unwritten stills, which another worker then counts once;
    the run's sums equal those of counting each still exactly once."""
    import time

    from diffuse_extractor.core import runstats

    rng = np.random.default_rng(3)
    shapes = [(40, 30)]
    frames = [[rng.poisson(20.0, shapes[0]).astype(np.float32)] for _ in range(5)]
    flags = [np.zeros(shapes[0], np.uint8)]
    ref = runstats.RunningPixelStats.empty(shapes)
    for k in range(5):
        ref.add(frames[k], flags, f"s{k}")
    path = tmp_path / "run" / "pixel_stats.h5"
    runstats._VIEWS.clear()
    monkeypatch.setattr(runstats, "FLUSH_INTERVAL_S", 3600.0)
    for k in range(2):
        st = runstats.update_run_stats(path, f"s{k}", frames[k], flags)
    assert st.n_stills == 2 and not list(runstats.parts_dir(path).glob("*.h5"))  # counted, not yet written
    runstats.flush(path)
    (first,) = runstats.parts_dir(path).glob("*.h5")
    runstats.update_run_stats(path, "s2", frames[2], flags)  # counted in memory only ...
    view = runstats._VIEWS.popitem()[1]
    view.timer.cancel()  # ... then the worker is killed (SIGKILL: no timer, no exit handler)
    assert runstats._read_file(first).still_ids == ["s0", "s1"]  # the file holds exactly what it lists
    monkeypatch.setattr(runstats, "FLUSH_INTERVAL_S", 0.2)  # another worker, the timer writes its part
    for k in range(1, 5):  # s1 redelivered (already on disk: not again), s2 redelivered (lost: counted now)
        st = runstats.update_run_stats(path, f"s{k}", frames[k], flags)
    assert st.n_stills == 5 and len(list(runstats.parts_dir(path).glob("*.h5"))) == 1
    deadline = time.monotonic() + 10.0
    while len(list(runstats.parts_dir(path).glob("*.h5"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    runstats._VIEWS.clear()  # a third process reads the run from the files alone
    got = runstats.read_run_stats(path)
    assert sorted(got.still_ids) == [f"s{k}" for k in range(5)]
    for x, y in ((got.n, ref.n), (got.total, ref.total), (got.sumsq, ref.sumsq), (got.n_zero, ref.n_zero)):
        assert np.array_equal(x[0], y[0])
    monkeypatch.setattr(runstats, "FLUSH_INTERVAL_S", 0.0)  # 0: every still written at once
    one = tmp_path / "one" / "pixel_stats.h5"
    runstats.update_run_stats(one, "s0", frames[0], flags)
    assert len(list(runstats.parts_dir(one).glob("*.h5"))) == 1


def test_pipeline_masks_hot_pixel_from_the_third_still_on(tmp_path):
    """Stills extracted one call at a time (as one job per still) share the run's statistics file."""
    from diffuse_extractor import pipeline
    from diffuse_extractor.artifacts import read_still
    from diffuse_extractor.core.masks import MaskBit

    rng = np.random.default_rng(9)
    stats = tmp_path / "pixel_stats.h5"
    arts = []
    for k in range(3):
        img = rng.poisson(40.0, (N, N)).astype(np.int32)
        img[30, 40] = rng.poisson(2000.0)  # hot
        cbf = _write_cbf(tmp_path / f"s{k}_0001.cbf", img, 1.0, 1.0)
        expt = _unindexed_still_expt(cbf, tmp_path / f"s{k}.expt")
        arts.append(pipeline.process(expt, tmp_path / f"o{k}", params=ExtractionParams(beamstop="none",
                                                                                        outlier_nsigma=None),
                                     pngs=False, pixel_stats=stats)[0]["artifact"])
    a = [read_still(p, columns=["x"]) for p in arts]
    assert [x["info"]["pixel_stats_stills"] for x in a] == [1, 2, 3]
    assert not a[1]["masks"][0][30, 40] & MaskBit.HOT and a[1]["info"]["hot_dead_from_run_stats"] is False
    assert a[2]["masks"][0][30, 40] & MaskBit.HOT and a[2]["info"]["n_masked_hot"] == 1


def test_cli_background_then_run_and_worker_pixel_stats_path(tmp_path):
    """`diffuse-extractor background` writes the artifact `run --background` applies; the worker refuses a
    pixel-statistics path outside the volume."""
    from typer.testing import CliRunner

    from diffractflow.artifacts import sha256_file
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import BadInput, run_inline

    from diffuse_extractor.artifacts import read_still
    from diffuse_extractor.cli import app
    from diffuse_extractor.worker import STAGE

    rng = np.random.default_rng(2)
    frames = [_write_cbf(tmp_path / f"b_{k + 1:04d}.cbf", rng.poisson(10.0, (N, N)), 1.0, 1.0) for k in range(2)]
    still = _write_cbf(tmp_path / "s_0001.cbf", rng.poisson(25.0, (N, N)), 0.5, 1.0)
    expt = _unindexed_still_expt(still, tmp_path / "s.expt")
    runner = CliRunner()
    res = runner.invoke(app, ["background", *map(str, frames), "--out", str(tmp_path / "bkg.h5"), "--beamstop", "none"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["run", "--expt", str(expt), "--out", str(tmp_path / "o"), "--background",
                              str(tmp_path / "bkg.h5"), "--beamstop", "none", "--no-png", "--outlier-nsigma", "0"])
    assert res.exit_code == 0, res.output
    a = read_still(tmp_path / "o" / "s_0000.h5", columns=["intensity", "exposure", "background"])
    assert a["attrs"]["background_method"] == "frames" and a["info"]["background_exposure_ratio"] == 0.5
    net = a["pixels"]["intensity"] * a["pixels"]["exposure"]
    assert abs(np.mean(net) - (25.0 - 5.0)) < 0.2  # 25 counts minus half of the frames' 10
    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    shutil.copy(expt, vol / "in" / "s.expt")
    job = JobRequest(job_id="ps-1", service="diffuse-extractor", params={"pixel_stats": "../outside.h5"},
                     inputs={"experiments": ArtifactRef(path="in/s.expt", sha256=sha256_file(vol / "in" / "s.expt"))})
    with pytest.raises(BadInput, match="pixel_stats"):
        run_inline(STAGE, job, Settings(volume=vol))
