"""Detector calibration: beam centre, BF disk radius, k-space pixel sizes, electron optics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# CODATA 2018
_MC2_EV = 510998.95  # electron rest energy / e (V)
_HC_EV_ANGSTROM = 12398.419843320026  # h c / e (eV Å)


@dataclass
class CenterEstimate:
    cy: float  # detector px (row)
    cx: float  # detector px (column)
    radius: float  # BF disk radius (detector px), from the disk area
    method: str


def detect_center(mean_pattern: np.ndarray, smooth: float = 2.0, frac: float = 0.5) -> CenterEstimate:
    """Beam centre from the (Gaussian-smoothed) mean pattern.

    The bright-field disk is the connected region above ``frac`` x max that contains the maximum; the centre is
    the intensity-weighted centroid inside it, the radius sqrt(area / pi).
    """
    img = np.asarray(mean_pattern, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"mean pattern must be 2-D, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        raise ValueError("mean pattern contains NaN or inf")
    sm = ndimage.gaussian_filter(img, smooth) if smooth > 0 else img
    lo = np.percentile(sm, 5)
    top = sm.max()
    if top <= lo:
        cy, cx = (np.array(img.shape) - 1) / 2.0
        return CenterEstimate(float(cy), float(cx), 0.0, "flat pattern: geometric centre")
    mask = sm >= lo + frac * (top - lo)
    lab, _ = ndimage.label(mask)
    peak = np.unravel_index(np.argmax(sm), sm.shape)
    disk = lab == lab[peak]
    w = (sm - lo) * disk
    cy, cx = ndimage.center_of_mass(w)
    return CenterEstimate(float(cy), float(cx), float(math.sqrt(disk.sum() / math.pi)), "smoothed-mean BF disk centroid")


def radial_grid(frame_shape, cy: float, cx: float) -> np.ndarray:
    """Distance (detector px) of every pixel from the centre."""
    yy, xx = np.indices(frame_shape, dtype=np.float64)
    return np.hypot(yy - cy, xx - cx)


def radial_mask(frame_shape, cy: float, cx: float, roi) -> np.ndarray:
    """1 inside inner <= r <= outer, 0 elsewhere (all ones when roi is None)."""
    if roi is None:
        return np.ones(frame_shape, dtype=np.float64)
    r = radial_grid(frame_shape, cy, cx)
    return ((r >= roi[0]) & (r <= roi[1])).astype(np.float64)


def kspace_from_clicks(points, cy: float, cx: float, known_spacing: float | None = None) -> dict:
    """k-space pixel sizes from clicked pairs of opposite Bragg peaks (or ring boundaries).

    ``points`` is a flat list of (y, x) clicks taken in pairs (p1, p2) 180 degrees apart. For each pair the
    distance between the two peaks is 2 g, where g = 1/d with d = ``known_spacing`` in Å (absolute, units 1/Å),
    or g = 1 (relative: the selected radius becomes 1.0). One pair gives an isotropic calibration; two or more
    pairs along different directions solve (sx dx)^2 + (sy dy)^2 = (2 g)^2 for the anisotropic sizes sx, sy.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < 2 or len(pts) % 2:
        raise ValueError(f"k-space calibration needs pairs of clicks (2, 4, ...), got {len(pts)}")
    g = 1.0 / known_spacing if known_spacing else 1.0
    d = pts[1::2] - pts[0::2]
    dist = np.hypot(d[:, 0], d[:, 1])
    if np.any(dist < 1.0):
        raise ValueError("the two clicks of a pair are less than 1 px apart")
    mid = (pts[1::2] + pts[0::2]) / 2.0
    out = {
        "pairs": pts.reshape(-1, 2, 2).tolist(),
        "radius_px": (dist / 2).tolist(),
        "pair_midpoint_offset_px": np.hypot(mid[:, 0] - cy, mid[:, 1] - cx).tolist(),
        "k_units": "1/Å" if known_spacing else "relative",
        "known_spacing_angstrom": known_spacing,
    }
    iso = float(2 * g / dist.mean())
    out["pixel_size_k"] = iso
    ky = kx = iso
    if len(d) >= 2:
        a = np.stack([d[:, 1] ** 2, d[:, 0] ** 2], axis=1)
        rhs = np.full(len(d), (2 * g) ** 2)
        sol, *_ = np.linalg.lstsq(a, rhs, rcond=None)
        cond = np.linalg.cond(a)
        if np.all(sol > 0) and np.isfinite(cond) and cond < 1e3:
            kx, ky = float(np.sqrt(sol[0])), float(np.sqrt(sol[1]))
        else:
            out["anisotropy_note"] = "pairs too close in direction for an anisotropic solution; isotropic used"
    out["pixel_size_ky"] = float(ky)
    out["pixel_size_kx"] = float(kx)
    return out


def electron_wavelength_angstrom(kv: float) -> float:
    """Relativistic electron wavelength (Å) at accelerating voltage ``kv`` (kV)."""
    u = kv * 1e3
    return _HC_EV_ANGSTROM / math.sqrt(u * (u + 2 * _MC2_EV))


def pv_over_e_volts(kv: float) -> float:
    """p v / e (V) of an electron accelerated through ``kv`` kV (relativistic)."""
    u = kv * 1e3
    return (u * u + 2 * u * _MC2_EV) / (u + _MC2_EV)


def deflection_to_field(theta_rad: np.ndarray, kv: float, thickness_nm: float) -> np.ndarray:
    """Projected in-plane field (V/m) from a beam deflection angle (rad): E = -theta p v / (e t).

    The minus sign is the electron's negative charge: the beam is deflected against the field.
    """
    return -np.asarray(theta_rad) * pv_over_e_volts(kv) / (thickness_nm * 1e-9)
