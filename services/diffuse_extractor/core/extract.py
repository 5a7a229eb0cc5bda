"""Per-still diffuse extraction: masks -> per-pixel q, hkl, corrected I and sigma.

``extract_still`` is the science entry point: pure function of a DIALS experiment, the
still's raw panel images and (optionally) its reflections; no files involved.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import corrections as corr
from . import geometry as geo
from . import masks as mk

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
}


@dataclass
class ExtractionParams:
    """Knobs of one extraction (all optional)."""

    gain: float = 1.0  # ADU per photon, for counting statistics
    beamstop: str | Sequence[mk.Shape] = "auto"  # "auto", "none" or explicit shapes
    detect_arm: bool = True
    beamstop_ratio: float = 0.5
    user_shapes: Sequence[mk.Shape] = ()
    bragg_radius_px: float | None = None  # None: from the spot profile
    bragg_d_min: float | None = None  # None: the detector's corner resolution
    bragg_delpsi_max: float = 0.003  # rad; DIALS' stills prediction keeps |delta psi| < 0.0015
    outlier_nsigma: float | None = 8.0  # mask unpredicted bright pixels (None: off)
    outlier_grow_px: float = 2.0
    use_observed_spots: bool = True
    air_path_fraction: float = 1.0  # fraction of the sample-pixel path in air
    air_density_g_cm3: float = corr.DRY_AIR_DENSITY_G_CM3
    background_scale: float = 1.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        for key in ("beamstop", "user_shapes"):
            v = d[key]
            if not isinstance(v, str):
                d[key] = [f"{s.kind}:{s.panel}:" + ",".join(f"{c:g}" for c in s.coords) for s in v]
        return d


@dataclass
class StillExtraction:
    """Result for one still: the per-pixel table of unmasked pixels, the flags and summary info."""

    table: dict[str, np.ndarray]
    flags: list[np.ndarray]  # combined MaskBit flags per panel (0 = used)
    info: dict = field(default_factory=dict)

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
    """Static per-pixel quantities of one panel for one detector + beam (flattened, row-major)."""

    geom: geo.PanelGeometry
    u: np.ndarray  # (3, npix) float32 unit vectors sample -> pixel
    polarisation: np.ndarray  # (npix,) float32 multipliers (computed in float64)
    lorentz: np.ndarray
    efficiency: np.ndarray
    solid_angle: np.ndarray
    air: np.ndarray
    correction: np.ndarray  # product of the multipliers
    efficiency_known: bool
    radial_bin: np.ndarray  # (ny, nx) int32 index of the pixel's |q| shell (outlier statistics)


class GeometryCache:
    """Pixel geometry and static correction factors per (detector, beam, air) model.

    A run's stills usually share one detector and beam, so only the orientation-dependent
    part (hkl) and the masks are recomputed per still.
    """

    def __init__(self, max_entries: int = 1):
        self._store: dict[str, list[PanelPixels]] = {}
        #: auto-detected beamstop flags (and info) per detector+beam key: a run's beamstop does not move
        self.beamstop: dict[str, tuple[list[np.ndarray], dict]] = {}
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(detector, beam, params: "ExtractionParams", goniometer=None) -> str:
        text = repr((detector.to_dict(), beam.to_dict(), goniometer.to_dict() if goniometer is not None else None,
                     params.air_path_fraction, params.air_density_g_cm3))
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, detector, beam, params: "ExtractionParams", goniometer=None) -> list[PanelPixels]:
        """``goniometer``: only for rotation data (adds the Lorentz factor); None for stills."""
        k = self.key(detector, beam, params, goniometer)
        if k in self._store:
            self.hits += 1
            return self._store[k]
        self.misses += 1
        if len(self._store) >= self.max_entries:
            old = next(iter(self._store))
            self._store.pop(old)
            self.beamstop.pop(old, None)
        self._store[k] = static_pixels(detector, beam, params, goniometer)
        return self._store[k]


def static_pixels(detector, beam, params: "ExtractionParams", goniometer=None) -> list[PanelPixels]:
    """Geometry and the correction multipliers for every pixel of every panel.

    With a ``goniometer`` (rotation data) the Lorentz factor is DIALS' ``|s1.(m2 x s0)|/(|s0||s1|)``
    for rotation axis ``m2``; stills have none (factor 1), as in DIALS.
    """
    wl = beam.get_wavelength()
    s0 = np.asarray(beam.get_s0(), dtype=float)
    mu_air = corr.air_attenuation_coefficient(wl, params.air_density_g_cm3)
    omega_ref = corr.reference_solid_angle(detector)
    out = []
    for i, panel in enumerate(detector):
        g = geo.panel_geometry(panel, i)
        dist = g.dist.ravel()
        ux, uy, uz = (c.ravel() / dist for c in (g.lab_x, g.lab_y, g.lab_z))
        cos_o = g.cos_obliquity.ravel()
        k = 1.0 / wl
        pol = corr.polarisation_correction(ux * k, uy * k, uz * k, s0,
                                           beam.get_polarization_normal(), beam.get_polarization_fraction())
        qe = corr.detector_efficiency(cos_o, panel.get_mu(), panel.get_thickness())
        eff = np.ones_like(dist) if qe is None else 1.0 / qe
        sa = omega_ref / corr.solid_angle(g.pixel_area, dist, cos_o)
        air = corr.air_correction(dist, mu_air, params.air_path_fraction)
        if goniometer is not None:
            m2 = np.asarray(goniometer.get_rotation_axis(), dtype=float)
            c = np.cross(m2, s0)
            lor = np.abs(ux * c[0] + uy * c[1] + uz * c[2]) / np.linalg.norm(s0)
        else:
            lor = np.ones_like(dist)
        total = pol * lor * eff * sa * air
        u = np.stack([ux, uy, uz]).astype(np.float32)
        f32 = [a.astype(np.float32) for a in (pol, lor, eff, sa, air, total)]
        qn = np.sqrt((ux * k - s0[0]) ** 2 + (uy * k - s0[1]) ** 2 + (uz * k - s0[2]) ** 2)
        rbin = np.minimum((qn / (2.0 * k) * 2000).astype(np.int32), 1999).reshape(g.shape)
        out.append(PanelPixels(g, u, *f32, qe is not None, rbin))
    return out


def rotation_goniometer(experiment):
    """The goniometer if this is rotation data (scan with oscillation width > 0), else None."""
    scan, gonio = experiment.scan, experiment.goniometer
    if gonio is None or scan is None or scan.get_oscillation()[1] == 0:
        return None
    return gonio


def lab_setting_matrix(experiment, image_index: int = 0) -> np.ndarray:
    """``A`` in the lab frame for this image: ``S R(phi) F U B`` at the frame's mid-angle for
    rotation data (DIALS' convention), plain ``U B`` for stills."""
    A = np.asarray(experiment.crystal.get_A(), dtype=float).reshape(3, 3)
    gonio = rotation_goniometer(experiment)
    if gonio is None:
        return A
    from scitbx import matrix

    scan = experiment.scan
    phi = scan.get_angle_from_array_index(image_index + 0.5, deg=False)
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
    mk.apply_shapes(flags, params.user_shapes, mk.MaskBit.USER)
    info: dict = {}
    if isinstance(params.beamstop, str):
        mode = params.beamstop.lower()
        if mode == "auto":
            cached = beamstop_cache.get(cache_key) if beamstop_cache is not None and cache_key else None
            if cached is None:
                good = [f == 0 for f in flags]
                # the polarisation multiplier flattens the azimuthal anisotropy before shadows are sought
                pol = [pp.polarisation.reshape(pp.geom.shape) for pp in pixels]
                bs = mk.detect_beamstop(data, [pp.geom for pp in pixels], experiment.beam.get_s0(), good,
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
            raise ValueError(f"beamstop must be 'auto', 'none' or shapes, got {params.beamstop!r}")
    else:
        mk.apply_shapes(flags, params.beamstop, mk.MaskBit.BEAMSTOP)
        info["beamstop_mode"] = "given"
    return flags, info


def extract_still(experiment, data: Sequence[np.ndarray], reflections=None, *,
                  params: ExtractionParams | None = None, background: Sequence[np.ndarray] | None = None,
                  dynamic_flags: Sequence[np.ndarray] | None = None, format_mask=None,
                  geometry_cache: GeometryCache | None = None, image_index: int = 0) -> StillExtraction:
    """Mask, correct and tabulate every usable pixel of one still.

    ``data``: raw counts per panel, (ny, nx) arrays in the detector's panel order.
    ``reflections``: DIALS table of this still's observed spots (for the Bragg mask), optional.
    ``background``: per-panel background image (same units as data), subtracted x ``background_scale``.
    ``dynamic_flags``: HOT/DEAD flags from ``RunPixelStatistics.hot_dead_flags`` for the run.
    """
    params = params or ExtractionParams()
    det, beam, crystal = experiment.detector, experiment.beam, experiment.crystal
    if len(data) != len(det):
        raise ValueError(f"image has {len(data)} panels, detector model has {len(det)}")
    data = [np.asarray(d) for d in data]
    for i, (d, p) in enumerate(zip(data, det)):
        if d.shape != tuple(p.get_image_size()[::-1]):
            raise ValueError(f"panel {i}: image shape {d.shape} != detector {p.get_image_size()[::-1]}")
    gonio = rotation_goniometer(experiment)
    cache = geometry_cache or GeometryCache(1)
    pixels = cache.get(det, beam, params, gonio)

    flags, info = static_flags(experiment, data, pixels, params, format_mask, cache.beamstop,
                               cache.key(det, beam, params, gonio))
    if dynamic_flags is not None:
        for i, f in enumerate(dynamic_flags):
            flags[i] |= f
    refl = reflections if params.use_observed_spots else None
    if crystal is not None:
        bragg, binfo = mk.bragg_flags(experiment, det, refl, radius_px=params.bragg_radius_px,
                                      d_min=params.bragg_d_min, delpsi_max=params.bragg_delpsi_max)
        info.update(binfo)
        for i, f in enumerate(bragg):
            flags[i] |= f
    else:
        info["bragg"] = "no crystal model: no Bragg mask, no hkl"
    if params.outlier_nsigma:
        out_f, n_out = mk.outlier_flags(data, flags, [pp.radial_bin for pp in pixels],
                                        [pp.polarisation.reshape(pp.geom.shape) for pp in pixels],
                                        nsigma=params.outlier_nsigma, grow_px=params.outlier_grow_px,
                                        gain=params.gain)
        for i, f in enumerate(out_f):
            flags[i] |= f
        info["n_outlier_pixels"] = n_out

    wl = beam.get_wavelength()
    s0 = np.asarray(beam.get_s0(), dtype=float)
    Ainv = np.linalg.inv(lab_setting_matrix(experiment, image_index)) if crystal is not None else None
    if gonio is not None:
        info["rotation"] = "Lorentz factor applied; hkl at the frame's mid-angle"
    info.update(wavelength_A=wl, mu_air_per_mm=corr.air_attenuation_coefficient(wl, params.air_density_g_cm3),
                omega_ref_sr=corr.reference_solid_angle(det),
                polarization_fraction=beam.get_polarization_fraction(),
                polarization_normal=list(beam.get_polarization_normal()))

    cols: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    eff_missing = []
    for i, (pp, d, f) in enumerate(zip(pixels, data, flags)):
        flat = np.flatnonzero(f.ravel() == 0)
        yy, xx = np.divmod(flat, f.shape[1])
        q = pp.u[:, flat]
        q *= np.float32(1.0 / wl)
        q -= s0.astype(np.float32)[:, None]
        if not pp.efficiency_known:
            eff_missing.append(i)
        total = pp.correction[flat]
        raw = d.ravel()[flat].astype(np.float32)
        var = corr.counting_variance(raw, np.float32(params.gain))
        if background is not None:
            b = np.asarray(background[i]).ravel()[flat].astype(np.float32) * np.float32(params.background_scale)
            var += np.float32(params.background_scale * params.gain) * np.maximum(b, 0.0)
            net = raw - b
        else:
            b = np.zeros(raw.shape, np.float32)
            net = raw
        hkl = Ainv.astype(np.float32) @ q if Ainv is not None else np.full(q.shape, np.nan, np.float32)
        np.sqrt(var, out=var)
        var *= total
        vals = {
            "h": hkl[0], "k": hkl[1], "l": hkl[2], "qx": q[0], "qy": q[1], "qz": q[2],
            "q": np.sqrt(np.einsum("ij,ij->j", q, q)),
            "intensity": net * total, "sigma": var, "raw": raw, "background": b,
            "panel": np.full(raw.shape, i, dtype=np.uint16), "x": xx, "y": yy,
            "polarisation": pp.polarisation[flat], "lorentz": pp.lorentz[flat], "efficiency": pp.efficiency[flat],
            "solid_angle": pp.solid_angle[flat], "air": pp.air[flat], "correction": total,
        }
        for c, (dt, _) in COLUMNS.items():
            cols[c].append(np.asarray(vals[c]).astype(dt, copy=False))
        del vals, q, hkl
    table = {c: (np.concatenate(v) if len(v) > 1 else v[0]) if v else np.zeros(0, COLUMNS[c][0])
             for c, v in cols.items()}
    if eff_missing:
        info["efficiency_note"] = f"panels {eff_missing} have no sensor mu/thickness: efficiency 1"
    info["n_pixels_total"] = int(sum(f.size for f in flags))
    info["n_pixels_used"] = int(table["intensity"].shape[0])
    for bit in mk.MaskBit:
        info[f"n_masked_{bit.name.lower()}"] = int(sum(int(((f & np.uint8(bit)) != 0).sum()) for f in flags))
    return StillExtraction(table, flags, info)
