"""Real PILATUS 6M thaumatin stills: CLI, artifact, masks (gaps, beamstop), worker, bad input."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from diffuse_extractor import MaskBit
from diffuse_extractor.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def cli_output(thaumatin_indexed, tmp_path_factory):
    expt, refl = thaumatin_indexed
    out = tmp_path_factory.mktemp("de_out")
    res = runner.invoke(app, ["run", "--expt", str(expt), "--refl", str(refl), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_cli_run_writes_finite_artifact(cli_output):
    from diffuse_extractor.artifacts import SCHEMA, read_still

    out, log = cli_output
    h5 = out / "indexed_0000.h5"
    assert h5.is_file() and "indexed_0000.h5" in log
    a = read_still(h5)
    px = a["pixels"]
    n = len(px["intensity"])
    assert 4.5e6 < n < 6.0e6  # most of 6.2 Mpixel used
    for c in ("h", "k", "l", "qx", "qy", "qz", "q", "intensity", "sigma", "correction"):
        assert np.isfinite(px[c]).all(), c
    assert (px["sigma"] > 0).all() and (px["correction"] >= 1.0).all()
    assert a["provenance"]["schema"] == SCHEMA and len(a["provenance"]["inputs"]["experiments"]) == 64
    assert a["crystal"]["space_group"] == "P 41 21 2"
    # hkl from the stored A matrix reproduce q
    A = a["crystal"]["A"]
    q = A @ np.stack([px["h"][:1000], px["k"][:1000], px["l"][:1000]]).astype(float)
    np.testing.assert_allclose(q, np.stack([px["qx"][:1000], px["qy"][:1000], px["qz"][:1000]]), atol=2e-6)
    # diffuse level: corrected median of a few counts per pixel, radial mean is smooth (no spikes)
    assert 2.0 < np.median(px["intensity"]) < 30.0
    for name in ("raw", "masks", "corrected", "radial"):
        png = out / f"indexed_0000_{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masks_cover_module_gaps_and_beamstop(cli_output):
    from diffuse_extractor.artifacts import read_still

    out, _ = cli_output
    f = read_still(out / "indexed_0000.h5", columns=["x"])["masks"][0]
    assert f.shape == (2527, 2463)
    untrusted = (f & MaskBit.UNTRUSTED) != 0
    # PILATUS 6M: 487 x 195 modules, 7-pixel vertical and 17-pixel horizontal gaps
    for m in range(1, 5):
        x0 = m * (487 + 7) - 7
        assert untrusted[:, x0:x0 + 7].all()
    for m in range(1, 12):
        y0 = m * (195 + 17) - 17
        assert untrusted[y0:y0 + 17, :].all()
    assert untrusted[:195, :487].mean() < 0.01  # module interiors are usable
    bs = (f & MaskBit.BEAMSTOP) != 0
    # beamstop shadow annotated by eye on image 1: disk centred near (1265, 1300), radius ~25 px
    yy, xx = np.mgrid[1250:1350, 1215:1315]
    disk = (xx - 1265) ** 2 + (yy - 1300) ** 2 <= 20 ** 2
    assert bs[1250:1350, 1215:1315][disk].all()
    # the arm's shadow: left of the beam just above the gap row (median 2-3 counts vs 5 elsewhere)
    assert bs[1240:1252, 300:1000].mean() > 0.95
    # the mask stays a small part of the detector
    assert bs.mean() < 0.06 and (f != 0).mean() < 0.2


def test_untrusted_and_overload_agree_with_dxtbx_mask(thaumatin_cbfs):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_extractor.core.masks import untrusted_and_overload

    el = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[1])])
    iset, det = el[0].imageset, el[0].detector
    data = [r.as_numpy_array().astype(float) for r in iset.get_raw_data(0)]
    data[0][100, 100] = 2.0e6  # plant an overload
    flags = untrusted_and_overload(det, data)
    dx = iset.get_mask(0)[0].as_numpy_array()  # dxtbx: True = good (its own data, unplanted)
    mine_bad = (flags[0] & (MaskBit.UNTRUSTED | MaskBit.OVERLOAD)) != 0
    mine_bad[100, 100] = False
    assert np.array_equal(mine_bad, ~dx)
    assert flags[0][100, 100] & MaskBit.OVERLOAD
    assert (~dx).sum() > 5e5  # gaps are really there


def test_bragg_prediction_matches_dials_on_thaumatin(thaumatin_indexed):
    from dials.algorithms.spot_prediction import StillsReflectionPredictor
    from dials.array_family import flex  # noqa: F401
    from dxtbx.model.experiment_list import ExperimentList

    from diffuse_extractor.core.masks import predict_reflections

    e = ExperimentList.from_file(str(thaumatin_indexed[0]), check_format=False)[0]
    ref = StillsReflectionPredictor(e).for_ub(e.crystal.get_A())
    panel, x, y, hkl = predict_reflections(e)
    assert len(ref) > 300
    ref_hkl = np.asarray(ref["miller_index"].as_vec3_double(), int)
    assert set(map(tuple, hkl.tolist())) == set(map(tuple, ref_hkl.tolist()))
    order = {tuple(h): i for i, h in enumerate(ref_hkl.tolist())}
    rx, ry, _ = (np.asarray(c) for c in ref["xyzcal.px"].parts())
    j = np.array([order[tuple(h)] for h in hkl.tolist()])
    np.testing.assert_allclose(x, rx[j], atol=1e-9)
    np.testing.assert_allclose(y, ry[j], atol=1e-9)


def test_hot_and_dead_pixels_on_real_stills(thaumatin_cbfs):
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_extractor.core.masks import RunPixelStatistics, untrusted_and_overload

    stats = None
    for p in thaumatin_cbfs:
        el = ExperimentListFactory.from_filenames([str(p)])
        det = el[0].detector
        data = [r.as_numpy_array().astype(np.float32) for r in el[0].imageset.get_raw_data(0)]
        data[0][600, 700] = 3000.0  # planted hot pixel
        data[0][1420, 1150] = 0.0  # planted dead pixel (neighbours ~8 counts per still)
        stats = stats or RunPixelStatistics(det)
        stats.add(data, untrusted_and_overload(det, data))
    f = stats.hot_dead_flags()[0]
    assert f[600, 700] & MaskBit.HOT and f[1420, 1150] & MaskBit.DEAD
    assert (f != 0).sum() < 200  # few false alarms over 6.2 Mpixel and 3 stills


def test_worker_run_inline(thaumatin_indexed, tmp_path):
    from diffractflow.artifacts import sha256_file
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import BadInput, run_inline

    from diffuse_extractor.artifacts import read_still
    from diffuse_extractor.worker import STAGE

    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    expt = vol / "in" / "still.expt"
    shutil.copy(thaumatin_indexed[0], expt)
    job = JobRequest(job_id="de-1", service="diffuse-extractor",
                     inputs={"experiments": ArtifactRef(path="in/still.expt", sha256=sha256_file(expt))},
                     params={"pngs": False, "beamstop": ["circle:0:1265,1300,40"], "bragg_radius_px": 4})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    assert ctx.metrics["tables"] == ["still_0000"]  # the flow picks the table by this, not by output names
    out = ctx.outputs["still_0000"]
    a = read_still(out, columns=["intensity"])
    assert a["provenance"]["job_id"] == "de-1" and ctx.metrics["n_pixels"] == len(a["pixels"]["intensity"])
    assert a["info"]["beamstop_mode"] == "given" and a["info"]["bragg_radius_px"] == 4
    assert (ctx.out_dir / "manifest.json").is_file()
    # corrupt input is a BadInput naming the file
    bad = vol / "in" / "bad.expt"
    bad.write_text("{not json")
    job2 = JobRequest(job_id="de-2", service="diffuse-extractor",
                      inputs={"experiments": ArtifactRef(path="in/bad.expt", sha256=sha256_file(bad))})
    with pytest.raises(BadInput, match="bad.expt"):
        run_inline(STAGE, job2, Settings(volume=vol))


def test_cli_bad_input_is_a_clear_usage_error(tmp_path):
    res = runner.invoke(app, ["run", "--expt", str(tmp_path / "missing.expt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing.expt" in res.output
    res = runner.invoke(app, ["run", "--expt", str(tmp_path / "x.expt"), "--out", str(tmp_path / "o"),
                              "--beamstop", "circle:0:1,2"])
    assert res.exit_code == 2 and "circle" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "nothing.h5")])
    assert res.exit_code == 2 and "nothing.h5" in res.output


def test_cli_inspect(cli_output):
    out, _ = cli_output
    res = runner.invoke(app, ["inspect", str(out / "indexed_0000.h5"), "--png", str(out / "insp")])
    assert res.exit_code == 0, res.output
    assert "all finite: True" in res.output and "P 41 21 2" in res.output
    assert (out / "insp" / "indexed_0000_masks.png").is_file()


def test_run_of_unindexed_stills_with_hot_dead_statistics(thaumatin_cbfs, tmp_path):
    """Three stills of a run: hot/dead statistics first, beamstop found once, no crystal -> no hkl."""
    from dxtbx.imageset import ImageSetFactory
    from dxtbx.model.experiment_list import ExperimentListFactory

    from diffuse_extractor import ExtractionParams, pipeline
    from diffuse_extractor.artifacts import read_still

    el = ExperimentListFactory.from_filenames([str(p) for p in thaumatin_cbfs])
    iset = ImageSetFactory.imageset_from_anyset(el[0].imageset)
    for j in range(len(iset)):
        iset.set_scan(None, j)
        iset.set_goniometer(None, j)
    el = ExperimentListFactory.from_imageset_and_crystal(iset, None)
    expt = tmp_path / "run.expt"
    el.as_file(str(expt))
    res = pipeline.process(expt, tmp_path / "out", image_indices=[0, 1, 2], params=ExtractionParams(),
                           hot_dead=True, pngs=False)
    assert [r["index"] for r in res] == [0, 1, 2]
    a = [read_still(r["artifact"], columns=["intensity", "h", "x", "y"]) for r in res]
    assert all(x["provenance"]["parameters"]["hot_dead"] for x in a)
    assert a[1]["info"]["beamstop_mode"].startswith("auto (from the run")
    assert np.isnan(a[0]["pixels"]["h"]).all() and "crystal" not in a[0]
    # the three stills share static masks but their images differ
    assert np.array_equal(a[0]["masks"][0] & 3, a[2]["masks"][0] & 3)
    assert a[0]["attrs"]["image_path"].endswith("thau_3_2_0001.cbf")
    assert a[2]["attrs"]["image_path"].endswith("thau_3_2_0003.cbf")
    assert np.isfinite(a[2]["pixels"]["intensity"]).all()


def test_background_image_reading(thaumatin_cbfs, tmp_path):
    import dxtbx

    from diffuse_extractor.artifacts import InputError, read_background

    det = dxtbx.load(str(thaumatin_cbfs[0])).get_detector()
    bkg = read_background(thaumatin_cbfs[2], det)  # any dxtbx-readable image of the same detector
    assert len(bkg) == 1 and bkg[0].shape == (2527, 2463) and bkg[0].max() > 10
    bad = tmp_path / "small.npy"
    np.save(bad, np.zeros((10, 10)))
    with pytest.raises(InputError, match="small.npy"):
        read_background(bad, det)
    good = tmp_path / "flat.npy"
    np.save(good, np.ones((2527, 2463)))
    assert read_background(good, det)[0].sum() == 2527 * 2463
