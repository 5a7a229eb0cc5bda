"""The rendered rotation sweep: dxtbx reads it as one rotation sequence with the planted scan, DIALS' own
programs index it and recover the planted cell and orientation, the planted per-frame scales show in the counts,
and its diffuse frames agree with the stills generator's truth (geometry from dxtbx's models, not ours)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dxtbx  # DIALS/dxtbx are part of the platform (make setup installs them): a missing one is a failure
from dxtbx.imageset import ImageSequence
from dxtbx.model.experiment_list import ExperimentListFactory

from diff_sim_refiner.datasets.stills import DiffuseTruth, StillsRenderer
from diff_sim_refiner.datasets.sweep import SweepRenderer, SweepSpec, crystal_orientation, generate_sweep

# a reduced sweep: 8 frames of 0.5 deg on a 1 x 2 module detector, a fast-varying scale so it shows in 4 deg
SMALL = SweepSpec(n_frames=8, modules=(1, 2), n_blank_frames=2, phi_steps=2, mosaic_domains=10,
                  scale_amplitude=0.3, scale_period_deg=8.0, seed=11)
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    sr = SweepRenderer(SMALL)
    truth = generate_sweep(out, SMALL, renderer=sr)
    return out, truth, sr


def _frames(out: Path, prefix: str) -> list[str]:
    return [str(p) for p in sorted(out.glob(f"{prefix}_*.cbf"))]


def test_dxtbx_reads_one_rotation_sequence_with_the_planted_scan(sweep):
    out, truth, _ = sweep
    el = ExperimentListFactory.from_filenames(_frames(out, "sweep"))
    assert len(el.imagesets()) == 1
    iset = el.imagesets()[0]
    assert isinstance(iset, ImageSequence) and len(iset) == SMALL.n_frames
    scan, gonio = iset.get_scan(), iset.get_goniometer()
    assert scan.get_image_range() == (1, SMALL.n_frames)
    assert scan.get_oscillation() == pytest.approx((0.0, 0.5))
    assert scan.get_oscillation_range() == pytest.approx((0.0, 4.0))
    assert list(scan.get_exposure_times()) == pytest.approx([0.1] * SMALL.n_frames)
    assert gonio.get_rotation_axis() == pytest.approx((1.0, 0.0, 0.0))             # the detector's fast axis
    assert iset.get_detector()[0].get_fast_axis() == pytest.approx((1.0, 0.0, 0.0))
    assert iset.get_detector()[0].get_image_size() == SMALL.image_size == (487, 407)
    # the blank frames are their own rotation sequence over the same range
    blanks = ExperimentListFactory.from_filenames(_frames(out, "blank")).imagesets()
    assert len(blanks) == 1 and isinstance(blanks[0], ImageSequence)
    assert blanks[0].get_scan().get_oscillation() == pytest.approx((0.0, 2.0))
    assert truth["background_frames"] == ["blank_0001.cbf", "blank_0002.cbf"]
    assert [f["file"] for f in truth["frames"]] == [Path(p).name for p in _frames(out, "sweep")]


def _run(cmd: list[str], cwd: Path):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd[0]} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res.stdout


def test_dials_indexes_the_sweep_and_recovers_the_planted_cell_and_orientation(sweep, tmp_path):
    out, truth, _ = sweep
    _run(["dials.import", *_frames(out, "sweep")], tmp_path)
    _run(["dials.find_spots", "imported.expt", "nproc=1"], tmp_path)
    # known symmetry, as a user with a known crystal would; the detector and beam are the header's (with a 4 deg
    # wedge on a small detector a rotation of the detector about its normal trades off against the crystal's)
    _run(["dials.index", "imported.expt", "strong.refl", "space_group=P43212", "unit_cell=40,40,60,90,90,90",
          "indexing.method=real_space_grid_search", "detector.fix=all", "beam.fix=all"], tmp_path)
    el = ExperimentListFactory.from_json_file(str(tmp_path / "indexed.expt"), check_format=False)
    assert len(el) == 1
    cryst = el[0].crystal
    assert cryst.get_unit_cell().parameters() == pytest.approx(SMALL.unit_cell, rel=3e-3)
    # DIALS' A (at phi = 0) equals the planted A0 up to a symmetry operation of the lattice (integer, det 1)
    A = np.asarray(cryst.get_A()).reshape(3, 3)
    A0 = np.asarray(truth["A0"])
    M = np.linalg.inv(A0) @ A
    Mi = np.round(M)
    assert np.abs(M - Mi).max() < 0.01 and round(np.linalg.det(Mi)) == 1
    X = A0 @ Mi
    for j in range(3):                                  # each reciprocal axis within 0.1 deg of the planted one
        c = A[:, j] @ X[:, j] / np.linalg.norm(A[:, j]) / np.linalg.norm(X[:, j])
        assert math.degrees(math.acos(min(1.0, c))) < 0.1
    refl = __import__("dials.array_family.flex", fromlist=["reflection_table"]).reflection_table.from_file(
        str(tmp_path / "indexed.refl"))
    indexed = (refl.get_flags(refl.flags.indexed)).count(True)
    assert indexed >= 0.7 * len(refl) and indexed >= 100


def test_planted_scales_are_recorded_and_show_in_the_counts(sweep):
    out, truth, _ = sweep
    centres = np.array([(f["phi_start_deg"] + f["phi_end_deg"]) / 2 for f in truth["frames"]])
    scales = np.array([f["scale"] for f in truth["frames"]])
    assert centres == pytest.approx(0.25 + 0.5 * np.arange(SMALL.n_frames))
    assert scales == pytest.approx(np.exp(0.3 * np.sin(2 * np.pi * centres / 8.0 + 0.7)))   # the documented model
    assert truth["scale_model"]["amplitude"] == 0.3 and scales.max() / scales.min() > 1.5
    # counts: away from Bragg spots, (frame - mean blank) summed over pixels is the scaled diffuse, whose sum over
    # the detector hardly changes with 0.5 deg of rotation; so the sums follow the planted scales
    frames = np.stack([dxtbx.load(p).get_raw_data().as_numpy_array() for p in _frames(out, "sweep")]).astype(float)
    blank = np.mean([dxtbx.load(p).get_raw_data().as_numpy_array() for p in _frames(out, "blank")], axis=0)
    sel = (frames.min(0) >= 0) & (frames.max(0) < 40)
    sums = (frames[:, sel] - blank[sel]).sum(1)
    ratio = sums / scales
    assert np.std(ratio) / np.mean(ratio) < 0.03
    assert np.std(sums) / np.mean(sums) > 0.1


def test_sweep_diffuse_agrees_with_the_stills_truth_under_dxtbx_rotation(sweep):
    """The rendered diffuse over a frame is T(h) times the stills generator's static factors (polarisation, solid
    angle, air: independently checked in test_stills_dataset), with h from dxtbx's own goniometer and scan."""
    out, truth, sr = sweep
    T = DiffuseTruth.load(out)
    assert T.peak == pytest.approx(truth["diffuse_truth"]["peak_photons"])
    stills = sr.r
    assert isinstance(stills, StillsRenderer)
    el = ExperimentListFactory.from_filenames(_frames(out, "sweep"))
    iset = el.imagesets()[0]
    panel, beam, gonio, scan = iset.get_detector()[0], iset.get_beam(), iset.get_goniometer(), iset.get_scan()
    from scitbx import matrix

    A0 = np.asarray(truth["A0"])
    assert np.allclose(A0, crystal_orientation(SMALL) @ stills.B)
    rng = np.random.default_rng(1)
    nf, ns = SMALL.image_size
    f, s = rng.integers(0, nf, 600), rng.integers(0, ns, 600)
    s0 = np.asarray(beam.get_s0())
    pos = np.array([panel.get_pixel_lab_coord((fi + 0.5, si + 0.5)) for fi, si in zip(f, s)])
    q = pos / np.linalg.norm(pos, axis=1)[:, None] / beam.get_wavelength() - s0
    factors = stills.pol_omega * stills.air
    axis = matrix.col(gonio.get_rotation_axis())
    for image in (0, 5):                                # two frames with different orientations
        phi = scan.get_angle_from_array_index(image + 0.5)             # frame centre, degrees
        R = np.asarray(axis.axis_and_angle_as_r3_rotation_matrix(phi, deg=True)).reshape(3, 3)
        hkl = q @ np.linalg.inv(R @ A0).T
        t = T(hkl[:, 0], hkl[:, 1], hkl[:, 2])
        ok = (np.abs(hkl - np.round(hkl)).max(1) < 0.45) & ~sr.gaps[s, f] & (t > 0.5)
        assert ok.sum() > 100
        # a frame of 1e-4 deg: the diffuse at the frame centre
        d = sr.diffuse(A0, phi - 5e-5, 1e-4)
        np.testing.assert_allclose(d[s, f][ok], t[ok] * factors[s, f][ok], rtol=1e-3)
    # over a whole 0.5 deg frame with phi_steps sub-steps: the mean of the stills renders at the sub-step midpoints
    a, b = SMALL.frame_phi(3)
    mids = a + (np.arange(SMALL.phi_steps) + 0.5) * (b - a) / SMALL.phi_steps
    mean_stills = np.mean([stills.diffuse(np.asarray(axis.axis_and_angle_as_r3_rotation_matrix(m, deg=True))
                                          .reshape(3, 3) @ A0) for m in mids], axis=0)
    np.testing.assert_allclose(sr.diffuse(A0, a, b - a), mean_stills, rtol=1e-3, atol=1e-6)


def test_generation_is_reproducible(tmp_path, sweep):
    out, _, sr = sweep
    one = replace(SMALL, n_frames=1, n_blank_frames=1)
    generate_sweep(tmp_path, one, renderer=SweepRenderer(one, stills=sr.r))
    assert (tmp_path / "sweep_0001.cbf").read_bytes() == (out / "sweep_0001.cbf").read_bytes()
    assert json.loads((tmp_path / "truth.json").read_text())["frames"][0] == \
        json.loads((out / "truth.json").read_text())["frames"][0]
