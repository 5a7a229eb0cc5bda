"""Geometric validation of an indexed model: q-vector consistency of predicted vs observed spots.

For every indexed reflection two independent routes to its scattering vector are compared:

* predicted: ``q_pred = R(phi) . A . h`` from the refined crystal model (``A = U B``, 1/Angstrom;
  ``R`` is the goniometer rotation at the observed angle for sequences, identity for stills);
* observed: the spot centroid (mm on its panel) mapped to the laboratory frame by the detector
  model, ``s1 = unit(lab) / lambda`` and ``q_obs = s1 - s0``.

``|q_obs - q_pred|`` (1/Angstrom) checks the model in reciprocal space. On the detector, the ray
``s0 + q_pred`` is intersected with the spot's panel (plane equation via the panel's D matrix,
parallax handled by dxtbx's mm->px conversion) and compared with the observed centroid in mm and px.
A still passes if the median reciprocal-space error and the median detector offset are below the
thresholds. Only numpy and the dxtbx models are used (no DIALS prediction code), so the check is
independent of the refinement that produced the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# dxtbx and DIALS are imported inside the functions that use them: they take ~3 s (dxtbx) to ~4 s (DIALS'
# programs) to import, which `stills-processor --help`, `show` and parameter checks should not pay; the
# worker's pool imports them once per process before any image (batch.warm_up, run by _preload.py).


@dataclass
class QValidation:
    n: int
    q_median: float  # 1/Angstrom
    q_mean: float
    q_max: float
    q_rel_median: float  # |dq| / |q_obs|
    mm_median: float  # detector offset, mm
    px_median: float  # detector offset, pixels
    px_p90: float
    q_tolerance: float
    px_tolerance: float
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _vec2(xy: np.ndarray):
    # DIALS (~3 s with dxtbx) only when reflections are validated: the CLI imports this module
    from dials.array_family import flex

    xy = np.asarray(xy, dtype=float)
    return flex.vec2_double(flex.double(np.ascontiguousarray(xy[:, 0])), flex.double(np.ascontiguousarray(xy[:, 1])))


def _rotation_matrices(axis: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Rodrigues rotation matrices (n, 3, 3) about unit ``axis`` by ``angles`` (radians)."""
    k = axis / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    s, c = np.sin(angles)[:, None, None], np.cos(angles)[:, None, None]
    return np.eye(3)[None] + s * K[None] + (1 - c) * (K @ K)[None]


def predicted_q(experiment, hkl: np.ndarray, phi: np.ndarray | None = None) -> np.ndarray:
    """Laboratory-frame q (1/Angstrom) of Miller indices ``hkl`` (n, 3) for this experiment."""
    A = np.array(experiment.crystal.get_A(), dtype=float).reshape(3, 3)
    q = hkl.astype(float) @ A.T  # crystal (goniometer datum) frame
    gonio = experiment.goniometer
    if gonio is not None and experiment.scan is not None and phi is not None:
        F = np.array(gonio.get_fixed_rotation()).reshape(3, 3)
        S = np.array(gonio.get_setting_rotation()).reshape(3, 3)
        axis = np.array(gonio.get_rotation_axis_datum(), dtype=float)
        R = _rotation_matrices(axis, phi)
        q = np.einsum("ij,njk,nk->ni", S, R, q @ F.T)
    return q


def observed_q(experiment, panel_ids: np.ndarray, xy_mm: np.ndarray) -> np.ndarray:
    """Laboratory-frame q (1/Angstrom) of spot centroids given in mm on their panels."""
    beam = experiment.beam
    s0 = np.array(beam.get_s0(), dtype=float)
    wavelength = beam.get_wavelength()
    lab = np.empty((len(panel_ids), 3))
    for pid in np.unique(panel_ids):
        sel = panel_ids == pid
        coords = _vec2(xy_mm[sel])
        lab[sel] = np.array(experiment.detector[int(pid)].get_lab_coord(coords)).reshape(-1, 3)
    s1 = lab / np.linalg.norm(lab, axis=1, keepdims=True) / wavelength
    return s1 - s0


def project_to_detector(experiment, panel_ids: np.ndarray, q: np.ndarray):
    """Intersect rays ``s0 + q`` with the given panels: (mm (n, 2), px (n, 2)); NaN if behind it."""
    s1 = q + np.array(experiment.beam.get_s0(), dtype=float)
    mm = np.full((len(q), 2), np.nan)
    px = np.full((len(q), 2), np.nan)
    for pid in np.unique(panel_ids):
        sel = panel_ids == pid
        panel = experiment.detector[int(pid)]
        D = np.array(panel.get_D_matrix(), dtype=float).reshape(3, 3)
        v = s1[sel] @ D.T
        ok = v[:, 2] > 0
        xy = np.full((sel.sum(), 2), np.nan)
        xy[ok] = v[ok, :2] / v[ok, 2:3]
        mm[sel] = xy
        pix = np.full_like(xy, np.nan)
        if ok.any():
            conv = panel.millimeter_to_pixel(_vec2(xy[ok]))
            pix[ok] = np.array(conv).reshape(-1, 2)
        px[sel] = pix
    return mm, px


def validate_q_vectors(experiment, reflections, q_tolerance: float, px_tolerance: float) -> QValidation:
    """Compare predicted and observed q-vectors / detector positions of indexed reflections.

    ``q_tolerance`` (1/Angstrom) and ``px_tolerance`` (pixels) bound the medians (their defaults are the job
    model's, :class:`stills_processor.core.params.StillsJob`).

    ``reflections``: a DIALS reflection table of one experiment with ``miller_index``, ``panel``,
    ``xyzobs.mm.value`` and ``xyzobs.px.value``; unindexed rows (hkl 0,0,0) are ignored.
    """
    hkl = np.array(reflections["miller_index"], dtype=int).reshape(-1, 3)
    keep = np.any(hkl != 0, axis=1)
    n = int(keep.sum())
    if n == 0:
        nan = float("nan")
        return QValidation(0, nan, nan, nan, nan, nan, nan, nan, q_tolerance, px_tolerance, False)
    hkl = hkl[keep]
    panels = np.array(reflections["panel"], dtype=int)[keep]
    obs_mm = np.array(reflections["xyzobs.mm.value"], dtype=float).reshape(-1, 3)[keep]
    obs_px = np.array(reflections["xyzobs.px.value"], dtype=float).reshape(-1, 3)[keep]
    q_pred = predicted_q(experiment, hkl, phi=obs_mm[:, 2])
    q_obs = observed_q(experiment, panels, obs_mm[:, :2])
    dq = np.linalg.norm(q_obs - q_pred, axis=1)
    rel = dq / np.linalg.norm(q_obs, axis=1)
    pred_mm, pred_px = project_to_detector(experiment, panels, q_pred)
    d_mm = np.linalg.norm(pred_mm - obs_mm[:, :2], axis=1)
    d_px = np.linalg.norm(pred_px - obs_px[:, :2], axis=1)
    q_med = float(np.median(dq))
    px_med = float(np.nanmedian(d_px)) if np.isfinite(d_px).any() else float("nan")
    passed = bool(q_med <= q_tolerance and np.isfinite(px_med) and px_med <= px_tolerance)
    return QValidation(
        n=n,
        q_median=q_med,
        q_mean=float(dq.mean()),
        q_max=float(dq.max()),
        q_rel_median=float(np.median(rel)),
        mm_median=float(np.nanmedian(d_mm)) if np.isfinite(d_mm).any() else float("nan"),
        px_median=px_med,
        px_p90=float(np.nanpercentile(d_px, 90)) if np.isfinite(d_px).any() else float("nan"),
        q_tolerance=q_tolerance,
        px_tolerance=px_tolerance,
        passed=passed,
    )
