"""Fast tests of stills-processor's pure parts: validation geometry, routing, parameters, summary schema."""
from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

pytest.importorskip("dials")

from stills_processor.artifacts import SUMMARY_FIELDS, SUMMARY_SCHEMA, empty_record, read_summary, write_summary
from stills_processor.core.params import (
    PhilError,
    ProcessingSettings,
    Symmetry,
    check_space_group,
    parse_unit_cell,
    sequence_params,
    stills_params,
    validate_phil,
)
from stills_processor.core.routing import SEQUENCE, STILL, UNREADABLE, cbf_angle_increment, classify, plan
from stills_processor.core.validation import observed_q, predicted_q, validate_q_vectors

MINI_CBF_HEADER = """###CBF: VERSION 1.5, CBFlib v0.7.8 - PILATUS detectors
data_x
_array_data.header_convention "PILATUS_1.2"
_array_data.header_contents
;
# Detector: PILATUS3 6M, S/N 60-0119
# Wavelength 0.96859 A
# Start_angle {start:.4f} deg.
# Angle_increment {inc:.4f} deg.
;
"""


# ----------------------------------------------------------------------- geometry fixtures
def _still_experiment(rotate_deg: float = 0.0):
    """A still: 1000x1000 px detector at 200 mm, lambda 1 A, a P1 crystal (40, 50, 60 A)."""
    from dxtbx.model import BeamFactory, Crystal, DetectorFactory
    from dxtbx.model.experiment_list import Experiment
    from scitbx import matrix

    beam = BeamFactory.simple(1.0)
    det = DetectorFactory.simple("PAD", 200.0, (86.0, 86.0), "+x", "-y", (0.172, 0.172), (1000, 1000), (-1, 1e6))
    U = matrix.col((1, 2, 3)).normalize().axis_and_angle_as_r3_rotation_matrix(0.7)
    R = matrix.col((0, 0, 1)).axis_and_angle_as_r3_rotation_matrix(math.radians(rotate_deg))
    Ur = R * U
    a, b, c = (Ur * matrix.col(v) for v in ((40, 0, 0), (0, 50, 0), (0, 0, 60)))
    xtal = Crystal(a, b, c, space_group_symbol="P 1")
    return Experiment(beam=beam, detector=det, crystal=xtal)


def _observations(expt):
    """DIALS' own stills predictions for ``expt``, used as perfect 'observations'."""
    from dials.array_family import flex

    refl = flex.reflection_table.from_predictions(expt, dmin=2.5)
    refl["xyzobs.mm.value"] = refl["xyzcal.mm"]
    refl["xyzobs.px.value"] = refl["xyzcal.px"]
    return refl


def test_validation_passes_perfect_model():
    expt = _still_experiment()
    refl = _observations(expt)
    assert len(refl) > 30
    v = validate_q_vectors(expt, refl, q_tolerance=0.005, px_tolerance=2.0)
    assert v.passed and v.n == len(refl)
    # DIALS' stills predictor rotates q onto the Ewald sphere (DeltaPsi); the residual is that small shift
    assert v.q_median < 2e-3 and v.px_median < 0.5


def test_observed_q_lies_on_ewald_sphere_and_matches_prediction():
    expt = _still_experiment()
    refl = _observations(expt)
    xy = np.array(refl["xyzobs.mm.value"]).reshape(-1, 3)[:, :2]
    q_obs = observed_q(expt, np.array(refl["panel"], dtype=int), xy)
    s0 = np.array(expt.beam.get_s0())
    # |s0 + q| = 1/lambda for any observed spot (elastic scattering)
    np.testing.assert_allclose(np.linalg.norm(q_obs + s0, axis=1), 1.0, rtol=1e-9)
    # d-spacing of observed q equals the cell's d for those hkl (cctbx as the independent reference)
    hkl = np.array(refl["miller_index"]).reshape(-1, 3)
    d_ref = np.array(expt.crystal.get_unit_cell().d(refl["miller_index"]))
    q_pred = predicted_q(expt, hkl)
    np.testing.assert_allclose(1 / np.linalg.norm(q_pred, axis=1), d_ref, rtol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(q_obs, axis=1), np.linalg.norm(q_pred, axis=1), rtol=3e-3)


def test_validation_detects_wrong_orientation():
    """A model rotated by 1 deg about the beam moves spots by r * 1 deg on the detector."""
    truth = _still_experiment()
    refl = _observations(truth)
    wrong = _still_experiment(rotate_deg=1.0)
    v = validate_q_vectors(wrong, refl, q_tolerance=0.005, px_tolerance=2.0)
    obs = np.array(refl["xyzobs.px.value"]).reshape(-1, 3)[:, :2]
    centre = np.array(truth.detector[0].get_beam_centre_px(truth.beam.get_s0()))
    r = np.linalg.norm(obs - centre, axis=1)
    expected = np.median(r) * math.radians(1.0)  # arc length of a 1 deg rotation about the beam
    assert v.px_median == pytest.approx(expected, rel=0.15)
    assert not v.passed


def test_validation_of_rotation_sequence_uses_goniometer_angle():
    """For a scan, q_pred = R(phi) A h must match observed spots at their observed phi."""
    from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor
    from dials.array_family import flex  # noqa: F401  (registers the reflection_table converters)
    from dxtbx.model import GoniometerFactory, ScanFactory

    expt = _still_experiment()
    expt.goniometer = GoniometerFactory.known_axis((1.0, 0.0, 0.0))
    expt.scan = ScanFactory.make_scan((1, 20), [0.1] * 20, (0.0, 0.5), list(range(20)), deg=True)
    refl = ScanStaticReflectionPredictor(expt, dmin=2.5).for_ub(expt.crystal.get_A())
    assert np.ptp(np.array(refl["xyzcal.mm"]).reshape(-1, 3)[:, 2]) > 0.1  # spread over the 10 deg scan (rad)
    refl["xyzobs.mm.value"] = refl["xyzcal.mm"]
    refl["xyzobs.px.value"] = refl["xyzcal.px"]
    v = validate_q_vectors(expt, refl, q_tolerance=0.005, px_tolerance=2.0)
    assert v.n > 500 and v.passed
    assert v.q_median < 1e-6 and v.px_median < 0.05  # rotation data: predictions lie exactly on the sphere


# ------------------------------------------------------------------------------- routing
def test_cbf_header_routing(tmp_path):
    still = tmp_path / "still_0001.cbf"
    still.write_text(MINI_CBF_HEADER.format(start=90.0, inc=0.0))
    osc = tmp_path / "osc_0001.cbf"
    osc.write_text(MINI_CBF_HEADER.format(start=10.0, inc=0.1))
    assert cbf_angle_increment(still) == 0.0
    assert cbf_angle_increment(osc) == pytest.approx(0.1)
    assert classify(str(still))[0] == STILL
    assert classify(str(osc))[0] == SEQUENCE


def test_unreadable_inputs_become_error_units(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image\n")
    empty = tmp_path / "empty.cbf"
    empty.write_bytes(b"")
    units = plan([junk, empty, tmp_path / "missing.cbf"])
    assert [u.kind for u in units] == [UNREADABLE] * 3
    assert "notes.txt" in units[0].error
    assert "empty" in units[1].error and "missing.cbf" in units[2].error


def test_duplicate_stems_get_unique_names(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "img_0001.cbf").write_text(MINI_CBF_HEADER.format(start=0.0, inc=0.0))
    units = plan([tmp_path / "a" / "img_0001.cbf", tmp_path / "b" / "img_0001.cbf"])
    assert [u.name for u in units] == ["img_0001", "img_0001_1"]


# ---------------------------------------------------------------------------- parameters
def test_stills_parameters_defaults_and_passthrough():
    s = ProcessingSettings(symmetry=Symmetry("P 41 21 2", (57.8, 57.8, 150.0, 90, 90, 90)),
                           phil=("gain=1.5", "spotfinder.filter.d_min=2.0"))
    p = stills_params(s)
    assert p.indexing.stills.indexer == "sequences"
    assert str(p.indexing.known_symmetry.space_group) == "P 41 21 2"
    assert p.indexing.known_symmetry.unit_cell.parameters()[2] == pytest.approx(150.0)
    assert p.spotfinder.threshold.dispersion.gain == pytest.approx(1.5)  # abbreviated path resolved
    assert p.spotfinder.filter.d_min == pytest.approx(2.0)
    assert p.integration.integrator == "stills"


def test_sequence_parameters_apply_keys_where_they_exist():
    s = ProcessingSettings(phil=("spotfinder.filter.d_min=2.0", "refinement.parameterisation.scan_varying=False"))
    p = sequence_params(s)
    assert p.find_spots.spotfinder.filter.d_min == pytest.approx(2.0)
    assert p.refine.refinement.parameterisation.scan_varying is False
    assert p.integrate.integration.mp.nproc == 1


def test_bad_parameters_are_rejected():
    with pytest.raises(PhilError, match="no_such_dials_parameter"):
        validate_phil(ProcessingSettings(phil=("no_such_dials_parameter=3",)))
    with pytest.raises(PhilError, match="KEY=VALUE"):
        validate_phil(ProcessingSettings(phil=("gain",)))
    with pytest.raises(ValueError, match="6 numbers"):
        parse_unit_cell("57.8,57.8,150")
    with pytest.raises(ValueError, match="angles"):
        parse_unit_cell("57.8,57.8,150,90,90,190")
    with pytest.raises(ValueError, match="unknown space group"):
        check_space_group("P 7")
    assert check_space_group("P41212") == "P 41 21 2"


# ------------------------------------------------------------------------------- summary
def test_summary_roundtrip(tmp_path):
    a = empty_record()
    a.update(name="img1", kind="still", status="indexed", n_spots=300, n_indexed=250, unit_cell=[57.8, 57.8, 150.3, 90, 90, 90],
             A_matrix=np.eye(3).tolist(), validation_passed=True, q_median_error=7e-4, expt_path="img1.expt",
             refl_path="img1.refl", input_files='["/x/img1.cbf"]')
    b = empty_record()
    b.update(name="img2", kind="still", status="non_hit", n_spots=1, reason="too few strong spots")
    path = write_summary(tmp_path / "summary.h5", [a, b], parameters={"nproc": 2}, job_id="j1",
                         tolerances={"q_tolerance": 0.005})
    with h5py.File(path) as f:
        assert f.attrs["schema"] == SUMMARY_SCHEMA and f.attrs["job_id"] == "j1"
        g = f["summary"]
        assert set(SUMMARY_FIELDS) <= set(g)
        assert g["unit_cell"].shape == (2, 6) and g["A_matrix"].shape == (2, 3, 3)
        assert g["q_median_error"].attrs["units"] == "1/angstrom"
        assert g.attrs["n_indexed"] == 1 and g.attrs["n_non_hit"] == 1
    rows = read_summary(path)
    assert rows[0]["unit_cell"][2] == pytest.approx(150.3) and rows[0]["status"] == "indexed"
    assert rows[0]["expt_path"] == str(tmp_path / "img1.expt") and rows[0]["input_files"] == ["/x/img1.cbf"]
    assert rows[1]["status"] == "non_hit" and rows[1]["n_spots"] == 1 and rows[1]["expt_path"] == ""
    assert math.isnan(rows[1]["unit_cell"][0])
