"""The extractor's per-pixel corrections against an independent referee: frames rendered by the diff-sim-refiner
generator (nanoBragg's physics: Kahn polarisation, pixel solid angle, NIST air absorption) with NO noise, NO Bragg
term and NO background, read back through dxtbx (the CBF header's beam, detector and scan), extracted with the true
crystal. The corrected intensity must equal the planted reciprocal-space truth at every pixel, hence be flat in
resolution and azimuth: a factor the generator renders and the extractor removes differently (polarisation plane or
fraction, obliquity, air path, sensor absorption the header does not declare, a Lorentz factor on rotation frames)
shows as a resolution- or azimuth-dependent ratio. Shares no code with ``diffuse_extractor.core.corrections``."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dxtbx  # noqa: F401  DIALS/dxtbx are part of the platform
from dxtbx.model import Crystal
from dxtbx.model.experiment_list import ExperimentListFactory

from diff_sim_refiner.datasets.cbf import CBFHeader, write_minicbf
from diff_sim_refiner.datasets.stills import DiffuseTruth, start_truth
from diff_sim_refiner.datasets.sweep import SweepRenderer, SweepSpec, crystal_orientation, oscillation_orientations
from diffuse_extractor.core.extract import ExtractionParams, extract_still

# a 2 x 3 module PILATUS-style detector at 100 mm: |q| from 0.02 to ~0.8 1/A at 1 A, off-centre beam, full azimuth
SPEC = SweepSpec(modules=(2, 3), distance_mm=100.0, n_frames=1, n_blank_frames=0, phi_steps=4, seed=5)
S_BINS = [(0.0, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.7)]
#: no Bragg term and no noise: no masks needed but the gaps (beamstop off; the Bragg mask radius is irrelevant)
PARAMS = ExtractionParams(beamstop="none", outlier_nsigma=None, use_observed_spots=False, bragg_radius_px=1)


def _scene(tmp_path: Path, spec: SweepSpec):
    sr = SweepRenderer(spec)
    truth = start_truth(tmp_path, "test", spec, sr.r.spec, sr.r, units="", conventions="")
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    return sr, DiffuseTruth.load(tmp_path), crystal_orientation(spec) @ sr.B


def _experiment(tmp_path: Path, spec: SweepSpec, sr: SweepRenderer, A0: np.ndarray, osc_deg: float):
    """The dxtbx experiment of a frame with the generator's header (models from dxtbx, not from the generator)."""
    nf, ns = spec.image_size
    path = tmp_path / "frame_0001.cbf"
    write_minicbf(path, np.zeros((ns, nf), np.int32), CBFHeader(
        pixel_mm=spec.pixel_mm, distance_mm=spec.distance_mm, wavelength_A=spec.wavelength_A,
        beam_xy_px=sr.r.spec.beam_xy_px, exposure_s=spec.exposure_s, start_angle_deg=0.0,
        angle_increment_deg=osc_deg, polarization=spec.polarization_fraction))
    e = ExperimentListFactory.from_filenames([str(path)])[0]
    real = np.linalg.inv(A0)                                    # rows a, b, c (Angstrom)
    e.crystal = Crystal(real[0], real[1], real[2], space_group_symbol="P1")
    return e


def _truth_at(table, T: DiffuseTruth, orientations) -> np.ndarray:
    """Planted truth at each tabulated pixel's lab q, averaged over the orientations the frame swept."""
    q = np.stack([table["qx"], table["qy"], table["qz"]], 1).astype(np.float64)
    out = 0.0
    for A in orientations:
        h = q @ np.linalg.inv(A).T
        out = out + T(h[:, 0], h[:, 1], h[:, 2])
    return out / len(orientations)


def _check_flat(table, t: np.ndarray, label: str):
    I = table["intensity"].astype(np.float64)
    q = table["q"].astype(np.float64)
    azimuth = np.degrees(np.arctan2(table["qy"].astype(np.float64), table["qx"].astype(np.float64)))
    # away from nanoBragg's cell faces (its nearest-lattice-point rule is discontinuous there) and from the
    # weakest tails (float32 rounding of the render)
    h = np.stack([table["h"], table["k"], table["l"]], 1).astype(np.float64)
    ok = (np.abs(h - np.round(h)).max(1) < 0.45) & (t > 0.02 * t.max())
    assert ok.sum() > 50_000, label
    ratio = I[ok] / t[ok]
    assert np.percentile(np.abs(ratio - 1.0), 99.9) < 1e-3, f"{label}: per-pixel corrected/truth {np.percentile(ratio, [0.1, 50, 99.9])}"
    checked = 0
    for lo, hi in S_BINS:
        for a0 in range(-180, 180, 90):
            sel = ok & (q >= lo) & (q < hi) & (azimuth >= a0) & (azimuth < a0 + 90)
            if sel.sum() < 500:
                continue
            r = I[sel].sum() / t[sel].sum()
            assert abs(r - 1.0) < 0.005, f"{label}: |s| {lo}-{hi} 1/A, azimuth {a0}..{a0 + 90} deg: corrected/truth {r:.4f}"
            checked += 1
    assert checked >= 12, f"{label}: only {checked} (|s|, azimuth) cells populated"


def test_still_corrected_over_truth_is_flat(tmp_path):
    """A still (Angle_increment 0): corrected / truth = 1 per pixel and per (|s| bin, azimuth quadrant)."""
    sr, T, A0 = _scene(tmp_path, SPEC)
    e = _experiment(tmp_path, SPEC, sr, A0, 0.0)
    assert e.detector[0].get_thickness() == 0.0                 # the header declares no sensor: no QE, no parallax
    assert e.beam.get_polarization_fraction() == pytest.approx(SPEC.polarization_fraction)
    res = extract_still(e, [sr.r.diffuse(A0).astype(np.float32)], params=PARAMS)
    assert not res.info["lorentz_applied"]
    # the multipliers vary enough over the detector for a wrong one to show
    assert float(res.table["polarisation"].max() / res.table["polarisation"].min()) > 1.05
    assert float(res.table["solid_angle"].max()) > 1.3 and float(res.table["air"].max()) > 1.01
    _check_flat(res.table, _truth_at(res.table, T, [A0]), "still")


def test_generator_refuses_a_polarisation_dxtbx_cannot_read(tmp_path):
    """dxtbx's mini-CBF reader ignores the header's ``# Polarization`` (every PILATUS frame gets 0.999): a frame
    rendered with another fraction would be corrected with 0.999 by DIALS and the extractor alike (1-5 % errors
    varying with azimuth and resolution at 0.8), so the generator refuses to render one."""
    write_minicbf(tmp_path / "pol_0001.cbf", np.zeros((195, 487), np.int32), CBFHeader(
        pixel_mm=0.172, distance_mm=100.0, wavelength_A=1.0, beam_xy_px=(200.0, 200.0), polarization=0.8))
    e = ExperimentListFactory.from_filenames([str(tmp_path / "pol_0001.cbf")])[0]
    assert e.beam.get_polarization_fraction() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="polarization_fraction"):
        replace(SPEC, polarization_fraction=0.8)


def test_rotation_frame_corrected_over_truth_is_flat(tmp_path):
    """A 0.5 deg rotation frame (goniometer along the fast axis, as the sweep generator writes it): no Lorentz factor
    by default, hkl at the frame's mid-angle, the truth averaged over the generator's sub-steps of the oscillation."""
    sr, T, A0 = _scene(tmp_path, SPEC)
    e = _experiment(tmp_path, SPEC, sr, A0, 0.5)
    assert e.goniometer is not None and e.scan.get_oscillation()[1] == pytest.approx(0.5)
    res = extract_still(e, [sr.diffuse(A0, 0.0, 0.5).astype(np.float32)], params=PARAMS)
    assert not res.info["lorentz_applied"]
    _check_flat(res.table, _truth_at(res.table, T, oscillation_orientations(A0, 0.0, 0.5, SPEC.phi_steps)),
                "rotation frame")
    # the Lorentz factor, when asked for, is exactly what makes the ratio drift (a diffuse map needs none)
    lor = extract_still(e, [sr.diffuse(A0, 0.0, 0.5).astype(np.float32)],
                        params=PARAMS.model_copy(update={"lorentz": True}))
    assert float(np.ptp(lor.table["lorentz"])) > 0.1
