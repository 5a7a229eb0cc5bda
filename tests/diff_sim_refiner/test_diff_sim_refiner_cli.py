"""CLI (`nanobragg` with nanoBragg's flags, `run` from a config file, `geometry`) and the bus worker handler."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diff_sim_refiner.cli import app
from diff_sim_refiner.core import io as nbio
from diff_sim_refiner.core.config import BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.simulator import simulate
from diff_sim_refiner.nbargs import FlagError, build_job, parse_args

runner = CliRunner()
SMALL = ["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5", "-lambda", "1.0",
         "-distance", "100", "-detpixels", "48", "-pixel", "0.1", "-oversample", "1", "-misset", "5", "3", "-2"]


@pytest.mark.parametrize("argv,needle", [
    (["-cell", "100", "-bogus_flag", "3"], "unknown flag -bogus_flag"),
    (["-cell", "100", "-distance", "far"], "flag -distance expects a number, got 'far'"),
    (["-cell", "100", "-roi", "1", "2"], "flag -roi expects 4 values"),
    (["-cell", "100", "-N", "2.5"], "flag -N expects an integer"),
    (["-cell", "100", "-water", "5"], "flag -water"),
    (["-cell", "100", "-misset", "1", "x", "3"], "flag -misset expects a number"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["nanobragg", *argv, "-default_F", "1"])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_inputs_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["nanobragg", "-cell", "100", "-detpixels", "8"])
    assert res.exit_code == 2 and "no structure factors" in res.output
    res = runner.invoke(app, ["nanobragg", "-mat", str(tmp_path / "none.mat"), "-default_F", "1", "-detpixels", "8"])
    assert res.exit_code == 2 and "none.mat" in res.output


def test_nanobragg_writes_float_int_noise_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["nanobragg", *SMALL, "-floatfile", "f.bin", "-intfile", "i.img",
                              "-noisefile", "n.img", "-seed", "5", "-noprogress", "-roi", "4", "40", "2", "30"])
    assert res.exit_code == 0, res.output
    img = nbio.read_floatfile("f.bin", 48, 48)
    job = build_job(parse_args(SMALL))
    with torch.no_grad():
        ref = simulate(job.crystal, job.detector, job.beam).numpy()
    mask = np.zeros_like(img, bool)
    mask[2:31, 4:41] = True
    np.testing.assert_allclose(img[mask], ref[mask], rtol=1e-6, atol=1e-6 * ref.max())
    assert not img[~mask].any()
    hdr, ints = nbio.read_smv("i.img")
    assert ints.shape == (48, 48) and hdr["SIZE1"] == "48" and float(hdr["DISTANCE"]) == pytest.approx(100.0)
    scale = 55000.0 / img[mask].max()  # nanoBragg's auto-scale, +40 ADC offset, 0 outside the ROI
    np.testing.assert_array_equal(ints[mask], np.floor(np.clip(img[mask] * scale + 40, 0, 65535) + 0.5))
    assert not ints[~mask].any()
    _, noisy = nbio.read_smv("n.img")
    assert abs(float(noisy[mask].astype(float).sum() - 40 * mask.sum()) / img[mask].sum() - 1) < 0.05
    (tmp_path / "again").mkdir()
    monkeypatch.chdir(tmp_path / "again")
    runner.invoke(app, ["nanobragg", *SMALL, "-noisefile", "n.img", "-seed", "5", "-noprogress", "-nopgm",
                        "-roi", "4", "40", "2", "30"])
    assert np.array_equal(nbio.read_smv("n.img")[1], noisy)  # -seed makes the noise reproducible
    assert (tmp_path / "again" / "floatimage.bin").is_file()  # nanoBragg's default output names


def test_pix0_and_convention_flags_map_like_nanobragg():
    a = parse_args(["-cell", "50", "-default_F", "1", "-pix0_vector_mm", "-216.3", "215.2", "-230.2",
                    "-fdet_vector", "1", "0", "0", "-sdet_vector", "0", "-1", "0", "-odet_vector", "0", "0", "-1",
                    "-beam_vector", "0", "0", "-1", "-detpixels", "100"])
    job = build_job(a)
    assert job.detector.detector_convention.value == "CUSTOM"
    assert job.detector.pix0_override_m == pytest.approx((-0.2163, 0.2152, -0.2302))  # mm -> m
    with_beam = build_job(parse_args(["-cell", "50", "-default_F", "1", "-pix0_vector", "0.1", "0.1", "-0.2",
                                      "-Xbeam", "5", "-detpixels", "100"]))
    assert with_beam.detector.pix0_override_m is None  # beam centre given: nanoBragg's pivot wins
    xds = build_job(parse_args(["-cell", "50", "-default_F", "1", "-xds", "-ORGX", "30.5", "-ORGY", "20.5",
                                "-detpixels", "64", "-distance", "90"]))
    assert xds.detector.pivot.value == "SAMPLE"
    assert xds.detector.beam_center_f == pytest.approx(3.0) and xds.detector.beam_center_s == pytest.approx(2.0)
    mos = build_job(parse_args(["-cell", "50", "-default_F", "1", "-Xbeam", "3", "-Ybeam", "4", "-detpixels", "64"]))
    assert (mos.detector.beam_center_s, mos.detector.beam_center_f) == (3.0, 4.0)
    ph = build_job(parse_args(["-cell", "50", "-default_F", "1", "-osc", "0.5"]))
    assert ph.crystal.phi_steps == 2 and ph.crystal.phi_step_deg == pytest.approx(0.25)  # nanoBragg's auto steps
    mo = build_job(parse_args(["-cell", "50", "-default_F", "1", "-mosaic", "0.3"]))
    assert mo.crystal.effective_mosaic_domains() == 10
    with pytest.raises(FlagError, match="no crystal"):
        build_job(parse_args(["-default_F", "1"]))


def test_geometry_command_prints_vectors():
    res = runner.invoke(app, ["geometry", "--", "-xds", "-distance", "150", "-detpixels", "100", "-cell", "50",
                              "-default_F", "1"])
    assert res.exit_code == 0, res.output
    assert "odet" in res.output and "0.15" in res.output


def test_run_command_renders_yaml_config_to_hdf5(tmp_path):
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(
        "crystal: {cell_a: 100, cell_b: 100, cell_c: 100, N_cells: [5, 5, 5], default_F: 100,\n"
        "          misset_deg: [5, 3, -2], mosaic_spread_deg: 0.8, mosaic_domains: 5, mosaic_seed: 42}\n"
        "detector: {fpixels: 64, spixels: 64, pixel_size_mm: 0.1, distance_mm: 100}\n"
        "beam: {wavelength_A: 1.0, fluence: 1.0e28}\n")
    out = tmp_path / "sim.h5"
    res = runner.invoke(app, ["run", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    from diff_sim_refiner.artifacts import read_simulation

    img, meta = read_simulation(out)
    ref = simulate(CrystalConfig(N_cells=(5, 5, 5), default_F=100.0, misset_deg=(5, 3, -2), mosaic_spread_deg=0.8,
                                 mosaic_domains=5, mosaic_seed=42),
                   DetectorConfig(fpixels=64, spixels=64), BeamConfig(fluence=1e28)).numpy()
    np.testing.assert_allclose(img, ref, rtol=1e-6)
    assert meta["crystal"]["mosaic_seed"] == 42 and meta["detector"]["detector_convention"] == "MOSFLM"
    with h5py.File(out) as fh:
        assert fh.attrs["schema"] == "diffractflow.diff_sim_refiner.simulation"
        assert fh["entry"].attrs["NX_class"] == "NXentry" and fh["entry/data"].attrs["signal"] == "image"
    bad = tmp_path / "bad.yaml"
    bad.write_text("crystal: {cell_q: 3}\n")
    res = runner.invoke(app, ["run", str(bad), "-o", str(tmp_path / "x.h5")])
    assert res.exit_code == 2 and "cell_q" in res.output


def test_worker_handler_renders_job_to_artifact(tmp_path):
    from diffractflow.artifacts import Volume
    from diffractflow.config import Settings
    from diffractflow.messages import JobRequest
    from diffractflow.runtime import BadInput, JobContext

    from diff_sim_refiner.core.params import SimulateParams as Params
    from diff_sim_refiner.worker import STAGE

    vol = Volume(tmp_path)
    out_dir = vol.job_dir("diff-sim-refiner", "j1")
    params = Params(nanobragg=SMALL)
    job = JobRequest(job_id="j1", service="diff-sim-refiner", params=params.model_dump())
    ctx = JobContext(job=job, volume=vol, out_dir=out_dir, settings=Settings(volume=tmp_path))
    STAGE.handler(ctx, params)
    assert ctx.outputs["image"].name == "simulation.h5"
    with h5py.File(ctx.outputs["image"]) as fh:
        img = fh["entry/data/image"][()]
        assert json.loads(fh.attrs["parameters"])["crystal"]["N_cells"] == [5, 5, 5]
    j = build_job(parse_args(SMALL))
    np.testing.assert_allclose(img, simulate(j.crystal, j.detector, j.beam).numpy(), rtol=1e-6)
    assert ctx.metrics["fpixels"] == 48 and ctx.metrics["sum_photons"] == pytest.approx(float(img.sum()), rel=1e-6)
    with pytest.raises(BadInput, match="hkl"):
        STAGE.handler(ctx, Params(nanobragg=["-cell", "50", "-hkl", "x.hkl"]))
    with pytest.raises(BadInput, match="unknown flag"):
        STAGE.handler(ctx, Params(nanobragg=["-cell", "50", "-default_F", "1", "-frobnicate"]))
    with pytest.raises(BadInput, match="max_pixels"):
        STAGE.handler(ctx, Params(nanobragg=SMALL, max_pixels=100))


def test_run_command_accepts_nanobragg_flags_in_the_config(tmp_path):
    cfg = tmp_path / "nb.json"
    cfg.write_text(json.dumps({"nanobragg": SMALL}))
    out = tmp_path / "nb.h5"
    res = runner.invoke(app, ["run", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    from diff_sim_refiner.artifacts import read_simulation

    img, _ = read_simulation(out)
    j = build_job(parse_args(SMALL))
    np.testing.assert_allclose(img, simulate(j.crystal, j.detector, j.beam).numpy(), rtol=1e-6)


def test_console_script_fast_exit_leaves_complete_outputs(tmp_path, monkeypatch):
    """The real ``diff-sim-refiner`` process ends with os._exit after a run: its log and files must be
    complete and identical to an in-process run's."""
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "diff-sim-refiner"
    flags = [*SMALL, "-floatfile", "f.bin", "-intfile", "i.img", "-noisefile", "n.img", "-seed", "3",
             "-noprogress", "-roi", "4", "40", "2", "30"]
    (tmp_path / "sub").mkdir()
    r = subprocess.run([str(exe), "nanobragg", *flags], cwd=tmp_path / "sub", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "writing n.img" in r.stdout.splitlines()[-1]          # the last log line made it out
    (tmp_path / "inproc").mkdir()
    monkeypatch.chdir(tmp_path / "inproc")
    assert runner.invoke(app, ["nanobragg", *flags]).exit_code == 0
    for name in ("f.bin", "i.img", "n.img"):
        assert (tmp_path / "sub" / name).read_bytes() == (tmp_path / "inproc" / name).read_bytes(), name
