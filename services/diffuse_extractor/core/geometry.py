"""Per-pixel geometry of a dxtbx detector, vectorised per panel.

Conventions follow DIALS: lab frame in mm, the beam vector ``s0`` points from the source
through the sample with ``|s0| = 1/lambda`` (1/Angstrom), the diffracted beam vector
``s1`` has the same length and points from the sample to the pixel, and the scattering
vector is ``q = s1 - s0`` (1/Angstrom, *no* factor 2 pi), so ``|q| = 1/d = 2 sin(theta)/lambda``
and fractional Miller indices are ``hkl = A^-1 q`` with DIALS' ``A = U B``.

Pixel centres are at (x + 0.5, y + 0.5) in pixel units (DIALS' convention). For panels
with dxtbx's ``ParallaxCorrectedPxMmStrategy`` the pixel -> mm mapping includes the
same parallax correction dxtbx applies (``panel.pixel_to_millimeter``), written here
in numpy because the per-call C++ route is far too slow for 6 Mpixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PanelGeometry:
    """Geometry of every pixel of one panel (arrays of shape (ny, nx))."""

    panel: int
    lab_x: np.ndarray  # mm, lab coordinates of the pixel centre on the sensor
    lab_y: np.ndarray
    lab_z: np.ndarray
    dist: np.ndarray  # mm, sample-to-pixel path length |r|
    cos_obliquity: np.ndarray  # |n . r_hat|, cosine of the incidence angle on the sensor
    normal: np.ndarray  # (3,) unit normal of the panel
    pixel_area: float  # mm^2

    @property
    def shape(self) -> tuple[int, int]:
        return self.lab_x.shape

    def unit_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit vectors from the sample to each pixel."""
        return self.lab_x / self.dist, self.lab_y / self.dist, self.lab_z / self.dist


def _parallax_mu_t0(panel) -> tuple[float, float] | None:
    """(mu in 1/mm, thickness in mm) of a parallax-corrected px->mm strategy, else None."""
    strategy = panel.get_px_mm_strategy()
    if "Parallax" not in type(strategy).__name__:
        return None
    mu, t0 = float(strategy.mu()), float(strategy.t0())
    return (mu, t0) if mu > 0 and t0 > 0 else None


def pixel_mm(panel, x_px: np.ndarray, y_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Millimetre coordinates on the panel of pixel positions (pixel units), as dxtbx does.

    With a parallax-corrected strategy dxtbx moves the point by the mean absorption depth
    ``o = 1/mu - (t/cos + 1/mu) exp(-mu t / cos)`` back along the ray's in-plane direction.
    """
    psx, psy = panel.get_pixel_size()
    xm = x_px * psx
    ym = y_px * psy
    mu_t0 = _parallax_mu_t0(panel)
    if mu_t0 is None:
        return xm, ym
    mu, t0 = mu_t0
    f = np.asarray(panel.get_fast_axis(), dtype=float)
    s = np.asarray(panel.get_slow_axis(), dtype=float)
    o = np.asarray(panel.get_origin(), dtype=float)
    n = np.cross(f, s)
    if float(np.dot(o, n)) < 0:
        n = -n
    rx = o[0] + xm * f[0] + ym * s[0]
    ry = o[1] + xm * f[1] + ym * s[1]
    rz = o[2] + xm * f[2] + ym * s[2]
    inv = 1.0 / np.sqrt(rx * rx + ry * ry + rz * rz)
    rx *= inv
    ry *= inv
    rz *= inv
    cos_t = rx * n[0] + ry * n[1] + rz * n[2]
    att = (1.0 / mu) - (t0 / cos_t + 1.0 / mu) * np.exp(-mu * t0 / cos_t)
    xm = xm - (rx * f[0] + ry * f[1] + rz * f[2]) * att
    ym = ym - (rx * s[0] + ry * s[1] + rz * s[2]) * att
    return xm, ym


def panel_geometry(panel, index: int = 0) -> PanelGeometry:
    """Lab-frame geometry of every pixel centre of ``panel`` (dxtbx Panel)."""
    nx, ny = panel.get_image_size()
    x = np.arange(nx, dtype=np.float64) + 0.5
    y = np.arange(ny, dtype=np.float64) + 0.5
    xx, yy = np.meshgrid(x, y)  # (ny, nx)
    return _geometry_from_px(panel, index, xx, yy)


class PanelFrame:
    """A panel's frame, for computing pixel geometry on any sub-grid (blocks of rows, binned centres).

    ``flat_orthonormal``: fast and slow axes are orthonormal, so the plane has unit normal
    ``n = f x s`` at distance ``d0`` from the sample and ``c0 = (o . n) n`` is the foot of the
    perpendicular (what the fast path of ``static_pixels`` needs).
    """

    def __init__(self, panel, index: int = 0):
        self.panel = panel
        self.index = index
        self.f = np.asarray(panel.get_fast_axis(), dtype=float)
        self.s = np.asarray(panel.get_slow_axis(), dtype=float)
        self.o = np.asarray(panel.get_origin(), dtype=float)
        n = np.cross(self.f, self.s)
        self.flat_orthonormal = bool(abs(np.dot(self.f, self.s)) < 1e-12 and abs(np.linalg.norm(self.f) - 1) < 1e-12
                                     and abs(np.linalg.norm(self.s) - 1) < 1e-12)
        if float(np.dot(self.o, n)) < 0:
            n = -n
        self.n = n / np.linalg.norm(n)
        self.d0 = abs(float(np.dot(self.o, self.n)))
        self.c0 = self.o - np.dot(self.o, self.f) * self.f - np.dot(self.o, self.s) * self.s
        self.parallax = _parallax_mu_t0(panel)
        self.pixel_area = float(np.prod(panel.get_pixel_size()))
        self.nx, self.ny = panel.get_image_size()

    def at(self, iy: np.ndarray, ix: np.ndarray) -> PanelGeometry:
        """Geometry of the pixel centres ``(ix + 0.5, iy + 0.5)`` on the grid ``iy x ix`` (1-D index arrays).

        Flat orthonormal panels use the separable form (in-plane offsets ``a``, ``b`` from the foot
        of the perpendicular, parallax as a radial scale ``g``, see ``extract.static_pixels``);
        the same numbers as :func:`panel_geometry` to float64 rounding.
        """
        xx = (np.asarray(ix, dtype=np.float64) + 0.5)[None, :]
        yy = (np.asarray(iy, dtype=np.float64) + 0.5)[:, None]
        if not self.flat_orthonormal:
            xx, yy = (np.ascontiguousarray(v) for v in np.broadcast_arrays(xx, yy))
            return _geometry_from_px(self.panel, self.index, xx, yy)
        psx, psy = self.panel.get_pixel_size()
        a = xx * psx + float(np.dot(self.o, self.f))
        b = yy * psy + float(np.dot(self.o, self.s))
        d0 = self.d0
        ab2 = a * a + b * b  # (ny, nx)
        if self.parallax is not None:
            mu, t0 = self.parallax
            r = np.sqrt(ab2 + d0 * d0)
            t = r * (mu * t0 / d0)
            g = 1.0 - (1.0 - (t + 1.0) * np.exp(-t)) / (mu * r)
        else:
            g = np.ones_like(ab2)
        ga, gb = g * a, g * b
        lab = [self.c0[j] + ga * self.f[j] + gb * self.s[j] for j in range(3)]
        dist = np.sqrt(g * g * ab2 + d0 * d0)
        return PanelGeometry(self.index, lab[0], lab[1], lab[2], dist, d0 / dist, self.n, self.pixel_area)

    def block(self, y0: int, y1: int) -> PanelGeometry:
        """Geometry of rows ``y0:y1`` (all columns)."""
        return self.at(np.arange(y0, y1), np.arange(self.nx))


def _geometry_from_px(panel, index, xx, yy) -> PanelGeometry:
    xm, ym = pixel_mm(panel, xx, yy)
    f = np.asarray(panel.get_fast_axis(), dtype=float)
    s = np.asarray(panel.get_slow_axis(), dtype=float)
    o = np.asarray(panel.get_origin(), dtype=float)
    lab_x = o[0] + xm * f[0] + ym * s[0]
    lab_y = o[1] + xm * f[1] + ym * s[1]
    lab_z = o[2] + xm * f[2] + ym * s[2]
    del xm, ym
    dist = np.sqrt(lab_x * lab_x + lab_y * lab_y + lab_z * lab_z)
    n = np.cross(f, s)
    n /= np.linalg.norm(n)
    cos_obl = np.abs(lab_x * n[0] + lab_y * n[1] + lab_z * n[2]) / dist
    psx, psy = panel.get_pixel_size()
    return PanelGeometry(index, lab_x, lab_y, lab_z, dist, cos_obl, n, float(psx * psy))


def s1_vectors(geom: PanelGeometry, wavelength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diffracted beam vectors (1/Angstrom) towards each pixel."""
    k = 1.0 / (wavelength * geom.dist)
    return geom.lab_x * k, geom.lab_y * k, geom.lab_z * k


def q_vectors(s1x, s1y, s1z, s0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scattering vectors q = s1 - s0 (1/Angstrom)."""
    return s1x - s0[0], s1y - s0[1], s1z - s0[2]


def fractional_hkl(qx, qy, qz, A) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional Miller indices ``A^-1 q`` for DIALS' setting matrix ``A = U B`` (3x3, row-major)."""
    Ainv = np.linalg.inv(np.asarray(A, dtype=float).reshape(3, 3))
    h = Ainv[0, 0] * qx + Ainv[0, 1] * qy + Ainv[0, 2] * qz
    k = Ainv[1, 0] * qx + Ainv[1, 1] * qy + Ainv[1, 2] * qz
    l = Ainv[2, 0] * qx + Ainv[2, 1] * qy + Ainv[2, 2] * qz
    return h, k, l


def beam_centre_px(panel, s0) -> tuple[float, float] | None:
    """Where the direct beam meets the panel plane (pixel units), or None if it misses."""
    try:
        return tuple(panel.get_beam_centre_px(tuple(s0)))
    except Exception:  # the beam is parallel to / misses this panel
        return None
