"""CLI `run` / `inspect`, input formats, output layout, interactive calibration and the bus worker."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest
import tifffile
import yaml
from typer.testing import CliRunner

from stem_polar.cli import app

runner = CliRunner()

EXPECTED_FIXED = {
    "kspace/mu_global.npy", "kspace/sigma_global.npy",
    "realspace/S_argmax.tif", "realspace/S_confidence.tif", "realspace/Ex.tif", "realspace/Ey.tif",
    "realspace/E_mag.tif", "realspace/E_angle.tif", "realspace/com_x.tif", "realspace/com_y.tif",
    "figures/montage_templates.png", "figures/hsv_polarisation.png", "figures/DPC_quiver.png",
    "logs/run.json", "logs/config.yaml", "logs/timings.txt", "report.html",
}


def expected_layout(ids):
    s = set(EXPECTED_FIXED)
    for c in ids:
        s |= {f"kspace/template_T_{c}.npy", f"kspace/gate_G_{c}.npy", f"kspace/mu_cluster_{c}.npy",
              f"kspace/mu_cluster_{c}.png", f"realspace/S_cluster_{c}.tif"}
    return s


def listing(d):
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, scan):
    d = tmp_path_factory.mktemp("in")
    with h5py.File(d / "patterns4d.h5", "w") as f:
        f.create_dataset("patterns", data=scan["data"], chunks=(1, 24, 32, 32))
    with h5py.File(d / "patterns3d.h5", "w") as f:
        f.create_dataset("entry/data", data=scan["data"].reshape(576, 32, 32).astype(np.float32))
    lab = np.array([4, 1, 2])[scan["labels"]]
    np.savez(d / "clusters.npz", labels=lab, cluster_ids=np.array([1, 2, 4, 8]))
    np.save(d / "clusters.npy", scan["labels"])
    (d / "config.yaml").write_text(yaml.safe_dump({
        "templates": {"top_percent": 10, "smooth_sigma": 1.5},
        "dpc": {"gate_mode": "union", "baseline": "median", "roi": [0, 9], "field_scale": 2.0},
        "calibration": {"pixel_size": 5.0, "pixel_size_units": "angstrom", "convergence_angle": 21.4},
        "validation": {"enable_split_half": True},
    }))
    return d


def run_cli(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runner.invoke(app, [str(a) for a in args])


def rep_quality_ok_or_warned(rep):
    """run.json holds the quality report; every failed check is among the warnings."""
    q = rep["quality"]
    assert set(q["checks"]) == {"baseline", "gate_bias", "confidence", "gate_signal", "field_split_half_ssim"}
    return all(any(f"'{k}' failed" in w for w in rep["warnings"]) for k in q["failed"])


def test_run_writes_the_seed_layout(files, tmp_path, scan, corrcoef):
    out = tmp_path / "out"
    r = run_cli("run", "--data", files / "patterns4d.h5", "--dset", "patterns", "--labels", files / "clusters.npz",
                "--scan-shape", 24, 24, "--out", out, "--config", files / "config.yaml", "--chunks", 100, "-q")
    assert r.exit_code == 0, r.output
    # declared cluster 8 is empty: reported and skipped; ids are the label values
    assert listing(out) == expected_layout([1, 2, 4]) | {"realspace/iCoM.tif"}
    for name in ("Ex", "Ey", "E_mag", "E_angle", "com_x", "com_y", "S_argmax", "S_confidence", "S_cluster_4"):
        assert tifffile.imread(out / "realspace" / f"{name}.tif").shape == (24, 24)
    ex = tifffile.imread(out / "realspace/Ex.tif")
    assert corrcoef(ex, scan["fx"]) < -0.95  # E = -field_scale x CoM: against the planted deflection
    # mu_global is the raw mean pattern, like the cluster means (counts-weighted mean of mu_cluster_{c})
    d = scan["data"].reshape(-1, 32, 32).astype(np.float64)
    np.testing.assert_allclose(np.load(out / "kspace/mu_global.npy"), d.mean(axis=0), rtol=1e-5)
    assert rep_quality_ok_or_warned(json.loads((out / "logs/run.json").read_text())["report"])
    amax = tifffile.imread(out / "realspace/S_argmax.tif")
    assert np.mean(amax == np.array([4, 1, 2])[scan["domains"]]) > 0.98
    np.testing.assert_allclose(np.hypot(ex, tifffile.imread(out / "realspace/Ey.tif")),
                               tifffile.imread(out / "realspace/E_mag.tif"), rtol=1e-5)
    t = np.load(out / "kspace/template_T_4.npy")
    assert t.shape == (32, 32) and np.linalg.norm(t) == pytest.approx(1.0, rel=1e-5)
    run = json.loads((out / "logs/run.json").read_text())
    rep = run["report"]
    assert rep["clusters"]["ids"] == [1, 2, 4]
    assert rep["clusters"]["skipped"][0]["id"] == 8
    assert any("cluster 8" in w for w in rep["warnings"])
    assert rep["calibration"]["convergence_angle_mrad"] == 21.4
    assert rep["calibration"]["scan_step_nm"] == pytest.approx(0.5)
    assert set(rep["split_half_ssim"]) == {"1", "2", "4"}
    assert set(rep["gate_coverage"]) == {"1", "2", "4"}
    assert rep["center"]["method"].startswith("smoothed")
    cfg = yaml.safe_load((out / "logs/config.yaml").read_text())
    assert cfg["dpc"]["field_scale"] == 2.0
    assert "pass2_maps" in (out / "logs/timings.txt").read_text()


def test_run_3d_float_npy_labels_and_center_option(files, tmp_path):
    out = tmp_path / "o3"
    r = run_cli("run", "--data", files / "patterns3d.h5", "--labels", files / "clusters.npy", "--scan-shape", 24, 24,
                "--out", out, "--center", 15.3, 16.2, "--set", "dpc.baseline=median", "--set", "dpc.gate_mode=union",
                "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "logs/run.json").read_text())["report"]
    assert rep["center"]["y"] == 15.3 and rep["center"]["method"] == "config"
    assert rep["dtype"] == "float32"
    assert listing(out) >= expected_layout([0, 1, 2])


@pytest.mark.parametrize("args,msg", [
    (["--scan-shape", "20", "24"], "480 positions but the data hold 576"),
    (["--dset", "nope"], "no dataset 'nope'"),
    (["--device", "cuda:0"], "CuPy is not importable"),
    (["--set", "templates.top_percnt=3"], "top_percnt"),
])
def test_run_bad_input_exit_2(files, tmp_path, args, msg):
    base = {"--data": str(files / "patterns3d.h5"), "--dset": "entry/data", "--labels": str(files / "clusters.npy"),
            "--out": str(tmp_path / "bad")}
    argv = ["run", "--scan-shape", "24", "24"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    argv += args
    r = run_cli(*argv)
    assert r.exit_code == 2, r.output
    assert msg in " ".join(r.output.split())
    assert not (tmp_path / "bad" / "realspace").exists()  # nothing written


def test_wrong_label_length_and_bad_dims(files, tmp_path):
    np.save(tmp_path / "short.npy", np.zeros(575, int))
    r = run_cli("run", "--data", files / "patterns4d.h5", "--dset", "patterns", "--labels", tmp_path / "short.npy",
                "--out", tmp_path / "o")
    assert r.exit_code == 2 and "575 entries, expected 576" in r.output
    assert "short.npy" in r.output.replace("\n", "")  # the file is named (pipeline.run_files, shared with the worker)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["x"] = np.zeros((24, 32))
    r = run_cli("run", "--data", tmp_path / "flat.h5", "--dset", "x", "--labels", tmp_path / "short.npy",
                "--scan-shape", 4, 6, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "must be 3-D (N, ky, kx) or 4-D" in r.output


def test_nan_in_data_is_a_clear_error(files, tmp_path, scan):
    d = scan["data"].reshape(576, 32, 32).astype(np.float64)
    d[400, 0, 0] = np.nan
    with h5py.File(tmp_path / "nan.h5", "w") as f:
        f["p"] = d
    r = run_cli("run", "--data", tmp_path / "nan.h5", "--labels", files / "clusters.npy", "--scan-shape", 24, 24,
                "--out", tmp_path / "o", "-q")
    assert r.exit_code == 2 and "NaN or inf" in r.output and "400" in r.output


def test_dectris_master_with_bitshuffle_lz4(tmp_path, scan, files):
    import hdf5plugin

    frames = scan["data"].reshape(576, 32, 32)
    for i in range(2):
        with h5py.File(tmp_path / f"scan_data_00000{i + 1}.h5", "w") as f:
            f.create_dataset("entry/data/data", data=frames[i * 300:(i + 1) * 300], chunks=(10, 32, 32),
                             **hdf5plugin.Bitshuffle(cname="lz4"))
    with h5py.File(tmp_path / "scan_master.h5", "w") as f:
        g = f.create_group("entry/data")
        for i in range(2):
            g[f"data_00000{i + 1}"] = h5py.ExternalLink(f"scan_data_00000{i + 1}.h5", "entry/data/data")
    from stem_polar.artifacts import open_source

    src = open_source(tmp_path / "scan_master.h5", None, (24, 24))
    assert src.n_frames == 576
    np.testing.assert_array_equal(src.read(290, 310), frames[290:310])
    src.close()
    r = run_cli("run", "--data", tmp_path / "scan_master.h5", "--labels", files / "clusters.npy", "--scan-shape",
                24, 24, "--out", tmp_path / "o", "-q")
    assert r.exit_code == 0, r.output


def test_h5_source_reads_any_flat_range(files, scan):
    from stem_polar.artifacts import open_source

    src = open_source(files / "patterns4d.h5", "patterns")
    flat = scan["data"].reshape(576, 32, 32)
    for a, b in ((0, 7), (20, 55), (570, 576), (24, 48)):
        np.testing.assert_array_equal(src.read(a, b), flat[a:b])
    src.close()


def test_inspect(files, tmp_path):
    r = run_cli("inspect", "--data", files / "patterns4d.h5", "--dset", "patterns", "--json", "--full",
                "--png", tmp_path / "i.png")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["scan_shape"] == [24, 24] and info["frame_shape"] == [32, 32] and info["dtype"] == "uint16"
    assert info["frames_read"] == 576
    assert abs(info["center_yx"][0] - 15.3) < 0.5 and abs(info["center_yx"][1] - 16.2) < 0.5
    assert (tmp_path / "i.png").stat().st_size > 1000


def test_interactive_center_and_kspace_via_cli(files, tmp_path, monkeypatch):
    from stem_polar.core import interactive

    clicks = iter([[(15.0, 16.0)], [(15.0, 5.0), (15.0, 27.0)]])  # centre, then one pair of opposite peaks

    def driver(fig, ax):
        interactive.click_driver(next(clicks))(fig, ax)

    monkeypatch.setattr(interactive, "DEFAULT_DRIVER", driver)
    out = tmp_path / "oi"
    r = run_cli("run", "--data", files / "patterns4d.h5", "--dset", "patterns", "--labels", files / "clusters.npy",
                "--out", out, "--interactive-center", "--interactive-kspace", "--known-spacing", 2.0, "-q")
    assert r.exit_code == 0, r.output
    run = json.loads((out / "logs/run.json").read_text())
    c = run["interactive"]["center"]
    assert abs(c["y"] - 15.0) < 0.05 and abs(c["x"] - 16.0) < 0.05
    assert run["report"]["center"]["method"] == "interactive"
    k = run["interactive"]["kspace"]
    assert k["applied"] and k["pixel_size_k"] == pytest.approx(2 * 0.5 / 22.0, rel=1e-2)
    cfg = yaml.safe_load((out / "logs/config.yaml").read_text())
    assert cfg["calibration"]["center_y"] == pytest.approx(15.0, abs=0.05)
    assert cfg["calibration"]["k_units"] == "1/Å"
    assert cfg["calibration"]["pixel_size_kx"] == pytest.approx(1 / 22.0, rel=1e-2)


def test_worker_inline(files, tmp_path, scan):
    from diffractflow.config import Settings
    from diffractflow.messages import JobRequest
    from diffractflow.runtime import BadInput, run_inline

    from stem_polar.worker import STAGE

    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    import shutil

    shutil.copy(files / "patterns4d.h5", vol / "in/p.h5")
    shutil.copy(files / "clusters.npy", vol / "in/l.npy")
    settings = Settings(volume=vol)
    job = JobRequest(job_id="sp1", service="stem-polar", inputs={"data": {"path": "in/p.h5"},
                                                                 "labels": {"path": "in/l.npy"}},
                     params={"dset": "patterns", "config": {"dpc": {"gate_mode": "union", "baseline": "median"}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = run_inline(STAGE, job, settings)
    assert ctx.metrics["clusters"] == [0, 1, 2]
    with h5py.File(ctx.outputs["polar_maps"], "r") as f:
        assert f.attrs["schema"] == "stem_polar.maps"
        assert f["entry/realspace/Ex"].shape == (24, 24)
        assert f["entry/realspace"].attrs["NX_class"] == "NXdata"
    assert (ctx.out_dir / "realspace/Ex.tif").exists()
    bad = JobRequest(job_id="sp2", service="stem-polar", inputs={"data": {"path": "in/p.h5"}},
                     params={"dset": "patterns", "scan_shape": [20, 20]})
    with pytest.raises(BadInput, match="does not match"):
        run_inline(STAGE, bad, settings)
    np.save(vol / "in/short.npy", np.zeros(575, int))  # the same check and message as the CLI's (run_files)
    short = JobRequest(job_id="sp3", service="stem-polar", inputs={"data": {"path": "in/p.h5"},
                                                                   "labels": {"path": "in/short.npy"}},
                       params={"dset": "patterns"})
    with pytest.raises(BadInput, match=r"short\.npy: labels have 575 entries, expected 576"):
        run_inline(STAGE, short, settings)
    with pytest.raises(Exception, match="top_percnt"):
        STAGE.params_model.model_validate({"config": {"templates": {"top_percnt": 1}}})


def test_blockfile_via_rosettasciio_lazy(tmp_path, scan, files, corrcoef):
    from rsciio.blockfile import file_writer

    d = np.clip(scan["data"], 0, 255).astype(np.uint8)
    axes = [dict(name=n, units=u, navigate=nav, scale=1.0, offset=0.0, size=sz, index_in_array=i)
            for i, (n, u, nav, sz) in enumerate([("y", "nm", True, 24), ("x", "nm", True, 24),
                                                 ("ky", "cm", False, 32), ("kx", "cm", False, 32)])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        file_writer(str(tmp_path / "s.blo"), {"data": d, "axes": axes, "metadata": {}, "original_metadata": {},
                                              "attributes": {"_lazy": False}}, show_progressbar=False)
    from stem_polar.artifacts import DaskSource, open_source

    src = open_source(tmp_path / "s.blo")
    assert isinstance(src, DaskSource) and src.scan_shape == (24, 24) and src.dtype == np.uint8
    np.testing.assert_array_equal(src.read(30, 70), d.reshape(576, 32, 32)[30:70])
    out = tmp_path / "ob"
    r = run_cli("run", "--data", tmp_path / "s.blo", "--labels", files / "clusters.npy", "--out", out,
                "--set", "dpc.gate_mode=union", "--set", "dpc.baseline=median", "--set", "dpc.roi=[0, 9]", "-q")
    assert r.exit_code == 0, r.output
    assert corrcoef(tifffile.imread(out / "realspace/Ex.tif"), scan["fx"]) < -0.95


def test_worker_params_are_strict():
    from pydantic import ValidationError

    from stem_polar.worker import Params

    with pytest.raises(ValidationError, match="scan_shap"):
        Params.model_validate({"scan_shap": [1, 2]})
    with pytest.raises(ValidationError):
        Params.model_validate({"device": "tpu"})
    assert Params.model_validate({"device": "cuda:1", "scan_shape": [4, 5]}).scan_shape == (4, 5)
