"""DIALS experiment (dxtbx detector, beam, crystal) -> the simulator's configs.

Everything is expressed in DIALS' laboratory frame, with the simulator's CUSTOM convention:
fast/slow axes and the panel origin (the outer corner of pixel (0, 0)) are the dxtbx panel's,
the detector normal is fast x slow (pointing away from the sample), the beam vector is the unit
``s0`` (propagation direction), and the crystal's reciprocal vectors a*, b*, c* are the columns of
DIALS' ``A = U B`` (1/Angstrom).  The simulator then predicts h = (s1 - s0) . (a, b, c) exactly as
DIALS does, so a pixel's scattering vector and its Miller index agree with dxtbx's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.config import BeamConfig, CrystalConfig, DetectorConfig, DetectorConvention


def detector_config_from_panel(panel, s0_unit, oversample: int = 1, explicit_pix0: bool = False) -> DetectorConfig:
    """CUSTOM-geometry config of one dxtbx panel.

    By default the origin is expressed as nanoBragg's beam-pivot geometry (beam centre on the fast/slow
    axes in mm and the sample-to-detector distance along the beam), which reproduces the panel origin
    exactly and keeps ``distance`` and ``beam_center`` refinable; ``explicit_pix0`` gives the origin
    as ``pix0`` (metres) instead.  dxtbx's parallax correction (sensor thickness) is not modelled.
    """
    fast = np.array(panel.get_fast_axis(), float)
    slow = np.array(panel.get_slow_axis(), float)
    normal = np.cross(fast, slow)
    normal /= np.linalg.norm(normal)
    origin = np.array(panel.get_origin(), float)   # mm, lab frame
    px_f, px_s = panel.get_pixel_size()
    if abs(px_f - px_s) > 1e-9:
        raise ValueError(f"non-square pixels ({px_f} x {px_s} mm) are not supported")
    nf, ns = panel.get_image_size()
    beam = np.asarray(s0_unit, float)
    beam = beam / np.linalg.norm(beam)
    common = dict(pixel_size_mm=float(px_f), fpixels=int(nf), spixels=int(ns),
                  detector_convention=DetectorConvention.CUSTOM, custom_fdet_vector=tuple(fast),
                  custom_sdet_vector=tuple(slow), custom_odet_vector=tuple(normal), custom_beam_vector=tuple(beam),
                  oversample=oversample)
    ratio = float(np.dot(beam, normal))
    if explicit_pix0 or ratio <= 1e-6:
        return DetectorConfig(distance_mm=float(abs(np.dot(origin, normal))), pix0_override_m=tuple(origin * 1e-3),
                              **common)
    t = float(np.dot(origin, normal)) / ratio       # mm along the beam to the detector plane
    hit = t * beam - origin
    return DetectorConfig(distance_mm=t, beam_center_f=float(np.dot(hit, fast)), beam_center_s=float(np.dot(hit, slow)),
                          **common)


def beam_config_from_dxtbx(beam, fluence: float = 1e24) -> BeamConfig:
    """Wavelength and polarisation of a dxtbx beam (Kahn factor 2 p - 1 about E = normal x s0)."""
    s0 = np.array(beam.get_unit_s0(), float)
    normal = np.array(beam.get_polarization_normal(), float)
    e_axis = np.cross(normal, s0)
    n = np.linalg.norm(e_axis)
    p = float(beam.get_polarization_fraction())
    return BeamConfig(wavelength_A=float(beam.get_wavelength()), fluence=fluence,
                      polarization_factor=2.0 * p - 1.0,
                      polarization_axis=tuple(e_axis / n) if n > 0 else None), tuple(s0)


def crystal_config_from_dxtbx(crystal, N_cells: Sequence[float] = (10, 10, 10), mosaic_spread_deg: float = 0.0,
                              mosaic_domains: int = 1, mosaic_seed: int = 42, default_F: float = 1.0) -> CrystalConfig:
    """Orientation and cell of a dxtbx crystal as MOSFLM reciprocal vectors (columns of A = U B, 1/Angstrom)."""
    A = np.array(crystal.get_A(), float).reshape(3, 3)
    return CrystalConfig(mosflm_a_star=tuple(A[:, 0]), mosflm_b_star=tuple(A[:, 1]), mosflm_c_star=tuple(A[:, 2]),
                         N_cells=tuple(N_cells), mosaic_spread_deg=mosaic_spread_deg, mosaic_domains=mosaic_domains,
                         mosaic_seed=mosaic_seed, default_F=default_F)


def configs_from_experiment(experiment, panel: int = 0, N_cells=(10, 10, 10), mosaic_spread_deg: float = 0.05,
                            mosaic_domains: int = 10, fluence: float = 1e24, oversample: int = 1,
                            default_F: float = 1.0, explicit_pix0: bool = False):
    """(crystal, detector, beam) simulator configs of a DIALS still experiment (one panel)."""
    det = experiment.detector
    if panel >= len(det):
        raise ValueError(f"the detector has {len(det)} panel(s), panel {panel} requested")
    bcfg, s0 = beam_config_from_dxtbx(experiment.beam, fluence=fluence)
    dcfg = detector_config_from_panel(det[panel], s0, oversample=oversample, explicit_pix0=explicit_pix0)
    dcfg = dcfg.replace(custom_polar_vector=bcfg.polarization_axis)
    ccfg = crystal_config_from_dxtbx(experiment.crystal, N_cells=N_cells, mosaic_spread_deg=mosaic_spread_deg,
                                     mosaic_domains=mosaic_domains, default_F=default_F)
    return ccfg, dcfg, bcfg


__all__ = ["detector_config_from_panel", "beam_config_from_dxtbx", "crystal_config_from_dxtbx",
           "configs_from_experiment"]
