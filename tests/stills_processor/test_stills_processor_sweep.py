"""Rotation sweeps frame by frame (issue 17): one DIALS sequence model from the first frames (worker mode
``sequence``), then a one-image rotation experiment per frame (mode ``frame_model``), and ``frame_info`` for
files as they land. Data: a planted P 41 21 2 crystal rendered over 12 frames of 0.5 deg
(``stills_processor.synthetic.write_rotation_sequence``); the model is refined on frames 1-8 only.

References: the planted cell; ``dials.find_spots``' strong spots on each frame; DIALS' own predictors
(scan-static on the one-frame experiment, scan-varying on the sequence model); dxtbx's reading of the headers.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import dials  # noqa: F401  (part of the platform: a missing DIALS is a failure, not a skip)

from diffractflow.artifacts import sha256_file
from diffractflow.config import Settings
from diffractflow.messages import ArtifactRef, JobRequest
from diffractflow.runtime import BadInput, run_inline

from stills_processor.worker import STAGE

N_FRAMES, N_INDEXED, OSC = 12, 8, 0.5
INSIDE, BEYOND = 5, 12  # frame numbers: inside the refined range, and beyond it


def _ref(volume: Path, path: Path) -> ArtifactRef:
    return ArtifactRef(path=str(path.relative_to(volume)), sha256=sha256_file(path))


def _job(volume: Path, job_id: str, inputs: dict, **params):
    job = JobRequest(job_id=job_id, service="stills-processor",
                     inputs={k: _ref(volume, p) for k, p in inputs.items()}, params=params)
    return run_inline(STAGE, job, Settings(volume=volume))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """(volume, truth): 12 rendered rotation frames on a volume."""
    from stills_processor.synthetic import write_rotation_sequence

    vol = tmp_path_factory.mktemp("sweep_volume")
    truth = write_rotation_sequence(vol / "incoming" / "sweep", n_frames=N_FRAMES, osc_deg=OSC)
    return vol, truth


@pytest.fixture(scope="module")
def sv_model(sweep):
    """Frames 1-8 as ONE sequence through the worker (mode sequence, scan-varying, no integration)."""
    vol, truth = sweep
    ctx = _job(vol, "seq-sv", {f"image{i}": p for i, p in enumerate(truth.paths[:N_INDEXED])},
               mode="sequence", scan_varying=True, space_group="P41212",
               phil=["indexing.method=fft1d"])  # fft1d: same solution here, a few times faster than fft3d
    return ctx


def _frame(truth, number: int) -> Path:
    return truth.paths[number - 1]


def _frame_model(vol, model_path, frame_path, job_id):
    return _job(vol, job_id, {"model": model_path, "image0": frame_path}, mode="frame_model")


def _load(path):
    from dxtbx.model.experiment_list import ExperimentList

    return ExperimentList.from_file(str(path))  # check_format: the frame's image must be readable


# ------------------------------------------------------------------------------------ mode sequence
def test_sequence_mode_outputs_and_metrics(sweep, sv_model):
    from dials.array_family import flex

    vol, truth = sweep
    out, m = sv_model.outputs, sv_model.metrics
    assert set(out) == {"summary", "experiments", "reflections", "indexed"}  # no integration asked
    assert out["reflections"] == out["indexed"] and out["experiments"].suffix == ".expt"
    assert m["status"] == "indexed" and m["n_frames"] == N_INDEXED
    np.testing.assert_allclose(m["unit_cell"], truth.unit_cell, rtol=1e-3)
    assert m["space_group"] == "P 41 21 2"
    refl = flex.reflection_table.from_file(str(out["reflections"]))
    assert m["n_indexed"] == len(refl) and m["n_indexed"] > 0.8 * m["n_spots"] > 300
    assert m["n_integrated"] == 0 and set(refl["miller_index"]) != {(0, 0, 0)}  # indexed spots, not integrated
    assert m["rmsd_x_px"] < 0.3 and m["rmsd_y_px"] < 0.3 and m["rmsd_phi_deg"] < 0.2
    assert m["image_range"] == [1, N_INDEXED] and m["oscillation_deg"] == pytest.approx([0.0, OSC])
    e = _load(out["experiments"])[0]
    assert m["scan_varying"] and e.crystal.num_scan_points == N_INDEXED + 1


def test_sequence_mode_refuses_frames_of_two_sweeps(sweep, tmp_path):
    vol, truth = sweep
    other = vol / "incoming" / "other"
    other.mkdir(exist_ok=True)
    for p in truth.paths[:2]:
        shutil.copy(p, other / p.name.replace("synth", "other"))
    frames = [truth.paths[0], truth.paths[1], *sorted(other.glob("*.cbf"))]
    with pytest.raises(BadInput, match="ONE rotation sweep"):
        _job(vol, "seq-two", {f"image{i}": p for i, p in enumerate(frames)}, mode="sequence")


# --------------------------------------------------------------------------------- mode frame_model
def _strong_and_predicted(expts):
    """dials.find_spots' strong spots on the one frame, and DIALS' predictions for the experiment."""
    from dials.array_family import flex
    from dials.command_line.find_spots import working_phil

    p = working_phil.extract()
    p.spotfinder.mp.nproc = 1
    strong = flex.reflection_table.from_observations(expts, p)
    pred = flex.reflection_table.from_predictions(expts[0])
    return (np.array(strong["xyzobs.px.value"]).reshape(-1, 3), np.array(pred["xyzcal.px"]).reshape(-1, 3), pred)


def _match(obs, cal):
    """Distance (px) from each predicted reflection to the nearest strong spot on the detector."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(obs[:, :2]).query(cal[:, :2])
    return d


@pytest.mark.parametrize("number", [INSIDE, BEYOND])
def test_frame_model_predictions_land_on_the_frames_spots(sweep, sv_model, number):
    vol, truth = sweep
    ctx = _frame_model(vol, sv_model.outputs["experiments"], _frame(truth, number), f"fm-{number}")
    assert set(ctx.outputs) == {"experiments"}
    el = _load(ctx.outputs["experiments"])
    e = el[0]
    assert len(el) == 1 and len(e.imageset) == 1 and e.imageset.get_path(0) == str(_frame(truth, number))
    assert e.scan.get_image_range() == (number, number)
    assert e.scan.get_oscillation() == pytest.approx(((number - 1) * OSC, OSC))  # the header's absolute angle
    assert e.crystal.num_scan_points == 0
    m = ctx.metrics
    assert m["frame_number"] == number and m["inside_model_scan"] == (number <= N_INDEXED)
    assert m["crystal_source"] == ("scan_point" if number <= N_INDEXED else "static")
    obs, cal, _ = _strong_and_predicted(el)
    assert len(cal) > 100 and len(obs) > 100
    d = _match(obs, cal)
    assert np.median(d) < 1.0  # px (measured ~0.05)
    assert np.mean(d < 2.0) > 0.75  # most predictions have their spot (the rest: weak, or rocking into neighbours)
    # negative control: the same frame modelled one oscillation width off no longer fits
    from dxtbx.model import Scan
    from dxtbx.model.experiment_list import Experiment, ExperimentList

    wrong = Scan(e.scan)
    wrong.set_oscillation((e.scan.get_oscillation()[0] + OSC, OSC))
    off = ExperimentList([Experiment(imageset=e.imageset, beam=e.beam, detector=e.detector,
                                     goniometer=e.goniometer, scan=wrong, crystal=e.crystal)])
    d_off = _match(obs, _strong_and_predicted(off)[1])
    assert np.median(d_off) > 5.0 and np.mean(d_off < 2.0) < 0.5


def _setting_matrix(expt, image_number: int) -> np.ndarray:
    """F R(phi) S A at the centre of image ``image_number`` of ``expt``'s scan (dxtbx's models)."""
    from scitbx import matrix

    g = expt.goniometer
    phi = expt.scan.get_angle_from_image_index(image_number + 0.5, deg=False)
    R = matrix.col(g.get_rotation_axis_datum()).axis_and_angle_as_r3_rotation_matrix(phi, deg=False)
    M = matrix.sqr(g.get_fixed_rotation()) * R * matrix.sqr(g.get_setting_rotation()) * matrix.sqr(expt.crystal.get_A())
    return np.array(M).reshape(3, 3)


def test_frame_A_beyond_the_range_is_the_sequence_static_A_at_that_angle(sweep, sv_model):
    vol, truth = sweep
    ctx = _frame_model(vol, sv_model.outputs["experiments"], _frame(truth, BEYOND), "fm-A-beyond")
    frame = _load(ctx.outputs["experiments"])[0]
    seq = _load(sv_model.outputs["experiments"])[0]
    # the sequence's scan (images 1-8) extrapolated to image 12 vs the frame's own one-image scan
    np.testing.assert_allclose(_setting_matrix(frame, BEYOND), _setting_matrix(seq, BEYOND), atol=1e-12)
    assert frame.goniometer.get_rotation_axis() == pytest.approx(seq.goniometer.get_rotation_axis())
    assert frame.detector[0].get_origin() == pytest.approx(seq.detector[0].get_origin())  # refined, not header
    assert frame.beam.get_s0() == pytest.approx(seq.beam.get_s0())


def test_frame_inside_the_range_predicts_as_the_scan_varying_sequence(sweep, sv_model):
    """Inside the refined range the one-frame static crystal reproduces DIALS' scan-varying prediction of the
    whole sequence for the reflections of that frame (same Miller indices, same positions)."""
    from dials.array_family import flex

    vol, truth = sweep
    ctx = _frame_model(vol, sv_model.outputs["experiments"], _frame(truth, INSIDE), "fm-A-inside")
    frame = _load(ctx.outputs["experiments"])
    seq = _load(sv_model.outputs["experiments"])[0]
    assert seq.crystal.num_scan_points > 0
    seq_pred = flex.reflection_table.from_predictions(seq)  # DIALS' scan-varying predictor
    z = np.array(seq_pred["xyzcal.px"]).reshape(-1, 3)[:, 2]
    k = INSIDE - seq.scan.get_image_range()[0]  # array index of the frame in the sequence
    ref = seq_pred.select(flex.bool(((z >= k) & (z < k + 1)).tolist()))
    mine = flex.reflection_table.from_predictions(frame[0])
    a = {tuple(h): np.array(x) for h, x in zip(ref["miller_index"], ref["xyzcal.px"])}
    b = {tuple(h): np.array(x) for h, x in zip(mine["miller_index"], mine["xyzcal.px"])}
    common = set(a) & set(b)
    assert len(common) >= 0.95 * max(len(a), len(b)) and len(common) > 100
    diff = np.array([a[h] - b[h] for h in common])
    assert np.abs(diff[:, :2]).max() < 0.05  # px
    assert np.abs(diff[:, 2]).max() < 0.01  # frames
    # and the frame's A is between the two scan points of its image (a scan point, not the static A)
    A = np.array(frame[0].crystal.get_A())
    A0, A1 = np.array(seq.crystal.get_A_at_scan_point(k)), np.array(seq.crystal.get_A_at_scan_point(k + 1))
    assert np.abs(A - A0).max() <= np.abs(A1 - A0).max() + 1e-12


def _edit_header(src: Path, dst: Path, pattern: bytes, repl: bytes) -> Path:
    data = src.read_bytes()
    head, n = re.subn(pattern, repl, data[:4096], count=1)
    assert n == 1 and len(head) == 4096  # same length: the binary section stays where it was
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(head + data[4096:])
    return dst


def test_frame_of_another_sweep_is_bad_input_naming_both_files(sweep, sv_model):
    from stills_processor.synthetic import write_rotation_sequence

    vol, truth = sweep
    model = sv_model.outputs["experiments"]
    # another detector (512 x 512 pixels)
    small = write_rotation_sequence(vol / "incoming" / "small", n_frames=1, size=512, seed=3).paths[0]
    with pytest.raises(BadInput, match="image size") as err:
        _frame_model(vol, model, small, "fm-bad-1")
    assert str(small) in str(err.value) and str(model) in str(err.value)
    # same detector and template, but the angle does not follow the sweep (another sweep, same names)
    moved = _edit_header(_frame(truth, BEYOND), vol / "incoming" / "again" / _frame(truth, BEYOND).name,
                         rb"Start_angle 5\.5000", b"Start_angle 9.5000")
    with pytest.raises(BadInput, match="starts at 9.5 deg") as err:
        _frame_model(vol, model, moved, "fm-bad-2")
    assert str(moved) in str(err.value) and str(model) in str(err.value)
    # a still is not a rotation frame
    still = _edit_header(_frame(truth, 2), vol / "incoming" / "still" / "still_0002.cbf",
                         rb"Angle_increment 0\.5000", b"Angle_increment 0.0000")
    with pytest.raises(BadInput, match="still"):
        _frame_model(vol, model, still, "fm-bad-3")


def test_cli_frame_model_writes_the_same_experiment(sweep, sv_model, tmp_path):
    from typer.testing import CliRunner

    from stills_processor.cli import app

    vol, truth = sweep
    out = tmp_path / "f12.expt"
    res = CliRunner().invoke(app, ["frame-model", str(sv_model.outputs["experiments"]), str(_frame(truth, BEYOND)),
                                   "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.stdout
    assert "image 12" in res.stdout and "outside" in res.stdout
    seq = _load(sv_model.outputs["experiments"])[0]
    np.testing.assert_allclose(_setting_matrix(_load(out)[0], BEYOND), _setting_matrix(seq, BEYOND), atol=1e-12)
    res = CliRunner().invoke(app, ["frame-model", str(sv_model.outputs["experiments"]), str(truth.paths[0].parent),
                                   "--out", str(tmp_path / "x.expt")])
    assert res.exit_code == 2 and not (tmp_path / "x.expt").exists()


# ------------------------------------------------------------------------------------ frame_info
def test_frame_info_groups_the_sweep_and_reads_its_angles(sweep, tmp_path):
    from stills_processor import frame_info
    from stills_processor.core.routing import SEQUENCE, STILL, UNREADABLE, _dxtbx_frame_info

    vol, truth = sweep
    infos = [frame_info(p) for p in truth.paths]
    assert {i.kind for i in infos} == {SEQUENCE} and len({i.sweep_key for i in infos}) == 1
    assert [i.frame_number for i in infos] == list(range(1, N_FRAMES + 1))
    for i, p in zip(infos, truth.paths):  # the header read without dxtbx agrees with dxtbx's scan
        ref = _dxtbx_frame_info(p)
        assert (i.frame_number, i.start_angle_deg, i.increment_deg) == \
            (ref.frame_number, pytest.approx(ref.start_angle_deg), pytest.approx(ref.increment_deg))
    assert all(infos[0].same_sweep(i) for i in infos)
    # the same file names in another directory: another sweep
    copy = tmp_path / "elsewhere" / truth.paths[3].name
    copy.parent.mkdir()
    shutil.copy(truth.paths[3], copy)
    assert frame_info(copy).sweep_key != infos[0].sweep_key and not infos[0].same_sweep(frame_info(copy))
    # same key but an angle that does not follow: not the same sweep
    odd = frame_info(_edit_header(truth.paths[3], tmp_path / "odd" / truth.paths[3].name,
                                  rb"Start_angle 1\.5000", b"Start_angle 7.5000"))
    moved = _with_key(odd, infos[0].sweep_key)
    assert not infos[0].same_sweep(moved)
    # a still and an unreadable file
    still = frame_info(_edit_header(truth.paths[1], tmp_path / "s" / "still_0002.cbf",
                                    rb"Angle_increment 0\.5000", b"Angle_increment 0.0000"))
    assert still.kind == STILL and still.sweep_key is None and still.frame_number == 2
    junk = tmp_path / "junk_0001.cbf"
    junk.write_bytes(b"not an image")
    bad = frame_info(junk)
    assert bad.kind == UNREADABLE and "junk_0001.cbf" in bad.error


def _with_key(info, key):
    from dataclasses import replace

    return replace(info, sweep_key=key)
