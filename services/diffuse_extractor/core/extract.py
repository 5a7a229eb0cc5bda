"""Per-still diffuse extraction: masks -> per-pixel q, hkl, corrected I and sigma.

``extract_still`` is the science entry point: pure function of a DIALS experiment, the
still's raw panel images and (optionally) its reflections; no files involved.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import background as bg
from . import corrections as corr
from . import geometry as geo
from . import kernels
from . import masks as mk
from .errors import InputError
from .params import ExtractionParams  # noqa: F401  (re-exported: the library's parameter model)
from .workspace import WORKSPACE

#: columns of the per-pixel table, with dtype and unit (the HDF5 schema follows this list)
COLUMNS: dict[str, tuple[str, str]] = {
    "h": ("float32", "1 (fractional Miller index, A^-1 q)"),
    "k": ("float32", "1"),
    "l": ("float32", "1"),
    "qx": ("float32", "1/angstrom (lab frame, q = s1 - s0, no 2pi)"),
    "qy": ("float32", "1/angstrom"),
    "qz": ("float32", "1/angstrom"),
    "q": ("float32", "1/angstrom (|q| = 1/d)"),
    "intensity": ("float32", "counts per reference pixel solid angle, corrected"),
    "sigma": ("float32", "same as intensity"),
    "raw": ("float32", "counts (ADU) as read"),
    "background": ("float32", "counts (ADU) subtracted before correction"),
    "panel": ("uint16", "panel index"),
    "x": ("uint16", "pixel column (fast), 0-based"),
    "y": ("uint16", "pixel row (slow), 0-based"),
    "polarisation": ("float32", "multiplier 1/P"),
    "lorentz": ("float32", "multiplier L (1 for stills; rotation data: |s1.(m2 x s0)|/(|s0||s1|) as DIALS)"),
    "efficiency": ("float32", "multiplier 1/QE"),
    "solid_angle": ("float32", "multiplier Omega_ref/Omega"),
    "air": ("float32", "multiplier 1/transmission"),
    "correction": ("float32", "product of the five multipliers"),
    "exposure": ("float32", "1/correction: ADU of net counts per unit of intensity (intensity * exposure = "
                            "raw - background; (sigma * exposure)^2 = variance of the net counts)"),
}


@dataclass
class StillExtraction:
    """Result for one still: the per-pixel table of unmasked pixels, the flags and summary info."""

    table: dict[str, np.ndarray]
    flags: list[np.ndarray]  # combined MaskBit flags per panel (0 = used)
    info: dict = field(default_factory=dict)
    setting_matrix: np.ndarray | None = None  # the A (lab frame, 3x3) that gave hkl = A^-1 q
    #: the per-still isotropic background estimate (``core.background.IsotropicProfile``), always computed
    background_profile: object = None

    def __len__(self) -> int:
        return int(self.table["intensity"].shape[0])

    def image(self, column: str, panel: int = 0, fill: float = np.nan) -> np.ndarray:
        """A table column painted back into a panel image (masked pixels = ``fill``)."""
        shape = self.flags[panel].shape
        out = np.full(shape, fill, dtype=np.float32)
        sel = self.table["panel"] == panel
        out[self.table["y"][sel], self.table["x"][sel]] = self.table[column][sel]
        return out


@dataclass
class PanelPixels:
    """Static per-pixel quantities of one panel for one detector + beam (flattened, row-major).

    Everything here depends only on the detector, beam (and goniometer) models, never on the
    image or the crystal. Computed in float64, stored in float32 (relative rounding 6e-8); per
    still, ``q = u / lambda - s0`` is formed from ``u`` in float32 as the extractor always has,
    so the tables (and the voxels pixels fall in) do not depend on which path filled the cache.
    """

    panel: object  # the dxtbx Panel (kept for the lazily computed full geometry)
    index: int
    shape: tuple[int, int]  # (ny, nx)
    wavelength: float
    s0: np.ndarray  # (3,) beam vector, 1/angstrom
    u: np.ndarray  # (3, npix) float32 unit vectors sample -> pixel (computed in float64)
    polarisation: np.ndarray  # (npix,) float32 multipliers
    lorentz: np.ndarray  # (npix,) float32, or a read-only broadcast 1 for stills
    efficiency: np.ndarray
    solid_angle: np.ndarray
    air: np.ndarray
    correction: np.ndarray  # product of the multipliers (float64 product, stored float32)
    efficiency_known: bool
    radial_bin: np.ndarray  # (ny, nx) uint16 index of the pixel's |q| shell (outlier statistics)

    @functools.cached_property
    def x_index(self) -> np.ndarray:
        """(npix,) uint16 pixel column of each flat index (for the numpy table path; made on first use)."""
        return _tile_x(self.shape[1], self.shape[0])

    @functools.cached_property
    def geom(self) -> geo.PanelGeometry:
        """Full-resolution float64 lab geometry (computed on first use; not needed per still)."""
        return geo.panel_geometry(self.panel, self.index)

    def frame(self) -> geo.PanelFrame:
        """Geometry at any sub-grid of pixels (e.g. binned centres for the beamstop search)."""
        return geo.PanelFrame(self.panel, self.index)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.u, self.polarisation, self.lorentz, self.efficiency,
                                          self.solid_angle, self.air, self.correction, self.radial_bin,
                                          self.__dict__.get("x_index", self.radial_bin[:0])) if a.strides[-1] != 0))


#: Process-wide store of static pixel arrays, keyed by geometry (see ``GeometryCache``). A bus
#: worker handles one still per job; sharing this store lets the stills of a run that share a
#: detector and beam model skip the static computation in every job after the first.
_PROCESS_PIXELS: "OrderedDict[str, list[PanelPixels]]" = OrderedDict()
_PROCESS_LOCK = threading.RLock()
#: how many geometries the process-wide store keeps (~11 float32/pixel: ~320 MB for a 6M detector)
PROCESS_CACHE_ENTRIES = 1


def clear_process_cache() -> None:
    """Drop every geometry from the process-wide store (frees its memory)."""
    with _PROCESS_LOCK:
        _PROCESS_PIXELS.clear()


class GeometryCache:
    """Static per-pixel quantities (q, |q|, corrections, radial bins) per geometry, and the
    beamstop found for it.

    Key: a hash of exactly what the static quantities depend on: the whole detector model
    (panel frames, pixel sizes, parallax strategy, sensor material, thickness and mu, image size,
    trusted range and masks), the beam direction, wavelength, polarisation normal and fraction,
    the goniometer of rotation data, and the air parameters. Stills whose models differ in any of
    these (e.g. a per-still refined detector distance) get their own entry, so a hit is always
    exact. The pixel arrays live in a process-wide LRU store (``shared=True``, default) so
    that successive jobs of one worker reuse them; an evicted entry's memory is recycled for the
    next geometry. The auto-detected beamstop is per ``GeometryCache`` instance (one instance
    per run/job, as a beamstop may move between runs) and keyed by the detector's pixel layout:
    found on the first still, reused for the others even when their refined geometries differ.
    """

    def __init__(self, max_entries: int = 1, shared: bool = True):
        self.shared = shared
        self._store: "OrderedDict[str, list[PanelPixels]]" = _PROCESS_PIXELS if shared else OrderedDict()
        #: auto-detected beamstop flags (and info) per detector pixel layout: a run's beamstop does not move
        self.beamstop: dict[str, tuple[list[np.ndarray], dict]] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(detector, beam, params: "ExtractionParams", goniometer=None) -> str:
        b = beam.to_dict()
        beam_part = {k: b.get(k) for k in ("direction", "wavelength", "polarization_normal", "polarization_fraction")}
        text = repr((detector.to_dict(), beam_part, goniometer.to_dict() if goniometer is not None else None,
                     float(params.air_path_fraction), float(params.air_density_g_cm3)))
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, detector, beam, params: "ExtractionParams", goniometer=None, key: str | None = None
            ) -> list[PanelPixels]:
        """``goniometer``: only for rotation data (adds the Lorentz factor); None for stills."""
        k = key or self.key(detector, beam, params, goniometer)
        with _PROCESS_LOCK if self.shared else contextlib.nullcontext():  # workers may run jobs in threads
            return self._get_locked(k, detector, beam, params, goniometer)

    def _get_locked(self, k, detector, beam, params, goniometer) -> list[PanelPixels]:
        if k in self._store:
            self.hits += 1
            self._store.move_to_end(k)
            return self._store[k]
        self.misses += 1
        cap = max(self.max_entries, PROCESS_CACHE_ENTRIES if self.shared else 1)
        while len(self._store) >= cap:
            _, old = self._store.popitem(last=False)
            arrays = [a if a.base is None else a.base for pp in old for a in
                      (pp.u, pp.polarisation, pp.efficiency, pp.solid_angle, pp.air,
                       pp.correction, pp.lorentz, pp.radial_bin) + (
                          (pp.__dict__["x_index"],) if "x_index" in pp.__dict__ else ())]
            del old
            WORKSPACE.release(arrays)  # they serve the next geometry (no fresh pages to fault in)
            del arrays
        pixels = static_pixels(detector, beam, params, goniometer)
        self._store[k] = pixels
        return pixels


class _Form:
    """``scale * v . (c0 + g (a f + b s)) / r - shift`` for a fixed vector ``v`` on blocks of rows.

    ``a`` (fast, 1-D) and ``b`` (slow, 1-D) are in-plane coordinates from the foot ``c0`` of the
    perpendicular, ``g`` the parallax scale. Zero coefficients are skipped (an axis-aligned
    detector costs one multiplication per component), and the fast-axis term is pre-tiled to the
    block shape: numpy's broadcasting loops are several times slower than contiguous ones.
    """

    def __init__(self, v, c0, f, s, a, b, rows: int, scale: float = 1.0, shift: float = 0.0):
        self.c = float(np.dot(v, c0)) * scale
        ca, cb = float(np.dot(v, f)) * scale, float(np.dot(v, s)) * scale
        self.a_tile = np.tile(a * ca, (rows, 1)) if ca != 0.0 else None
        self.b = b * cb if cb != 0.0 else None
        self.shift = shift

    def __call__(self, sl, gi, inv, buf):
        m = sl.stop - sl.start
        if self.b is not None:
            np.copyto(buf[:m], self.b[sl, None])
            terms = buf[:m]
            if self.a_tile is not None:
                terms += self.a_tile[:m]
        else:
            terms = self.a_tile[:m] if self.a_tile is not None else None
        res = np.multiply(terms, gi) if terms is not None else None
        if self.c != 0.0:
            if res is None:
                res = inv * self.c
            else:
                res += inv * self.c
        if res is None:
            res = np.zeros_like(inv)
        if self.shift != 0.0:
            res -= self.shift
        return res


def _tile_x(nx: int, ny: int) -> np.ndarray:
    """The column index of every flat pixel index (uint16), in recycled memory when possible."""
    out = WORKSPACE.empty((ny, nx), np.uint16)
    out[:] = np.arange(nx, dtype=np.uint16)
    return out.ravel()


def static_pixels(detector, beam, params: "ExtractionParams", goniometer=None, rows: int = 16,
                  radial_tables: bool = True) -> list[PanelPixels]:
    """Geometry and the correction multipliers for every pixel of every panel.

    With a ``goniometer`` (rotation data) the Lorentz factor is DIALS' ``|s1.(m2 x s0)|/(|s0||s1|)``
    for rotation axis ``m2``; stills have none (factor 1), as in DIALS.

    Works in float64 over blocks of ``rows`` detector rows (the temporaries stay in cache) and
    stores float32. For a flat panel with orthonormal fast/slow axes, a pixel at in-plane
    coordinates (a, b) from the foot of the perpendicular from the sample has
    ``|r|^2 = a^2 + b^2 + d0^2``, and dxtbx's parallax correction (``geometry.pixel_mm``) moves it
    radially to ``g (a, b)`` with ``g = 1 - att(|r|)/|r|``: the whole geometry follows from two 1-D
    arrays and ``|r|`` (cos(incidence) = d0/|r|). Other panels go through the general formulas of
    :func:`geometry.panel_geometry` per block. The formulas of ``corrections`` are evaluated
    (same values to float64 rounding; the tests compare both with DIALS).

    ``radial_tables`` (default): on a flat panel everything that costs a transcendental function
    (parallax ``g``, ``1/|r'|``, efficiency, solid angle, air) is a function of the one variable
    ``s = |r|^2`` before parallax. Those five are evaluated exactly on a uniform grid in ``s`` and
    interpolated per pixel by local cubics (:func:`radial_table`; relative error < ``RADIAL_TOL`` =
    2e-14, checked where the error peaks, far below the float32 rounding of the stored values), in
    one fused pass per panel (``kernels.static_flat``, or the same operations in numpy blocks):
    ~4x less CPU than the exact evaluation, which ``radial_tables=False`` keeps.
    """
    wl = float(beam.get_wavelength())
    k = 1.0 / wl
    s0 = np.asarray(beam.get_s0(), dtype=float)
    s0_hat = s0 / np.linalg.norm(s0)
    pol_n = np.asarray(beam.get_polarization_normal(), dtype=float)
    pol_f = float(beam.get_polarization_fraction())
    mu_air = corr.air_attenuation_coefficient(wl, params.air_density_g_cm3) * params.air_path_fraction
    omega_ref = corr.reference_solid_angle(detector)
    c_axis = None
    if goniometer is not None:
        m2 = np.asarray(goniometer.get_rotation_axis(), dtype=float)
        c_axis = np.cross(m2, s0) / np.linalg.norm(s0)
    # P = p_a + p_b (n.u)^2 + p_c (s0_hat.u)^2, expanded from corrections.polarisation_correction
    p_a, p_b, p_c = 1.0 - pol_f, -(1.0 - 2.0 * pol_f), pol_f
    out = []
    for i, panel in enumerate(detector):
        nx, ny = panel.get_image_size()
        npix = nx * ny
        u3 = WORKSPACE.empty((3, npix), np.float32).reshape(3, ny, nx)
        f32 = {name: WORKSPACE.empty((npix,), np.float32).reshape(ny, nx)
               for name in ("pol", "eff", "sa", "air", "tot")}
        lor = WORKSPACE.empty((npix,), np.float32).reshape(ny, nx) if c_axis is not None else None
        rbin = WORKSPACE.empty((ny, nx), np.uint16)  # shells 0..1999
        mu_s, t_s = float(panel.get_mu()), float(panel.get_thickness())
        eff_known = mu_s > 0 and t_s > 0
        frame = geo.PanelFrame(panel, i)
        area = frame.pixel_area
        flat = frame.flat_orthonormal
        if flat:
            f, s, d0, c0 = frame.f, frame.s, frame.d0, frame.c0
            psx, psy = panel.get_pixel_size()
            a = (np.arange(nx) + 0.5) * psx + float(np.dot(frame.o, f))  # mm along fast from the foot
            b = (np.arange(ny) + 0.5) * psy + float(np.dot(frame.o, s))
            a2d_tile = np.tile(a * a + d0 * d0, (rows, 1))
            b2 = b * b
            buf = np.empty((rows, nx))
            forms = {name: _Form(v, c0, f, s, a, b, rows) for name, v in
                     (("p1", pol_n), ("p3", s0_hat), ("lor", c_axis if c_axis is not None else np.zeros(3)))}
            for j, name in enumerate("xyz"):  # the unit vector's lab components
                forms[name] = _Form(np.eye(3)[j], c0, f, s, a, b, rows)
            mu_t0 = frame.parallax
            table = None
            if radial_tables:
                a2d = a * a + d0 * d0
                table = radial_table(float(b2.min() + a2d.min()), float(b2.max() + a2d.max()), functools.partial(
                    radial_functions, d0=d0, parallax=mu_t0, eff_known=eff_known, mu_s=mu_s, t_s=t_s,
                    sa_k=omega_ref / (area * d0), mu_air=mu_air))
            if table is not None:
                lor_v = c_axis if c_axis is not None else np.zeros(3)
                fc = np.array([[float(np.dot(v, c0)), float(np.dot(v, f)), float(np.dot(v, s))]
                               for v in (*np.eye(3), pol_n, s0_hat, lor_v)])
                consts = np.array([p_a, p_b, p_c, 2.0 * k * k, 1000.0 / k])
                lor_out = lor if lor is not None else f32["pol"]  # (not written without a goniometer)
                eff_out = f32["eff"]
                if kernels.enabled():
                    kernels.static_flat(a, b, b2, a2d, table[0], table[1], table[2], fc, consts, eff_known,
                                        c_axis is not None, u3.reshape(3, npix), f32["pol"].ravel(),
                                        eff_out.ravel(), f32["sa"].ravel(), f32["air"].ravel(),
                                        f32["tot"].ravel(), lor_out.ravel(), rbin.ravel())
                else:
                    _static_flat_numpy(a, b, b2, a2d, table, fc, consts, eff_known, c_axis is not None, u3,
                                       f32, lor, rbin, rows)
                one = np.broadcast_to(np.float32(1.0), (npix,))
                out.append(PanelPixels(
                    panel=panel, index=i, shape=(ny, nx), wavelength=wl, s0=s0, u=u3.reshape(3, npix),
                    polarisation=f32["pol"].ravel(), lorentz=lor.ravel() if lor is not None else one,
                    efficiency=f32["eff"].ravel() if eff_known else one, solid_angle=f32["sa"].ravel(),
                    air=f32["air"].ravel(), correction=f32["tot"].ravel(), efficiency_known=eff_known,
                    radial_bin=rbin))
                del f32
                continue
        for y0 in range(0, ny, rows):
            y1 = min(ny, y0 + rows)
            sl = slice(y0, y1)
            if flat:
                m = y1 - y0
                np.copyto(buf[:m], b2[sl, None])
                R2 = buf[:m] + a2d_tile[:m]
                if mu_t0 is not None:
                    mu, t0 = mu_t0
                    r = np.sqrt(R2)
                    t = r * (mu * t0 / d0)  # mu t0 / cos(incidence)
                    e = np.exp(-t)
                    t += 1.0
                    t *= e
                    np.subtract(1.0, t, out=t)  # mu x mean absorption depth
                    t /= r
                    t *= 1.0 / mu
                    g = np.subtract(1.0, t, out=t)  # radial parallax scale g = 1 - att/|r|
                    R2 -= d0 * d0
                    R2 *= g
                    R2 *= g
                    R2 += d0 * d0
                    del r, e
                else:
                    g = None
                rp = np.sqrt(R2, out=R2)
                inv = 1.0 / rp
                gi = g * inv if g is not None else inv
                p1 = forms["p1"](sl, gi, inv, buf)
                p3 = forms["p3"](sl, gi, inv, buf)
                for j, name in enumerate("xyz"):
                    u3[j, sl] = forms[name](sl, gi, inv, buf)
                cos_abs = inv * d0
                lo = np.abs(forms["lor"](sl, gi, inv, buf)) if c_axis is not None else None
                sa = rp * rp
                sa *= rp
                sa *= omega_ref / (area * d0)  # Omega_ref / Omega, Omega = A d0 / r^3
            else:
                gb = frame.block(y0, y1)
                rp = gb.dist
                inv = 1.0 / rp
                ux, uy, uz = gb.lab_x * inv, gb.lab_y * inv, gb.lab_z * inv
                p1 = ux * pol_n[0] + uy * pol_n[1] + uz * pol_n[2]
                p3 = ux * s0_hat[0] + uy * s0_hat[1] + uz * s0_hat[2]
                for j, uc in enumerate((ux, uy, uz)):
                    u3[j, sl] = uc
                cos_abs = gb.cos_obliquity
                lo = np.abs(ux * c_axis[0] + uy * c_axis[1] + uz * c_axis[2]) if c_axis is not None else None
                sa = rp * rp
                sa *= omega_ref / area
                sa /= cos_abs  # Omega_ref / Omega, Omega = A cos / r^2
            # polarisation 1/P (DIALS' stills convention, corrections.polarisation_correction)
            P = p1 * p1
            P *= p_b
            P += p_a
            p3sq = p3 * p3
            p3sq *= p_c
            P += p3sq
            pol = np.divide(1.0, P, out=P)
            f32["pol"][sl] = pol
            tot = pol
            if eff_known:  # 1 / QE, QE = 1 - exp(-mu t / |cos|)
                x = np.divide(-(mu_s * t_s), cos_abs)
                eff = np.expm1(x, out=x)
                np.divide(-1.0, eff, out=eff)
                f32["eff"][sl] = eff
                tot *= eff
            f32["sa"][sl] = sa
            tot *= sa
            air = rp * mu_air
            np.exp(air, out=air)
            f32["air"][sl] = air
            tot *= air
            if lo is not None:
                lor[sl] = lo
                tot *= lo
            f32["tot"][sl] = tot
            # radial shell of |q| = k sqrt(2 (1 - cos 2theta)) (float64: no cancellation trouble)
            qn = np.subtract(1.0, p3, out=p3sq)
            qn *= 2.0 * k * k
            np.sqrt(qn, out=qn)
            qn *= 1000.0 / k  # 2000 shells of |q| / 2k (the last one only at 2theta = 180 deg)
            rbin[sl] = qn
            if qn.max() >= 1999.0:
                np.minimum(rbin[sl], 1999, out=rbin[sl])
        one = np.broadcast_to(np.float32(1.0), (npix,))
        out.append(PanelPixels(
            panel=panel, index=i, shape=(ny, nx), wavelength=wl, s0=s0, u=u3.reshape(3, npix),
            polarisation=f32["pol"].ravel(),
            lorentz=lor.ravel() if lor is not None else one,
            efficiency=f32["eff"].ravel() if eff_known else one, solid_angle=f32["sa"].ravel(),
            air=f32["air"].ravel(), correction=f32["tot"].ravel(), efficiency_known=eff_known,
            radial_bin=rbin))
        del f32
    return out


#: relative error allowed for the interpolated radial functions (checked at every interval's midpoint)
RADIAL_TOL = 2e-14
#: the radial functions of ``static_pixels``' table path, in the order of the table's columns
RADIAL = ("inv", "gi", "eff", "sa", "air")


def radial_functions(s: np.ndarray, *, d0: float, parallax, eff_known: bool, mu_s: float, t_s: float,
                     sa_k: float, mu_air: float) -> np.ndarray:
    """(5, n) float64 at ``s = |r|^2`` (mm^2, pixel centre before parallax, flat panel at distance ``d0``):
    ``1/|r'|``, ``g/|r'|`` (``r' = `` the parallax-corrected position, ``g`` its radial scale), ``1/QE``,
    ``Omega_ref/Omega = |r'|^3 sa_k`` and ``exp(mu_air |r'|)``: the exact formulas of the per-pixel path."""
    s = np.asarray(s, dtype=np.float64)
    if parallax is not None:
        mu, t0 = parallax
        r = np.sqrt(s)
        t = r * (mu * t0 / d0)  # mu t0 / cos(incidence)
        e = np.exp(-t)
        att = (1.0 - (t + 1.0) * e) / r * (1.0 / mu)
        g = 1.0 - att
        R2 = (s - d0 * d0) * g * g + d0 * d0
    else:
        g = np.ones_like(s)
        R2 = s
    rp = np.sqrt(R2)
    inv = 1.0 / rp
    eff = -1.0 / np.expm1(-(mu_s * t_s) / (inv * d0)) if eff_known else np.ones_like(s)
    return np.stack([inv, g * inv, eff, rp * rp * rp * sa_k, np.exp(rp * mu_air)])


def radial_table(s_lo: float, s_hi: float, fn, tol: float = RADIAL_TOL, max_intervals: int = 1 << 16):
    """Local-cubic interpolation table of the functions ``fn(s) -> (m, n)`` on ``[s_lo, s_hi]``.

    Interval ``i`` (``w`` in [0, 1] from node i to i+1) holds the monomial coefficients of the cubic through
    nodes i-1 .. i+2 (Lagrange), ``(n_int, 4 m)``. Its error is ``h^4 f^(4)(xi)/24 (w+1) w (w-1) (w-2)``,
    largest at ``w = 1/2``: the table is refined (x4 intervals) until the relative error at every interval's
    midpoint is below ``tol``. Returns ``(coef, s_lo, 1/h)``, or None when the functions are not smooth
    enough on the grid (or a node would fall at ``s <= 0``): the caller then evaluates them per pixel.
    """
    if not (np.isfinite(s_lo) and np.isfinite(s_hi)) or s_lo <= 0 or s_hi < s_lo:
        return None
    n = 256
    span = max(s_hi - s_lo, s_lo * 1e-9)
    while n <= max_intervals:
        h = span / n
        if s_lo - h <= 0:
            return None
        f = fn(s_lo + h * np.arange(-1, n + 2))
        fm, f0, f1, f2 = f[:, :-3], f[:, 1:-2], f[:, 2:-1], f[:, 3:]
        coef = np.stack([f0, f1 - fm / 3.0 - f0 / 2.0 - f2 / 6.0, (fm + f1) / 2.0 - f0,
                         (f2 - fm) / 6.0 + (f0 - f1) / 2.0], axis=-1)  # (m, n, 4)
        exact = fn(s_lo + h * (np.arange(n) + 0.5))
        w = 0.5
        approx = coef[..., 0] + w * (coef[..., 1] + w * (coef[..., 2] + w * coef[..., 3]))
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.abs(approx - exact) / np.abs(exact)
        if np.all(np.isfinite(f)) and np.all(np.isfinite(exact)) and float(np.max(err)) <= tol:
            return np.ascontiguousarray(coef.transpose(1, 0, 2).reshape(n, -1)), float(s_lo), float(n / span)
        n *= 4
    return None


def _static_flat_numpy(a, b, b2, a2d, table, fc, consts, eff_known, has_lor, u3, f32, lor, rbin, rows):
    """``kernels.static_flat`` in numpy blocks of ``rows`` rows (the same float64 operations, same bits)."""
    coef, s_lo, inv_h = table
    n_int = coef.shape[0]
    p_a, p_b, p_c, qk, qs = (float(c) for c in consts)
    ny = b2.shape[0]
    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        sl = slice(y0, y1)
        s = b2[sl, None] + a2d[None, :]
        t = (s - s_lo) * inv_h
        idx = t.astype(np.intp)
        np.minimum(idx, n_int - 1, out=idx)
        w = t - idx
        cf = coef[idx]  # (m, nx, 20)

        def ev(j):
            c = cf[..., 4 * j:4 * j + 4]
            return c[..., 0] + w * (c[..., 1] + w * (c[..., 2] + w * c[..., 3]))

        inv, gi, eff, sa, air = (ev(j) for j in range(5))
        bcol = b[sl, None]

        def form(j):
            c, ca, cb = fc[j]
            return (bcol * cb + a[None, :] * ca) * gi + inv * c

        for j in range(3):
            u3[j, sl] = form(j)
        p1, p3 = form(3), form(4)
        P = p1 * p1 * p_b + p_a + p3 * p3 * p_c
        pol = 1.0 / P
        f32["pol"][sl] = pol
        tot = pol
        if eff_known:
            f32["eff"][sl] = eff
            tot = tot * eff
        f32["sa"][sl] = sa
        tot = tot * sa
        f32["air"][sl] = air
        tot = tot * air
        if has_lor:
            lo = np.abs(form(5))
            lor[sl] = lo
            tot = tot * lo
        f32["tot"][sl] = tot
        qn = np.sqrt((1.0 - p3) * qk) * qs
        rbin[sl] = np.minimum(qn, 1999.0)


def rotation_goniometer(experiment):
    """The goniometer if this is rotation data (scan with oscillation width > 0), else None."""
    scan, gonio = experiment.scan, experiment.goniometer
    if gonio is None or scan is None or scan.get_oscillation()[1] == 0:
        return None
    return gonio


def lab_setting_matrix(experiment, image_index: int = 0) -> np.ndarray:
    """``A`` in the lab frame for this image: ``S R(phi) F U B`` at the frame's mid-angle for
    rotation data (DIALS' convention), plain ``U B`` for stills. ``image_index``: the image's index in the
    experiment's imageset (0 for a one-frame experiment, whatever the frame's place in the sweep)."""
    A = np.asarray(experiment.crystal.get_A(), dtype=float).reshape(3, 3)
    gonio = rotation_goniometer(experiment)
    if gonio is None:
        return A
    from scitbx import matrix  # cctbx's scitbx (~1 s): only a rotation experiment needs it

    scan = experiment.scan
    # image_index counts from the imageset's first image, array indices from the scan's (e.g. frame 31 of a
    # sweep as its own one-image experiment: array index 30 + 0.5)
    phi = scan.get_angle_from_array_index(scan.get_array_range()[0] + image_index + 0.5, deg=False)
    axis = matrix.col(gonio.get_rotation_axis_datum())
    R = np.asarray(axis.axis_and_angle_as_r3_rotation_matrix(phi, deg=False), dtype=float).reshape(3, 3)
    S = np.asarray(gonio.get_setting_rotation(), dtype=float).reshape(3, 3)
    F = np.asarray(gonio.get_fixed_rotation(), dtype=float).reshape(3, 3)
    return S @ R @ F @ A


def static_flags(experiment, data, pixels: list[PanelPixels], params: "ExtractionParams", format_mask=None,
                 beamstop_cache: dict | None = None, cache_key: str | None = None):
    """UNTRUSTED | OVERLOAD | USER | BEAMSTOP flags, and info on the beamstop.

    With ``beamstop="auto"`` and a ``beamstop_cache``, the shadow found on the first still of a
    run (same detector and beam) is reused for the following stills.
    """
    det = experiment.detector
    flags = mk.untrusted_and_overload(det, data, format_mask)
    mk.apply_shapes(flags, params.mask_shapes, mk.MaskBit.USER)
    info: dict = {}
    if isinstance(params.beamstop, str):
        mode = params.beamstop.lower()
        if mode == "auto":
            cached = beamstop_cache.get(cache_key) if beamstop_cache is not None and cache_key else None
            if cached is None:
                good = [f == 0 for f in flags]
                # the polarisation multiplier flattens the azimuthal anisotropy before shadows are sought
                pol = [pp.polarisation.reshape(pp.shape) for pp in pixels]
                bs = mk.detect_beamstop(data, [pp.frame() for pp in pixels], experiment.beam.get_s0(), good,
                                        weights=pol, ratio_threshold=params.beamstop_ratio,
                                        detect_arm=params.detect_arm)
                binfo = dict(beamstop_mode="auto", beamstop_disk_pixels=bs.disk_pixels,
                             beamstop_arm_pixels=bs.arm_pixels, beamstop_arm_azimuth_deg=bs.arm_azimuth_deg,
                             beamstop_arm_half_width_mm=bs.arm_half_width_mm, beamstop_notes=bs.notes)
                cached = (bs.flags, binfo)
                if beamstop_cache is not None and cache_key:
                    beamstop_cache[cache_key] = cached
            else:
                cached = (cached[0], {**cached[1], "beamstop_mode": "auto (from the run's first still)"})
            for i, f in enumerate(cached[0]):
                flags[i] |= f
            info.update(cached[1])
        elif mode == "none":
            info["beamstop_mode"] = "none"
        else:
            raise InputError(f"beamstop must be 'auto', 'none' or shapes, got {params.beamstop!r}")
    else:
        mk.apply_shapes(flags, params.beamstop, mk.MaskBit.BEAMSTOP)
        info["beamstop_mode"] = "given"
    return flags, info


def resolution_flags(pixels: list[PanelPixels], s0, d_min: float) -> list[np.ndarray]:
    """RESOLUTION on every pixel whose centre lies beyond ``d_min`` (Å): |q| = 2 sin θ / λ > 1/d_min, i.e.
    cos 2θ = u·ŝ0 < 1 - λ²/(2 d_min²) with ``u`` the cached unit vector to the pixel centre (no parallax, as
    DIALS' resolution filters)."""
    s0 = np.asarray(s0, dtype=float)
    k = float(np.linalg.norm(s0))
    cos_limit = np.float32(1.0 - 1.0 / (2.0 * (k * d_min) ** 2))
    s0_hat = (s0 / k).astype(np.float32)
    return [np.where(s0_hat @ pp.u < cos_limit, np.uint8(mk.MaskBit.RESOLUTION), np.uint8(0)).reshape(pp.shape)
            for pp in pixels]


def _layout_key(detector) -> str:
    """The detector's pixel layout (panel count and image sizes): what a beamstop shadow is tied to."""
    return "layout:" + ",".join(f"{p.get_image_size()[0]}x{p.get_image_size()[1]}" for p in detector)


def _as_float32(d) -> np.ndarray:
    """Raw counts as float32 (exact for integer counts below 2^24; rounding 6e-8 relative otherwise)."""
    return np.asarray(d, dtype=np.float32)


def extract_still(experiment, data: Sequence[np.ndarray], reflections=None, *,
                  params: ExtractionParams | None = None, background: Sequence[np.ndarray] | None = None,
                  background_variance: Sequence[np.ndarray] | None = None, background_method: str | None = None,
                  dynamic_flags: Sequence[np.ndarray] | None = None, format_mask=None,
                  geometry_cache: GeometryCache | None = None, image_index: int = 0) -> StillExtraction:
    """Mask, correct and tabulate every usable pixel of one still.

    ``data``: raw counts per panel, (ny, nx) arrays in the detector's panel order.
    ``reflections``: DIALS table of this still's observed spots (for the Bragg mask), optional.
    ``background``: per-panel background image (same units as data), subtracted x ``background_scale``.
    ``background_variance``: per-panel variance of that background (ADU^2, e.g. of an estimate from
    background frames), added x ``background_scale``^2 to each pixel's variance; without it the background
    image's own Poisson variance is added. ``background_method`` names it in ``info`` ("image" by default).
    With ``params.isotropic_background`` the per-still isotropic estimate B(|q|) is subtracted instead
    (it is always computed and reported: ``background_profile``, ``info["isotropic_background"]``).
    ``dynamic_flags``: HOT/DEAD flags from ``RunPixelStatistics.hot_dead_flags`` for the run.

    Arithmetic per pixel is float32 on float32 inputs (counts, and the static multipliers and unit
    vectors computed in float64 and rounded once), the same operations as the original per-pixel
    code, so tables are bit-identical to it (relative rounding of the outputs ~1e-7). Constant
    columns (Lorentz 1 for stills, background 0 without a background, NaN hkl without a crystal,
    the panel index of a single-panel detector) are read-only broadcast arrays.
    """
    params = params or ExtractionParams()
    det, beam, crystal = experiment.detector, experiment.beam, experiment.crystal
    if len(data) != len(det):
        raise InputError(f"image has {len(data)} panels, detector model has {len(det)}")
    data = [_as_float32(d) for d in data]
    for i, (d, p) in enumerate(zip(data, det)):
        if d.shape != tuple(p.get_image_size()[::-1]):
            raise InputError(f"panel {i}: image shape {d.shape} != detector {p.get_image_size()[::-1]}")
    if params.isotropic_background and background is not None:
        raise InputError("give either a background (image or frames) or isotropic_background, not both")
    gonio = rotation_goniometer(experiment)
    lor_gonio = gonio if params.lorentz else None  # the static pixels get a Lorentz factor only when asked
    cache = geometry_cache or GeometryCache(1)
    key = cache.key(det, beam, params, lor_gonio)
    pixels = cache.get(det, beam, params, lor_gonio, key=key)

    flags, info = static_flags(experiment, data, pixels, params, format_mask, cache.beamstop, _layout_key(det))
    if params.d_min is not None:  # after the beamstop search, which wants the whole image
        for i, f in enumerate(resolution_flags(pixels, beam.get_s0(), params.d_min)):
            flags[i] |= f
    if dynamic_flags is not None:
        for i, f in enumerate(dynamic_flags):
            flags[i] |= f
    refl = reflections if params.use_observed_spots else None
    if crystal is not None:
        bragg, binfo = mk.bragg_flags(experiment, det, refl, radius_px=params.bragg_radius_px,
                                      d_min=params.bragg_d_min or (0.9 * params.d_min if params.d_min else None),
                                      delpsi_max=params.bragg_delpsi_max)
        info.update(binfo)
        for i, f in enumerate(bragg):
            flags[i] |= f
        del bragg
    else:
        info["bragg"] = "no crystal model: no Bragg mask, no hkl"
    if params.outlier_nsigma:
        out_f, n_out = mk.outlier_flags(data, flags, [pp.radial_bin for pp in pixels],
                                        [pp.polarisation.reshape(pp.shape) for pp in pixels],
                                        nsigma=params.outlier_nsigma, grow_px=params.outlier_grow_px,
                                        gain=params.gain)
        for i, f in enumerate(out_f):
            if f is not None:
                flags[i] |= f
        info["n_outlier_pixels"] = n_out

    wl = beam.get_wavelength()
    A_lab = lab_setting_matrix(experiment, image_index) if crystal is not None else None
    Ainv = np.linalg.inv(A_lab) if A_lab is not None else None
    if gonio is not None:
        info["rotation"] = ("Lorentz factor applied" if params.lorentz else "no Lorentz factor (lorentz=False)") + \
            "; hkl at the frame's mid-angle"
    info["lorentz_applied"] = lor_gonio is not None
    info.update(wavelength_A=wl, mu_air_per_mm=corr.air_attenuation_coefficient(wl, params.air_density_g_cm3),
                omega_ref_sr=corr.reference_solid_angle(det),
                polarization_fraction=beam.get_polarization_fraction(),
                polarization_normal=list(beam.get_polarization_normal()))
    table = _tabulate(pixels, data, flags, params, background, Ainv, background_variance)
    n_used = int(table["intensity"].shape[0])
    if "exposure" not in table:  # (the fused kernel writes it in its pass)
        exposure = WORKSPACE.get("table.exposure", n_used, np.float32, capacity=int(sum(f.size for f in flags)))
        np.divide(np.float32(1.0), table["correction"], out=exposure)  # float32: I * exposure = raw - background
        table["exposure"] = exposure
    exposure = table["exposure"]
    profile = bg.isotropic_profile(table["q"], table["intensity"], exposure, gain=params.gain)
    info["isotropic_background"] = profile.summary()
    if params.isotropic_background:
        table.update(bg.subtract_isotropic(profile, table))
        info["background_method"] = "isotropic"
    elif background is not None:
        info["background_method"] = background_method or "image"
    else:
        info["background_method"] = "none"
    eff_missing = [i for i, pp in enumerate(pixels) if not pp.efficiency_known]
    if eff_missing:
        info["efficiency_note"] = f"panels {eff_missing} have no sensor mu/thickness: efficiency 1"
    info["n_pixels_total"] = int(sum(f.size for f in flags))
    info["n_pixels_used"] = int(table["intensity"].shape[0])
    if kernels.enabled():
        hist = np.zeros(256, np.int64)
        for f in flags:
            kernels.flag_histogram(np.ascontiguousarray(f).ravel(), hist)
    else:
        hist = sum(np.bincount(f.ravel(), minlength=256) for f in flags)
    values = np.arange(256)
    for bit in mk.MaskBit:
        info[f"n_masked_{bit.name.lower()}"] = int(hist[(values & int(bit)) != 0].sum())
    return StillExtraction(table, flags, info, A_lab, profile)


def _tabulate(pixels: list[PanelPixels], data: list[np.ndarray], flags: list[np.ndarray],
              params: ExtractionParams, background, Ainv, background_variance=None) -> dict[str, np.ndarray]:
    """The per-pixel table of the unflagged pixels, gathered straight into preallocated columns.

    Columns come from the process workspace (memory reused from the previous still when that
    result has been dropped); constant columns are read-only broadcasts.
    """
    if kernels.enabled():
        return _tabulate_fused(pixels, data, flags, params, background, Ainv, background_variance)
    sel = [np.flatnonzero(f.ravel() == 0) for f in flags]
    counts = [int(s.size) for s in sel]
    n = int(sum(counts))
    f32 = np.float32
    cap = int(sum(f.size for f in flags))  # room for every pixel: the next still fits in the same memory

    def ws(name, shape, dtype=np.float32):
        return WORKSPACE.get(name, shape, dtype, capacity=cap * (shape[0] if isinstance(shape, tuple) else 1))

    def const(value, dtype=np.float32):
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n,))

    def varying(attr):  # a static multiplier that is not 1 everywhere
        return any(getattr(pp, attr).strides[-1] != 0 for pp in pixels)

    q = ws("table.qvec", (3, n))
    total = ws("table.correction", n)
    cols = {name: ws(f"table.{name}", n) for name in ("q", "raw", "polarisation", "solid_angle", "air")}
    cols["x"] = ws("table.x", n, np.uint16)
    cols["y"] = ws("table.y", n, np.uint16)
    for name in ("efficiency", "lorentz"):
        cols[name] = ws(f"table.{name}", n) if varying(name) else const(1.0)
    bkg = ws("table.background", n) if background is not None else None
    bgv = ws("table.bgvar", n) if background is not None and background_variance is not None else None
    panel = ws("table.panel", n, np.uint16) if len(pixels) > 1 else const(0, np.uint16)
    off = 0
    for i, (pp, d, idx, m) in enumerate(zip(pixels, data, sel, counts)):
        part = slice(off, off + m)
        for j in range(3):
            np.take(pp.u[j], idx, out=q[j, part], mode="clip")
        np.take(pp.correction, idx, out=total[part], mode="clip")
        np.take(d.ravel(), idx, out=cols["raw"][part], mode="clip")
        for name in ("polarisation", "efficiency", "lorentz", "solid_angle", "air"):
            if cols[name].strides[0] != 0:
                np.take(getattr(pp, name), idx, out=cols[name][part], mode="clip")
        np.take(pp.x_index, idx, out=cols["x"][part], mode="clip")
        ny, nx = pp.shape
        rows = np.count_nonzero(flags[i] == 0, axis=1)
        cols["y"][part] = np.repeat(np.arange(ny, dtype=np.uint16), rows)
        if bkg is not None:
            np.take(_as_float32(background[i]).ravel(), idx, out=bkg[part], mode="clip")
        if bgv is not None:
            np.take(_as_float32(background_variance[i]).ravel(), idx, out=bgv[part], mode="clip")
        if panel.strides[0] != 0:
            panel[part] = i
        off += m
    del sel
    # q = s1 - s0 from the float32 unit vectors (float32 arithmetic), |q| from its components
    q *= f32(1.0 / pixels[0].wavelength)
    q -= pixels[0].s0.astype(f32)[:, None]
    cq = np.multiply(q[0], q[0], out=cols["q"])  # |q| = sqrt((qx^2 + qy^2) + qz^2), as the fused kernel
    for j in (1, 2):
        cq += q[j] * q[j]
    np.sqrt(cq, out=cq)
    raw = cols["raw"]
    gain = f32(params.gain)
    var = np.maximum(raw, gain, out=ws("table.sigma", n))  # counting_variance: gain * max(raw, gain)
    var *= gain
    net = ws("table.intensity", n)
    if bkg is not None:
        bkg *= f32(params.background_scale)
        if bgv is not None:  # the background estimate's own variance, scaled as the background
            bgv *= f32(params.background_scale ** 2)
            var += bgv
        else:  # a plain image: Poisson variance of its counts
            var += f32(params.background_scale * params.gain) * np.maximum(bkg, f32(0.0))
        np.subtract(raw, bkg, out=net)
    else:
        net[:] = raw
    net *= total
    np.sqrt(var, out=var)
    var *= total
    if Ainv is not None:
        hkl = _hkl(Ainv, q, ws("table.hkl", (3, n)), ws("table.hkl_term", n))
        h, k, l = hkl[0], hkl[1], hkl[2]
    else:
        h = k = l = const(np.nan)
    return {"h": h, "k": k, "l": l, "qx": q[0], "qy": q[1], "qz": q[2], "q": cols["q"], "intensity": net,
            "sigma": var, "raw": raw, "background": bkg if bkg is not None else const(0.0), "panel": panel,
            "x": cols["x"], "y": cols["y"], "polarisation": cols["polarisation"], "lorentz": cols["lorentz"],
            "efficiency": cols["efficiency"], "solid_angle": cols["solid_angle"], "air": cols["air"],
            "correction": total}


def _hkl(Ainv, q, out, term):
    """h_j = (a_j0 qx + a_j1 qy) + a_j2 qz in float32 (a = A^-1 rounded to float32), the operations of the fused
    table kernel. (``np.matmul`` gave the same to float32 rounding, in an order of its BLAS's choosing.)"""
    a = Ainv.astype(np.float32)
    for j in range(3):
        np.multiply(q[0], a[j, 0], out=out[j])
        out[j] += np.multiply(q[1], a[j, 1], out=term)
        out[j] += np.multiply(q[2], a[j, 2], out=term)
    return out


_FACTOR_NAMES = ("polarisation", "efficiency", "lorentz", "solid_angle", "air")


def _tabulate_fused(pixels: list[PanelPixels], data: list[np.ndarray], flags: list[np.ndarray],
                    params: ExtractionParams, background, Ainv, background_variance=None) -> dict[str, np.ndarray]:
    """``_tabulate`` with one fused pass per panel (``kernels.gather_panel``): same values, same columns."""
    f32 = np.float32
    flat = [np.ascontiguousarray(f).ravel() for f in flags]
    n = int(sum(f.size - np.count_nonzero(f) for f in flat))
    cap = int(sum(f.size for f in flags))

    def ws(name, shape, dtype=np.float32):
        return WORKSPACE.get(name, shape, dtype, capacity=cap * (shape[0] if isinstance(shape, tuple) else 1))

    def const(value, dtype=np.float32):
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n,))

    varying = [any(getattr(pp, a).strides[-1] != 0 for pp in pixels) for a in _FACTOR_NAMES]
    q = ws("table.qvec", (3, n))
    total = ws("table.correction", n)
    fac = ws("table.factors", (5, n))
    raw = ws("table.raw", n)
    x = ws("table.x", n, np.uint16)
    y = ws("table.y", n, np.uint16)
    net = ws("table.intensity", n)
    sig = ws("table.sigma", n)
    cq = ws("table.q", n)
    has_bkg = background is not None
    bkg = ws("table.background", n) if has_bkg else np.empty(1, f32)
    panel = ws("table.panel", n, np.uint16) if len(pixels) > 1 else const(0, np.uint16)
    inv_wl = f32(1.0 / pixels[0].wavelength)
    s0 = pixels[0].s0.astype(f32)
    gain = f32(params.gain)
    bscale = f32(params.background_scale)
    bvar = f32(params.background_scale * params.gain)
    bvar2 = f32(params.background_scale ** 2)
    has_bgvar = has_bkg and background_variance is not None
    dummy = np.empty(1, f32)
    expo = ws("table.exposure", n)
    has_hkl = Ainv is not None
    hkl = ws("table.hkl", (3, n)) if has_hkl else np.empty((3, 1), f32)
    ainv = Ainv.astype(f32) if has_hkl else np.zeros((3, 3), f32)
    off = 0
    for i, (pp, d) in enumerate(zip(pixels, data)):
        srcs, mode = [], np.zeros(5, np.int64)
        for j, a in enumerate(_FACTOR_NAMES):
            arr = getattr(pp, a)
            if not varying[j]:
                srcs.append(dummy)
            elif arr.strides[-1] == 0:
                srcs.append(np.array([arr[0]], f32))
                mode[j] = 2
            else:
                srcs.append(arr)
                mode[j] = 1
        b = np.ascontiguousarray(background[i], dtype=f32).ravel() if has_bkg else dummy
        bv = np.ascontiguousarray(background_variance[i], dtype=f32).ravel() if has_bgvar else dummy
        m = kernels.gather_panel(flat[i], pp.u, pp.correction, *srcs, mode, np.ascontiguousarray(d).ravel(), b,
                                 has_bkg, bv, has_bgvar, pp.shape[1], inv_wl, s0, gain, bscale, bvar, bvar2, off, q,
                                 cq, total, fac, x, y, raw, bkg, net, sig, ainv, has_hkl, hkl, expo)
        if panel.strides[0] != 0:
            panel[off:off + m] = i
        off += m
    assert off == n
    if has_hkl:
        h, k, l = hkl[0], hkl[1], hkl[2]
    else:
        h = k = l = const(np.nan)
    cols = {a: (fac[j] if varying[j] else const(1.0)) for j, a in enumerate(_FACTOR_NAMES)}
    return {"h": h, "k": k, "l": l, "qx": q[0], "qy": q[1], "qz": q[2], "q": cq, "intensity": net,
            "sigma": sig, "raw": raw, "background": bkg if has_bkg else const(0.0), "panel": panel,
            "x": x, "y": y, "polarisation": cols["polarisation"], "lorentz": cols["lorentz"],
            "efficiency": cols["efficiency"], "solid_angle": cols["solid_angle"], "air": cols["air"],
            "correction": total, "exposure": expo}
