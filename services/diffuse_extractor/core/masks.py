"""Pixel masks for diffuse extraction, one ``uint8`` bit-field image per detector panel.

A pixel is used only if its flags are 0. Bits (``MaskBit``):

==========  =====  ============================================================
bit         value  meaning
==========  =====  ============================================================
UNTRUSTED   1      module gaps, format pixel mask, panel untrusted rectangles,
                   values at/below the panel's trusted minimum (dxtbx)
BEAMSTOP    2      beamstop shadow and its arm (auto-detected or given)
USER        4      user-given polygons and circles
HOT         8      hot pixel (always bright across the run's stills)
DEAD        16     dead pixel (never counts across the run while neighbours do)
OVERLOAD    32     value at/above the panel's trusted maximum in this still
BRAGG       64     around predicted and observed Bragg reflections of this still
==========  =====  ============================================================

Static = UNTRUSTED | BEAMSTOP | USER, dynamic = HOT | DEAD | OVERLOAD, per-still = BRAGG.
"""
from __future__ import annotations

import enum
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from scipy import ndimage as ndi

from . import kernels, mask_kernels
from .errors import InputError
from .workspace import WORKSPACE


class MaskBit(enum.IntFlag):
    UNTRUSTED = 1
    BEAMSTOP = 2
    USER = 4
    HOT = 8
    DEAD = 16
    OVERLOAD = 32
    BRAGG = 64
    RESOLUTION = 128  # beyond the extraction's d_min: not extracted


STATIC_BITS = MaskBit.UNTRUSTED | MaskBit.BEAMSTOP | MaskBit.USER

DYNAMIC_BITS = MaskBit.HOT | MaskBit.DEAD | MaskBit.OVERLOAD


def empty_flags(detector) -> list[np.ndarray]:
    """One zeroed uint8 flag image per panel, shaped (ny, nx)."""
    return [np.zeros(p.get_image_size()[::-1], dtype=np.uint8) for p in detector]


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """A user mask shape on one panel, in pixel coordinates (x fast, y slow; 0.5 = pixel centre)."""

    kind: str  # "circle" or "polygon"
    panel: int
    coords: tuple[float, ...]  # circle: (x, y, r); polygon: (x1, y1, x2, y2, ...)

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """Parse ``circle:PANEL:X,Y,R`` or ``polygon:PANEL:X1,Y1,X2,Y2,X3,Y3[,...]`` (pixels)."""
        m = re.fullmatch(r"\s*(circle|polygon)\s*:\s*(\d+)\s*:\s*([-+0-9.eE,\s]+)", text)
        if not m:
            raise InputError(f"bad mask shape {text!r}: expected circle:PANEL:X,Y,R or polygon:PANEL:X1,Y1,X2,Y2,...")
        kind, panel = m.group(1), int(m.group(2))
        coords = tuple(float(v) for v in m.group(3).replace(" ", "").split(",") if v)
        if kind == "circle" and (len(coords) != 3 or coords[2] <= 0):
            raise InputError(f"bad circle {text!r}: need X,Y,R with R > 0")
        if kind == "polygon" and (len(coords) < 6 or len(coords) % 2):
            raise InputError(f"bad polygon {text!r}: need at least 3 X,Y vertices")
        return cls(kind, panel, coords)

    def rasterise(self, shape_yx: tuple[int, int]) -> np.ndarray:
        """Boolean image of the pixels whose centres lie inside the shape."""
        from skimage.draw import disk, polygon  # scikit-image (~0.3 s): only user shapes need it

        out = np.zeros(shape_yx, dtype=bool)
        if self.kind == "circle":
            x, y, r = self.coords
            rr, cc = disk((y - 0.5, x - 0.5), r, shape=shape_yx)
        else:
            xs = np.asarray(self.coords[0::2]) - 0.5
            ys = np.asarray(self.coords[1::2]) - 0.5
            rr, cc = polygon(ys, xs, shape=shape_yx)
        out[rr, cc] = True
        return out


def apply_shapes(flags: list[np.ndarray], shapes: Sequence[Shape], bit: int) -> None:
    for s in shapes:
        if not 0 <= s.panel < len(flags):
            raise InputError(f"mask shape on panel {s.panel}, detector has {len(flags)} panels")
        flags[s.panel][s.rasterise(flags[s.panel].shape)] |= np.uint8(bit)


# --------------------------------------------------------------------------- untrusted / overload
def untrusted_and_overload(detector, data: Sequence[np.ndarray], format_mask=None) -> list[np.ndarray]:
    """UNTRUSTED and OVERLOAD bits from dxtbx: trusted range, untrusted rectangles, format mask.

    ``format_mask``: per-panel boolean (True = good) static mask of the format class / imageset
    (``imageset.get_static_mask()``), or None.
    """
    flags = []
    for i, panel in enumerate(detector):
        d = np.asarray(data[i])
        lo, hi = panel.get_trusted_range()
        fm = format_mask[i] if format_mask is not None else None
        if kernels.enabled() and d.dtype == np.float32 and (fm is None or np.shape(fm) == d.shape):  # one pass
            f = np.empty(d.shape, np.uint8)
            good = np.ascontiguousarray(fm, dtype=bool).ravel() if fm is not None else np.ones(1, bool)
            kernels.trust_flags(np.ascontiguousarray(d).ravel(), np.float32(lo), np.float32(hi),
                                int(MaskBit.OVERLOAD), good, fm is not None, f.ravel())
            for x0, x1, y0, y1 in panel.get_mask():
                f[max(y0, 0):y1, max(x0, 0):x1] |= MaskBit.UNTRUSTED
            flags.append(f)
            continue
        f = np.less_equal(d, lo).view(np.uint8)  # True -> 1 == UNTRUSTED
        over = np.greater_equal(d, hi).view(np.uint8)
        over *= np.uint8(MaskBit.OVERLOAD)
        f |= over
        del over
        for x0, x1, y0, y1 in panel.get_mask():  # untrusted rectangles (pixel, inclusive-exclusive)
            f[max(y0, 0):y1, max(x0, 0):x1] |= MaskBit.UNTRUSTED
        if format_mask is not None and format_mask[i] is not None:
            bad = np.logical_not(np.asarray(format_mask[i], dtype=bool)).view(np.uint8)  # 1 == UNTRUSTED
            f |= bad
        flags.append(f)
    return flags


# --------------------------------------------------------------------------- hot / dead
class RunPixelStatistics:
    """Streaming per-pixel statistics over the stills of a run (bounded memory: 4 images per panel).

    Hot pixels are bright in *every* still (Bragg peaks move between stills, so the per-pixel
    minimum over the run stays low for them); dead pixels never count while their neighbours do.
    """

    def __init__(self, detector):
        shapes = [p.get_image_size()[::-1] for p in detector]
        self.n = [np.zeros(s, dtype=np.int32) for s in shapes]
        self.sum = [np.zeros(s, dtype=np.float64) for s in shapes]
        self.min = [np.full(s, np.inf, dtype=np.float32) for s in shapes]
        self.max = [np.full(s, -np.inf, dtype=np.float32) for s in shapes]
        self.n_stills = 0

    def add(self, data: Sequence[np.ndarray], flags: Sequence[np.ndarray]) -> None:
        """Add one still; only pixels with no UNTRUSTED/OVERLOAD flag count."""
        bad_bits = np.uint8(MaskBit.UNTRUSTED | MaskBit.OVERLOAD)
        for i, d in enumerate(data):
            ok = (flags[i] & bad_bits) == 0
            d = np.asarray(d)
            self.n[i] += ok
            self.sum[i] += np.where(ok, d, 0.0)
            np.minimum(self.min[i], np.where(ok, d, np.inf).astype(np.float32), out=self.min[i])
            np.maximum(self.max[i], np.where(ok, d, -np.inf).astype(np.float32), out=self.max[i])
        self.n_stills += 1

    def hot_dead_flags(self, hot_factor: float = 5.0, hot_nsigma: float = 8.0,
                       dead_expected_counts: float = 20.0, size: int = 7) -> list[np.ndarray]:
        """HOT/DEAD flags per panel.

        hot: run minimum > ``hot_factor`` x local median of the run mean and above it by
        ``hot_nsigma`` Poisson sigmas; dead: run maximum is 0 while the local median of the mean
        predicts more than ``dead_expected_counts`` counts in total (P(all zero) < e^-20).
        """
        out = []
        for i in range(len(self.n)):
            n = self.n[i]
            seen = n > 0
            mean = np.where(seen, self.sum[i] / np.maximum(n, 1), np.nan)
            local = _nan_median_filter(mean, size)
            f = np.zeros(n.shape, dtype=np.uint8)
            loc = np.nan_to_num(local, nan=0.0)
            hot = seen & (self.min[i] > np.maximum(hot_factor * loc, loc + hot_nsigma * np.sqrt(np.maximum(loc, 1.0))))
            dead = seen & (self.max[i] <= 0) & (loc * n > dead_expected_counts)
            f[hot] |= MaskBit.HOT
            f[dead] |= MaskBit.DEAD
            out.append(f)
        return out


def _nan_median_filter(img: np.ndarray, size: int) -> np.ndarray:
    """Local median ignoring NaNs, computed on 2x2-binned data for speed then expanded back."""
    ny, nx = img.shape
    py, px = ny % 2, nx % 2
    padded = np.pad(img, ((0, py), (0, px)), constant_values=np.nan)
    with warnings.catch_warnings():  # all-NaN 2x2 blocks (gaps) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        binned = np.nanmean(padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2), axis=(1, 3))
    filled = np.where(np.isfinite(binned), binned, np.nanmedian(binned) if np.isfinite(binned).any() else 0.0)
    med = ndi.median_filter(filled, size=max(3, size // 2 | 1), mode="nearest")
    return np.repeat(np.repeat(med, 2, axis=0), 2, axis=1)[:ny, :nx]


# --------------------------------------------------------------------------- beamstop
@dataclass
class BeamstopResult:
    flags: list[np.ndarray]
    disk_pixels: int = 0
    arm_pixels: int = 0
    arm_azimuth_deg: float | None = None
    arm_half_width_mm: float | None = None
    azimuthal_profile: np.ndarray | None = None  # (phi_deg, relative dip) of the arm search
    perp_profile: np.ndarray | None = None  # relative dip across the arm (bins of one binned pixel)
    notes: list[str] = field(default_factory=list)


def detect_beamstop(data: Sequence[np.ndarray], geoms, s0, good: Sequence[np.ndarray], *,
                    weights: Sequence[np.ndarray] | None = None, binning: int | None = None,
                    ratio_threshold: float = 0.5, smooth_px: int = 1, centre_radius_mm: float = 15.0,
                    dilate_px: int = 1, detect_arm: bool = True, arm_min_depth: float = 0.06,
                    arm_nsigma: float = 6.0, arm_bin_deg: float = 1.0,
                    arm_baseline_deg: float = 20.0) -> BeamstopResult:
    """Auto-detect the beamstop shadow (and its arm); see ``_detect_beamstop_binned``.

    Works on ``binning`` x ``binning`` binned panels (mean of good pixels) for speed (default:
    4 for > 5 Mpixel, 2 for > 1.2 Mpixel, else 1); ``weights`` (e.g. the polarisation correction) multiply the data first so the
    expected intensity is azimuthally flat. Smoothing and dilation are in binned pixels.
    """
    if binning is None:  # ~>= 300k binned pixels keep the azimuthal statistics smooth
        npx = sum(np.asarray(d).size for d in data)
        binning = 4 if npx > 5e6 else 2 if npx > 1.2e6 else 1
    b = max(1, int(binning))
    bdata, bgood, bgeoms = [], [], []
    for i, (d, gd) in enumerate(zip(data, good)):
        if kernels.enabled():  # one pass: the same float32 products and float64 sums in the same order
            dd = np.ascontiguousarray(d, dtype=np.float32)
            w = np.ascontiguousarray(weights[i], dtype=np.float32) if weights is not None else dd
            shape = (-(-dd.shape[0] // b), -(-dd.shape[1] // b))
            s, n = np.empty(shape), np.empty(shape)
            kernels.bin_weighted(dd, w, weights is not None, np.ascontiguousarray(gd, dtype=bool), b, s, n)
        else:
            dd = np.asarray(d, dtype=np.float32)
            dd = dd * np.asarray(weights[i], dtype=np.float32) if weights is not None else dd.copy()
            dd[~gd] = 0.0
            s, n = _bin_sum(dd, b), _bin_count(gd, b)
        del dd
        bdata.append(s / np.maximum(n, 1.0))
        bgood.append(n >= 0.5 * b * b)
        bgeoms.append(_BinnedGeom(geoms[i], b, s.shape, np.shape(d)))
    res = _detect_beamstop_binned(bdata, bgeoms, s0, bgood, counts_per_unit=float(b * b), ratio_threshold=ratio_threshold,
                                  smooth_px=smooth_px, centre_radius_mm=centre_radius_mm,
                                  dilate_px=dilate_px, detect_arm=detect_arm, arm_min_depth=arm_min_depth,
                                  arm_nsigma=arm_nsigma, arm_bin_deg=arm_bin_deg,
                                  arm_baseline_deg=arm_baseline_deg)
    res.flags = [_expand(f, b, np.shape(data[i])) for i, f in enumerate(res.flags)]
    res.disk_pixels *= b * b
    res.arm_pixels *= b * b
    return res


def _dilate_cropped(mask: np.ndarray, k: int) -> np.ndarray:
    """``ndimage.binary_dilation(mask, iterations=k)`` computed on the mask's bounding box grown by ``k``
    (the rest stays False): the same result, on a few hundred pixels instead of the whole panel."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros(mask.shape, bool)
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = max(int(rows[0]) - k, 0), min(int(rows[-1]) + k + 1, mask.shape[0])
    x0, x1 = max(int(cols[0]) - k, 0), min(int(cols[-1]) + k + 1, mask.shape[1])
    out = np.zeros(mask.shape, bool)
    out[y0:y1, x0:x1] = ndi.binary_dilation(mask[y0:y1, x0:x1], iterations=k)
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndimage.binary_fill_holes`` (4-connected background) by one labelling instead of iterated dilation."""
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask.copy()
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return ~np.isin(lab, border[border > 0])


def _bin_sum(a: np.ndarray, b: int) -> np.ndarray:
    """Sums over b x b blocks (float64; partial blocks at the far edges sum what they have).

    Rows first (contiguous adds over b-times fewer rows), then strided columns: no padded copy.
    """
    if b == 1:
        return np.asarray(a, dtype=np.float64)
    ny, nx = a.shape
    rows = np.zeros((-(-ny // b), nx))
    for j in range(b):
        part = a[j::b]
        rows[:part.shape[0]] += part
    out = np.zeros((rows.shape[0], -(-nx // b)))
    for j in range(b):
        part = rows[:, j::b]
        out[:, :part.shape[1]] += part
    return out


def _bin_count(mask: np.ndarray, b: int) -> np.ndarray:
    """``_bin_sum`` of a boolean mask, counted in uint8 (exact while b * b <= 255; 8x less memory traffic)."""
    if b * b > 255:
        return _bin_sum(mask.view(np.uint8), b)
    m = np.asarray(mask, dtype=bool).view(np.uint8)
    ny, nx = m.shape
    rows = np.zeros((-(-ny // b), nx), np.uint8)
    for j in range(b):
        part = m[j::b]
        rows[:part.shape[0]] += part
    out = np.zeros((rows.shape[0], -(-nx // b)), np.uint8)
    for j in range(b):
        part = rows[:, j::b]
        out[:, :part.shape[1]] += part
    return out.astype(np.float64)


def _expand(f: np.ndarray, b: int, shape) -> np.ndarray:
    """Each binned pixel's value over its b x b block, cut to ``shape``."""
    ny, nx = shape
    if kernels.enabled() and f.dtype == np.uint8:
        full = np.empty((ny, nx), dtype=f.dtype)
        kernels.expand_blocks(np.ascontiguousarray(f), int(b), full)
        return full
    rows = np.take(f, np.arange(ny) // b, axis=0)  # (ny, nxb)
    full = np.empty((ny, nx), dtype=f.dtype)
    nxf = (nx // b) * b
    full[:, :nxf].reshape(ny, nx // b, b)[...] = rows[:, :nx // b, None]
    if nxf < nx:
        full[:, nxf:] = rows[:, nx // b, None]
    return full


class _BinnedGeom:
    """Lab coordinates at the centres of binned pixels.

    ``g``: a full-resolution ``PanelGeometry`` (sampled), or a ``PanelFrame`` (computed at those
    pixels only, same formulas, so the same values without the full-resolution arrays).
    """

    def __init__(self, g, b: int, shape, full_shape):
        ny, nx = full_shape
        iy = np.minimum(np.arange(shape[0]) * b + b // 2, ny - 1)
        ix = np.minimum(np.arange(shape[1]) * b + b // 2, nx - 1)
        if hasattr(g, "at"):  # a PanelFrame: compute at the binned centres only
            g = g.at(iy, ix)
            self.lab_x, self.lab_y, self.lab_z, self.dist = g.lab_x, g.lab_y, g.lab_z, g.dist
        else:
            sel = np.ix_(iy, ix)
            self.lab_x, self.lab_y, self.lab_z, self.dist = g.lab_x[sel], g.lab_y[sel], g.lab_z[sel], g.dist[sel]


#: a shadow pixel's box must expect at least this many counts, and fall short of them by this many Poisson sigma
BEAMSTOP_MIN_BOX_COUNTS = 40.0
BEAMSTOP_NSIGMA = 4.0
BEAMSTOP_MAX_BOX_PX = 41


def _detect_beamstop_binned(data: Sequence[np.ndarray], geoms, s0, good: Sequence[np.ndarray], *,
                            counts_per_unit: float = 1.0, ratio_threshold: float, smooth_px: int, centre_radius_mm: float,
                            dilate_px: int, detect_arm: bool, arm_min_depth: float,
                            arm_nsigma: float, arm_bin_deg: float, arm_baseline_deg: float) -> BeamstopResult:
    """Auto-detect the beamstop shadow (and its arm) in one image (or a run-average image).

    1. A radial profile (mean per 2theta bin after clipping bright outliers) gives the expected
       intensity; a masked-normalised box filter gives the local intensity.
    2. Shadow = local / expected < ``ratio_threshold`` and the box's counts below the expected ones by
       ``BEAMSTOP_NSIGMA`` Poisson sigma; connected regions reaching within ``centre_radius_mm`` (in the plane
       perpendicular to the beam) of the direct beam are the beamstop; dilated by ``dilate_px``. The box is
       (2 ``smooth_px`` + 1) pixels, widened until it expects ``BEAMSTOP_MIN_BOX_COUNTS`` counts near the beam
       (``counts_per_unit``: counts per unit of ``data``, e.g. b^2 for means of b x b bins). At a few photons
       per pixel a 3 x 3 box reads half its expected level by chance for a good fraction of the pixels, and
       those chance dips, connected, grew a "shadow" near the beam that was larger the lower the dose (no
       beamstop in rendered stills: 12-20 k pixels at dose 1, 28-45 k at 1/16).
    3. Arm: azimuthal profile of intensity / expected outside the beamstop; the deepest contiguous
       run of bins below ``-max(arm_min_depth, arm_nsigma * noise)`` relative to a running-median
       baseline gives the arm's direction; a profile across that direction gives its width; a
       strip of that width (plus 1.5 binned pixels) from the beam centre outwards is masked.
    """
    s0 = np.asarray(s0, dtype=float)
    s0_hat = s0 / np.linalg.norm(s0)
    e1 = np.cross(s0_hat, [0.0, 1.0, 0.0] if abs(s0_hat[1]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(s0_hat, e1)
    # radial coordinates per panel
    tth, rperp, phi, planar_a, planar_b = [], [], [], [], []
    for g in geoms:
        along = (g.lab_x * s0_hat[0] + g.lab_y * s0_hat[1] + g.lab_z * s0_hat[2])
        c = np.clip(along / g.dist, -1.0, 1.0)
        t = np.arccos(c).astype(np.float32)
        tth.append(t)
        a = g.lab_x * e1[0] + g.lab_y * e1[1] + g.lab_z * e1[2]
        b = g.lab_x * e2[0] + g.lab_y * e2[1] + g.lab_z * e2[2]
        rperp.append(np.hypot(a, b).astype(np.float32))
        phi.append(np.degrees(np.arctan2(b, a)).astype(np.float32))
        planar_a.append(a)
        planar_b.append(b)
    # radial profile
    all_t = np.concatenate([t[gd] for t, gd in zip(tth, good)])
    all_d = np.concatenate([np.asarray(d, dtype=np.float64)[gd] for d, gd in zip(data, good)])
    nb = 1000
    tmax = float(max(t.max() for t in tth)) * 1.0001 + 1e-9
    idx = np.minimum((all_t / tmax * nb).astype(np.int64), nb - 1)
    cnt = np.bincount(idx, minlength=nb)
    m1 = np.bincount(idx, all_d, minlength=nb) / np.maximum(cnt, 1)
    clip = 2.0 * m1 + 5.0
    dc = np.minimum(all_d, clip[idx])
    prof = np.bincount(idx, dc, minlength=nb) / np.maximum(cnt, 1)
    prof = ndi.uniform_filter1d(prof, 5)
    # A centred beamstop shadows *every* azimuth at small radii, so there the radial mean is the
    # shadow itself. Inside ``centre_radius_mm`` the expected level is therefore the maximum of the
    # profile from that radius out to the edge of the central zone (an inward running maximum).
    all_r = np.concatenate([r[gd] for r, gd in zip(rperp, good)])
    r_bin = np.bincount(idx, all_r, minlength=nb) / np.maximum(cnt, 1)
    central = (cnt > 0) & (r_bin < centre_radius_mm * 1.5)
    prof_disk = prof.copy()
    if central.any():
        last = int(np.flatnonzero(central).max())
        run_max = np.maximum.accumulate(np.where(cnt[:last + 1] > 0, prof[:last + 1], 0.0)[::-1])[::-1]
        prof_disk[:last + 1] = np.maximum(prof[:last + 1], run_max)
    del all_r
    del all_t, all_d, idx, dc
    out = [np.zeros(t.shape, dtype=np.uint8) for t in tth]
    res = BeamstopResult(out)
    arm_rows = []
    k = 2 * smooth_px + 1
    near_beam = (cnt > 0) & (r_bin < centre_radius_mm * 1.5)
    level = float(np.median(prof_disk[near_beam])) * counts_per_unit if near_beam.any() else 0.0
    if level > 0:  # widen the box until it expects enough counts for a Poisson-significant dip
        k = min(max(k, 2 * int(np.ceil(0.5 * (np.sqrt(BEAMSTOP_MIN_BOX_COUNTS / level) - 1))) + 1),
                BEAMSTOP_MAX_BOX_PX)
    res_box = k
    for i, (d, gd) in enumerate(zip(data, good)):
        pidx = np.minimum((tth[i] / tmax * nb).astype(np.int64), nb - 1)
        expected = prof[pidx]
        dcl = np.where(gd, np.minimum(np.asarray(d, dtype=np.float64), clip[pidx]), 0.0)
        w = ndi.uniform_filter(gd.astype(np.float32), k)
        local = ndi.uniform_filter(dcl.astype(np.float32), k) / np.maximum(w, 1e-6)
        ratio = np.where(w > 0.2, local / np.maximum(prof_disk[pidx], 1e-6), 1.0)
        n_box = (k * k * counts_per_unit) * w  # counts-units in the box (good pixels)
        exp_box = prof_disk[pidx] * n_box
        short = (exp_box - local * n_box) > BEAMSTOP_NSIGMA * np.sqrt(np.maximum(exp_box, 1.0))
        low = (ratio < ratio_threshold) & (w > 0.2) & short
        lab, nlab = ndi.label(low)
        if nlab:
            near = np.unique(lab[(rperp[i] < centre_radius_mm) & low])
            near = near[near > 0]
            if near.size:
                shadow = np.isin(lab, near)
                shadow = _fill_holes(shadow)
                # a beamstop is a disk: also cover a disk of the shadow's equivalent radius around
                # its centroid, so bright leaks at its rim (scatter round the stop) stay masked
                for lbl in near:
                    comp = lab == lbl
                    cy, cx = ndi.center_of_mass(comp)
                    r_eq = 1.15 * np.sqrt(comp.sum() / np.pi) + 1.0
                    yy, xx = np.ogrid[:comp.shape[0], :comp.shape[1]]
                    shadow |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r_eq * r_eq
                if dilate_px:
                    shadow = _dilate_cropped(shadow, dilate_px)
                out[i][shadow] |= MaskBit.BEAMSTOP
                res.disk_pixels += int(shadow.sum())
        arm_rows.append((i, dcl, expected, gd))
    res.notes.append(f"shadow test box {res_box} x {res_box} binned pixels")
    if not res.disk_pixels:
        res.notes.append("no beamstop shadow found near the direct beam")
    if detect_arm:
        r_bs = max((float(rperp[i][out[i] > 0].max()) for i in range(len(out)) if (out[i] > 0).any()),
                   default=0.0)
        nphi = int(round(360.0 / arm_bin_deg))
        num = np.zeros(nphi)
        den = np.zeros(nphi)
        for i, dcl, expected, gd in arm_rows:
            sel = gd & (rperp[i] > r_bs + 2.0) & (out[i] == 0) & (expected > 0)
            b = np.minimum(((phi[i][sel] + 180.0) / arm_bin_deg).astype(np.int64), nphi - 1)
            num += np.bincount(b, dcl[sel], minlength=nphi)
            den += np.bincount(b, expected[sel], minlength=nphi)
        ok = den > 0
        if ok.sum() > nphi // 2:
            prof_phi = np.where(ok, num / np.where(ok, den, 1.0), np.nan)
            filled = np.where(ok, prof_phi, np.nanmedian(prof_phi))
            nwin = max(3, int(round(arm_baseline_deg / arm_bin_deg)) | 1)
            base = ndi.median_filter(filled, size=nwin, mode="wrap")
            rel = filled / base - 1.0
            noise = 1.4826 * np.median(np.abs(rel[ok] - np.median(rel[ok])))
            thr = -max(arm_min_depth, arm_nsigma * noise)
            res.azimuthal_profile = np.stack([(np.arange(nphi) + 0.5) * arm_bin_deg - 180.0, rel])
            dip = ok & (rel < thr)
            if dip.any():
                centre = int(np.argmin(np.where(ok, rel, 0.0)))
                # grow the contiguous run around the deepest bin (wrapping), to half the threshold
                lo = hi = centre
                while ok[(lo - 1) % nphi] and rel[(lo - 1) % nphi] < thr / 2 and hi - lo < nphi // 4:
                    lo -= 1
                while ok[(hi + 1) % nphi] and rel[(hi + 1) % nphi] < thr / 2 and hi - lo < nphi // 4:
                    hi += 1
                phi_c = np.radians((0.5 * (lo + hi) + 0.5) * arm_bin_deg - 180.0)  # centre of the dip
                res.arm_azimuth_deg = float(np.degrees(phi_c))
                # width: profile across the arm direction (perpendicular distance, signed, in mm)
                ca, sa = np.cos(phi_c), np.sin(phi_c)
                # bin width: the (binned) pixel pitch in mm
                step = max(float(np.median([np.median(np.sqrt(np.diff(g.lab_x, axis=1) ** 2
                                                              + np.diff(g.lab_y, axis=1) ** 2
                                                              + np.diff(g.lab_z, axis=1) ** 2))
                                            if g.lab_x.shape[1] > 1 else 1.0 for g in geoms])), 1e-3)
                nperp = 201
                pn = np.zeros(nperp)
                pd = np.zeros(nperp)
                frames = {}  # (along, perp) per panel, for the strip below
                for i, dcl, expected, gd in arm_rows:
                    along = planar_a[i] * ca + planar_b[i] * sa
                    perp = -planar_a[i] * sa + planar_b[i] * ca
                    frames[i] = (along, perp)
                    sel = gd & (along > r_bs + 2.0) & (out[i] == 0) & (expected > 0) & (np.abs(perp) < step * nperp / 2)
                    k = np.clip(np.round(perp[sel] / step).astype(np.int64) + nperp // 2, 0, nperp - 1)
                    pn += np.bincount(k, dcl[sel], minlength=nperp)
                    pd += np.bincount(k, expected[sel], minlength=nperp)
                okp = pd > 0
                prel = np.where(okp, pn / np.where(okp, pd, 1.0), np.nan)
                kk = np.abs(np.arange(nperp) - nperp // 2)
                outer = prel[okp & (kk > 4)]
                base_p = float(np.median(outer)) if outer.size else 1.0
                prel = prel / base_p - 1.0
                c0 = nperp // 2
                lo_k = hi_k = c0
                while lo_k > 0 and okp[lo_k - 1] and prel[lo_k - 1] < thr / 2:
                    lo_k -= 1
                while hi_k < nperp - 1 and okp[hi_k + 1] and prel[hi_k + 1] < thr / 2:
                    hi_k += 1
                half_w = (max(c0 - lo_k, hi_k - c0) + 1.5) * step  # + margin of 1.5 binned pixels
                res.arm_half_width_mm = float(half_w)
                res.perp_profile = prel
                for i in range(len(out)):
                    along, perp = frames[i] if i in frames else (planar_a[i] * ca + planar_b[i] * sa,
                                                                 -planar_a[i] * sa + planar_b[i] * ca)
                    strip = (along > 0) & (np.abs(perp) <= half_w)
                    out[i][strip] |= MaskBit.BEAMSTOP
                    res.arm_pixels += int(strip.sum())
            else:
                res.notes.append("no beamstop arm found in the azimuthal profile")
    return res


# --------------------------------------------------------------------------- Bragg
def spot_radius_px(reflections=None, experiment=None, *, percentile: float = 90.0,
                   scale: float = 1.0, pad_px: float = 2.0, default_px: float = 4.0,
                   profile_nsigma: float = 3.0) -> float:
    """Bragg-mask disk radius (pixels) from the spot profile.

    From observed reflections: the ``percentile`` of half the larger bounding-box side.
    From a DIALS Gaussian profile model on the experiment (integrated data): ``profile_nsigma``
    x sigma_b projected at the detector distance. The larger estimate, x ``scale`` + ``pad_px``.
    """
    est = []
    if reflections is not None and len(reflections) and "bbox" in reflections:
        x0, x1, y0, y1, _, _ = (np.asarray(c) for c in reflections["bbox"].parts())
        half = 0.5 * np.maximum(x1 - x0, y1 - y0)
        est.append(float(np.percentile(half, percentile)))
    if experiment is not None and experiment.profile is not None and hasattr(experiment.profile, "sigma_b"):
        try:
            sb = np.radians(float(experiment.profile.sigma_b(deg=True)))
            p = experiment.detector[0]
            est.append(profile_nsigma * sb * abs(p.get_distance()) / p.get_pixel_size()[0])
        except Exception:  # a profile model without sigma_b
            pass
    r = max(est) if est else default_px
    return float(r * scale + pad_px)


#: DIALS' stills prediction keeps reflections with |delta psi| below this (rad), see
#: ``StillsDeltaPsiReflectionPredictor::for_ub`` in dials/algorithms/spot_prediction.
DIALS_STILLS_DELPSI_MAX = 0.0015


def _miller_flex(hkl: np.ndarray):
    """A cctbx ``flex.miller_index`` from an (n, 3) integer array (no per-row Python objects)."""
    # cctbx/dxtbx (DIALS, ~1 s): only Bragg prediction needs them, not the CLI's start
    from cctbx.array_family import flex as cflex
    from dxtbx import flumpy

    cols = [flumpy.from_numpy(np.ascontiguousarray(hkl[:, j], dtype=np.int32)) for j in range(3)]
    return cflex.miller_index(*cols)


def candidate_indices(experiment, d_min: float, delpsi_max: float = DIALS_STILLS_DELPSI_MAX,
                      margin: float = 2.0) -> np.ndarray:
    """Non-absent Miller indices within ``d_min`` that lie near the Ewald sphere (numpy prefilter).

    A rotation by ``delta psi`` moves a relp by at most ``|q| delta psi``, so its excitation error
    ``| |s0 + q| - |s0| |`` is at most that: keeping ``margin`` x this bound is a superset of
    DIALS' ``|delta psi| < delpsi_max`` selection.

    For each (h, k), ``G(l) = |q + s0|^2 - |s0|^2`` is a quadratic in l, so the l values whose
    excitation error can pass (|error| <= tau = margin x delpsi_max / d_min) form at most two
    intervals, found from the roots; only those (h, k, l) are tested exactly, in the order
    (l, h, k).
    """
    # cctbx (~1 s): only Bragg prediction needs it
    from cctbx import crystal as cr_mod
    from cctbx import miller

    cryst = experiment.crystal
    A = np.asarray(cryst.get_A(), dtype=float).reshape(3, 3)
    s0 = np.asarray(experiment.beam.get_s0(), dtype=float)
    uc = cryst.get_unit_cell()
    a_, b_, c_ = uc.parameters()[:3]
    hm, km, lm = (int(np.floor(x / d_min)) + 1 for x in (a_, b_, c_))
    h, k = np.meshgrid(np.arange(-hm, hm + 1), np.arange(-km, km + 1), indexing="ij")
    h, k = h.ravel(), k.ravel()
    s0n = np.linalg.norm(s0)
    q0 = A[:, 0:1] * h + A[:, 1:2] * k  # (3, N): the l = 0 part
    cs = A[:, 2]
    qa = float(cs @ cs)
    qb = 2.0 * (cs @ (q0 + s0[:, None]))
    qc = (q0 * q0).sum(0) + 2.0 * (s0 @ q0)
    tau = margin * delpsi_max / d_min + 1e-12
    g_hi = (s0n + tau) ** 2 - s0n ** 2
    g_lo = (s0n - tau) ** 2 - s0n ** 2
    slack = 1e-6
    with np.errstate(invalid="ignore"):
        r_out = np.sqrt(qb * qb - 4.0 * qa * (qc - g_hi))  # G <= g_hi between these roots
        r_in = np.sqrt(qb * qb - 4.0 * qa * (qc - g_lo))  # G >= g_lo outside these roots
    l1, l2 = (-qb - r_out) / (2 * qa), (-qb + r_out) / (2 * qa)
    m1, m2 = (-qb - r_in) / (2 * qa), (-qb + r_in) / (2 * qa)
    has = np.isfinite(l1)
    inner = np.isfinite(m1)
    # intervals [l1, m1] and [m2, l2] (or [l1, l2] without inner roots), clipped to |l| <= lm
    lo = np.concatenate([l1, np.where(inner, m2, np.nan)])
    hi = np.concatenate([np.where(inner, m1, l2), np.where(inner, l2, np.nan)])
    ok = np.concatenate([has, has & inner])
    lo = np.clip(np.ceil(np.where(ok, lo, 0.0) - slack), -lm, lm + 1).astype(np.int64)
    hi = np.clip(np.floor(np.where(ok, hi, -1.0) + slack), -lm - 1, lm).astype(np.int64)
    cnt = np.where(ok, np.maximum(hi - lo + 1, 0), 0)
    pair = np.tile(np.arange(h.size), 2)
    if cnt.sum() == 0:
        return np.zeros((0, 3), dtype=np.int64)
    rep = np.repeat(pair, cnt)
    start = np.repeat(lo, cnt)
    step = np.arange(rep.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    hkl = np.stack([h[rep], k[rep], start + step])
    hkl = hkl[:, np.unique(hkl[2] * (h.size * 4) + rep * 2, return_index=True)[1]]  # unique, sorted by (l, h, k)
    q = A @ hkl
    qn = np.sqrt((q * q).sum(0))
    exc = np.abs(np.sqrt(((q + s0[:, None]) ** 2).sum(0)) - s0n)
    sel = (qn > 0) & (qn <= 1.0 / d_min) & (exc <= margin * delpsi_max * qn + 1e-12)
    hkl = hkl[:, sel].T.astype(np.int64)
    if len(hkl) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    absent = sys_absent(cryst.get_space_group(), hkl)
    if absent is None:  # a setting with fractional rotation parts: cctbx's own test
        sym = cr_mod.symmetry(unit_cell=uc, space_group=cryst.get_space_group())
        absent = np.asarray(miller.set(sym, _miller_flex(hkl), anomalous_flag=True).sys_absent_flags().data(),
                            dtype=bool)
    return hkl[~absent]


def sys_absent(space_group, hkl: np.ndarray) -> np.ndarray | None:
    """Systematic absences of the (n, 3) integer indices ``hkl`` in a cctbx ``space_group``, as cctbx's
    ``sys_absent_flags``: h is absent when some operation (R, t) of the group (centring and inversion included)
    maps it onto itself (h R = h) with a phase shift h.t that is not a whole turn. Vectorised over the indices
    (~10x less CPU than cctbx's per-index loop behind a flex array); None when a rotation part is fractional
    (then ask cctbx). The tests compare it with cctbx in all 230 space groups."""
    hkl = np.asarray(hkl, dtype=np.int64).reshape(-1, 3)
    absent = np.zeros(len(hkl), dtype=bool)
    for op in space_group.all_ops():
        r, t = op.r(), op.t()
        if r.den() != 1:
            return None
        R = np.asarray(r.num(), dtype=np.int64).reshape(3, 3)
        tn = np.asarray(t.num(), dtype=np.int64)
        if not tn.any():
            continue  # no phase shift: cannot make anything absent
        fixed = hkl @ R == hkl
        absent |= fixed.all(axis=1) & ((hkl @ tn) % int(t.den()) != 0)
    return absent


def predict_reflections(experiment, d_min: float | None = None,
                        delpsi_max: float = DIALS_STILLS_DELPSI_MAX, candidates: np.ndarray | None = None):
    """DIALS' stills prediction for the still's crystal model: (panel, x_px, y_px, miller) arrays.

    Same selection as DIALS' ``StillsReflectionPredictor(...).for_ub(A)`` (|delta psi| < 0.0015 rad
    by default), but DIALS predicts only a numpy-prefiltered candidate list instead of every index
    within ``d_min``, which is ~20x faster; ``delpsi_max`` may widen the selection.
    """
    # DIALS (~1.5 s): only Bragg prediction needs it
    from dials.algorithms.spot_prediction import StillsReflectionPredictor
    from dials.array_family import flex

    if d_min is None:
        d_min = experiment.detector.get_max_resolution(experiment.beam.get_s0())
    cand = candidate_indices(experiment, d_min, delpsi_max) if candidates is None else candidates
    empty = (np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros((0, 3), int))
    if len(cand) == 0:
        return empty
    predictor = StillsReflectionPredictor(experiment, dmin=d_min)
    table = predictor(_miller_flex(cand))
    if len(table) == 0:
        return empty
    from dxtbx import flumpy  # flex -> numpy without a Python object per element

    delpsi = np.abs(flumpy.to_numpy(table["delpsical.rad"]))
    xyz = flumpy.to_numpy(table["xyzcal.px"])
    x, y = xyz[:, 0].copy(), xyz[:, 1].copy()
    panel = flumpy.to_numpy(table["panel"]).astype(np.int64)
    hkl = flumpy.to_numpy(table["miller_index"].as_vec3_double()).astype(np.int64).reshape(-1, 3)
    sel = delpsi < delpsi_max
    return panel[sel], x[sel], y[sel], hkl[sel]


def _is_rotation(experiment) -> bool:
    """Rotation data: a goniometer and a scan whose oscillation width is not 0 (as ``extract.rotation_goniometer``)."""
    scan, gonio = experiment.scan, experiment.goniometer
    return gonio is not None and scan is not None and scan.get_oscillation()[1] != 0


def rotation_pad_deg(experiment, delpsi_max: float = DIALS_STILLS_DELPSI_MAX) -> float:
    """How far (deg) beyond a rotation frame's oscillation a reflection's diffraction angle may lie and its spot
    still reach the frame: the largest of ``delpsi_max`` (as degrees), one oscillation width (a spot spreads over
    neighbouring frames) and 3 sigma_m of the experiment's profile model when it has one (DIALS' mosaicity)."""
    pad = max(float(np.degrees(delpsi_max)), abs(float(experiment.scan.get_oscillation()[1])))
    prof = getattr(experiment, "profile", None)
    if prof is not None and hasattr(prof, "sigma_m"):
        try:
            pad = max(pad, 3.0 * float(prof.sigma_m(deg=True)))
        except Exception:  # noqa: BLE001 - a profile model without sigma_m
            pass
    return pad


def _spots_of_frames(reflections, array_range):
    """The observed spots of a sweep's table that reach the frames ``array_range`` (array indices [a0, a1)): by
    their bounding box in z, else by the z of their centroid (within one frame)."""
    from dials.array_family import flex  # DIALS (~1.5 s): only a sweep's observed spots need it

    a0, a1 = array_range
    if "bbox" in reflections:
        _, _, _, _, z0, z1 = (np.asarray(c) for c in reflections["bbox"].parts())
        keep = (z0 < a1) & (z1 > a0)
    elif "xyzobs.px.value" in reflections:
        z = np.asarray(reflections["xyzobs.px.value"].parts()[2])
        keep = (z > a0 - 1) & (z < a1 + 1)
    else:
        return reflections
    return reflections.select(flex.bool(keep.tolist()))


def predict_rotation(experiment, d_min: float | None = None, pad_deg: float = 0.0):
    """DIALS' rotation prediction for the experiment's scan (e.g. one frame): (panel, x_px, y_px, miller) of the
    reflections whose diffraction angle lies within the scan's oscillation range widened by ``pad_deg`` on
    each side (``ScanStaticReflectionPredictor(..., padding=pad_deg).for_ub(A)``, A at the goniometer datum),
    systematic absences of the crystal's space group removed."""
    # DIALS (~1.5 s): only Bragg prediction on a rotation frame needs it
    from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor
    from dials.array_family import flex  # noqa: F401 - registers the reflection_table converters the predictor returns

    if d_min is None:
        d_min = experiment.detector.get_max_resolution(experiment.beam.get_s0())
    predictor = ScanStaticReflectionPredictor(experiment, dmin=d_min, padding=pad_deg)
    table = predictor.for_ub(experiment.crystal.get_A())
    empty = (np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros((0, 3), int))
    if len(table) == 0:
        return empty
    absent = np.asarray(experiment.crystal.get_space_group().is_sys_absent(table["miller_index"]), dtype=bool)
    x, y, _ = (np.asarray(c) for c in table["xyzcal.px"].parts())
    panel = np.asarray(table["panel"], dtype=np.int64)
    hkl = np.asarray(table["miller_index"].as_vec3_double(), dtype=np.int64).reshape(-1, 3)
    keep = ~absent
    return panel[keep], x[keep], y[keep], hkl[keep]


def project_near_edges(experiment, hkl: np.ndarray, margin_px: float, delpsi_max: float = DIALS_STILLS_DELPSI_MAX):
    """Spots whose centre lies just *off* a panel (within ``margin_px``) but whose tails reach it.

    DIALS only reports predictions that hit a panel; a peak centred in a module gap still spills
    onto the neighbouring pixels. Here the diffracted ray of each near-Ewald candidate
    (``|eps| / |q| < delpsi_max``) is intersected with every panel plane (no parallax: the mask
    radius has padding). Returns (panel, x_px, y_px) of those landing in the margin band.
    """
    if len(hkl) == 0:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    A = np.asarray(experiment.crystal.get_A(), dtype=float).reshape(3, 3)
    s0 = np.asarray(experiment.beam.get_s0(), dtype=float)
    q = hkl @ A.T
    qn = np.linalg.norm(q, axis=1)
    s1 = q + s0
    eps = np.linalg.norm(s1, axis=1) - np.linalg.norm(s0)
    keep = np.abs(eps) < delpsi_max * qn
    s1 = s1[keep]
    out_p, out_x, out_y = [], [], []
    for ip, panel in enumerate(experiment.detector):
        D = np.asarray(panel.get_D_matrix(), dtype=float).reshape(3, 3)
        v = s1 @ D.T
        front = v[:, 2] > 0
        if not front.any():
            continue
        xm = v[front, 0] / v[front, 2]
        ym = v[front, 1] / v[front, 2]
        psx, psy = panel.get_pixel_size()
        nx, ny = panel.get_image_size()
        x, y = xm / psx, ym / psy
        on = (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
        near = ~on & (x > -margin_px) & (x < nx + margin_px) & (y > -margin_px) & (y < ny + margin_px)
        out_p.append(np.full(int(near.sum()), ip))
        out_x.append(x[near])
        out_y.append(y[near])
    if not out_p:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    return np.concatenate(out_p), np.concatenate(out_x), np.concatenate(out_y)


def paint_disks(flags: list[np.ndarray], panel: np.ndarray, x: np.ndarray, y: np.ndarray,
                radius: float, bit: int) -> int:
    """Set ``bit`` on every pixel whose centre is within ``radius`` px of a spot centre."""
    r = int(np.ceil(radius))
    oy, ox = np.mgrid[-r - 1:r + 2, -r - 1:r + 2]
    n = 0
    fused = mask_kernels.enabled()
    for p in np.unique(panel):
        sel = panel == p
        f = flags[int(p)]
        if fused and f.flags.c_contiguous:
            mask_kernels.paint_disks_panel(f, np.ascontiguousarray(x[sel], dtype=np.float64),
                                           np.ascontiguousarray(y[sel], dtype=np.float64), r, float(radius),
                                           np.uint8(bit))
            n += int(sel.sum())
            continue
        ny, nx = f.shape
        cx = x[sel]
        cy = y[sel]
        px = np.floor(cx)[:, None] + ox.ravel()[None, :]
        py = np.floor(cy)[:, None] + oy.ravel()[None, :]
        inside = ((px + 0.5 - cx[:, None]) ** 2 + (py + 0.5 - cy[:, None]) ** 2) <= radius * radius
        inside &= (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        f[py[inside].astype(np.intp), px[inside].astype(np.intp)] |= np.uint8(bit)
        n += int(sel.sum())
    return n


def bragg_flags(experiment, detector_flags_shape_source, reflections=None, *, radius_px: float | None = None,
                d_min: float | None = None, bbox_pad_px: int = 2,
                delpsi_max: float = DIALS_STILLS_DELPSI_MAX) -> tuple[list[np.ndarray], dict]:
    """BRAGG flags of one still: disks at DIALS-predicted positions + observed spot boxes.

    ``delpsi_max`` (rad) widens DIALS' stills prediction window (0.0015 rad) to catch the weak
    partials of real mosaic crystals that neither DIALS' default prediction nor spot finding see.
    Rotation frames (scan with an oscillation, e.g. one frame of a sweep) are predicted as rotation
    data instead (:func:`predict_rotation`): the reflections that cross the Ewald sphere during the
    frame's oscillation, widened by ``delpsi_max`` (as degrees) on each side.

    ``reflections`` (optional DIALS table for this still): observed spots are masked as their
    bounding boxes grown by ``bbox_pad_px`` (or disks at ``xyzobs.px.value`` without bboxes).
    """
    flags = empty_flags(detector_flags_shape_source)
    radius = radius_px if radius_px is not None else spot_radius_px(reflections, experiment)
    info = {"bragg_radius_px": radius, "n_predicted": 0, "n_observed": 0}
    rotation = _is_rotation(experiment)
    if experiment.crystal is not None and rotation:
        dm = d_min or experiment.detector.get_max_resolution(experiment.beam.get_s0())
        pad = rotation_pad_deg(experiment, delpsi_max)
        panel, x, y, _ = predict_rotation(experiment, dm, pad_deg=pad)
        info["n_predicted"] = paint_disks(flags, panel, x, y, radius, MaskBit.BRAGG)
        info["prediction"] = f"rotation (DIALS ScanStaticReflectionPredictor over the frame's oscillation +- {pad:.3g} deg)"
    elif experiment.crystal is not None:
        dm = d_min or experiment.detector.get_max_resolution(experiment.beam.get_s0())
        cand = candidate_indices(experiment, dm, delpsi_max)
        panel, x, y, _ = predict_reflections(experiment, dm, delpsi_max, candidates=cand)
        info["n_predicted"] = paint_disks(flags, panel, x, y, radius, MaskBit.BRAGG)
        ep, ex, ey = project_near_edges(experiment, cand, radius, delpsi_max)
        info["n_predicted_off_edge"] = paint_disks(flags, ep, ex, ey, radius, MaskBit.BRAGG)
    if reflections is not None and len(reflections) and rotation:
        reflections = _spots_of_frames(reflections, experiment.scan.get_array_range())
    if reflections is not None and len(reflections):
        rp = np.asarray(reflections["panel"], dtype=np.int64)
        if "bbox" in reflections:
            x0, x1, y0, y1, _, _ = (np.asarray(c, dtype=np.int64) for c in reflections["bbox"].parts())
            for j in range(len(rp)):
                f = flags[rp[j]]
                f[max(y0[j] - bbox_pad_px, 0):max(y1[j] + bbox_pad_px, 0),
                  max(x0[j] - bbox_pad_px, 0):max(x1[j] + bbox_pad_px, 0)] |= MaskBit.BRAGG
        elif "xyzobs.px.value" in reflections:
            ox, oy, _ = (np.asarray(c) for c in reflections["xyzobs.px.value"].parts())
            paint_disks(flags, rp, ox, oy, radius, MaskBit.BRAGG)
        info["n_observed"] = int(len(rp))
    return flags, info


def outlier_flags(data: Sequence[np.ndarray], flags: Sequence[np.ndarray], radial_bin: Sequence[np.ndarray],
                  weights: Sequence[np.ndarray] | None = None, *, nsigma: float = 8.0, grow_px: float = 2.0,
                  gain: float = 1.0) -> tuple[list[np.ndarray], int]:
    """BRAGG flags for isolated bright pixels that prediction and spot finding missed (weak partials,
    a second lattice, ice), grown by ``grow_px``.

    A pixel is an outlier if its (polarisation-flattened) value exceeds the mean of its |q| shell
    (over unflagged pixels, bright values clipped) by ``nsigma`` Poisson sigmas.
    One pass of weighted ``bincount`` per panel (flagged pixels weigh 0), float32 values.
    """
    nb = int(max(int(r.max()) for r in radial_bin)) + 1
    if kernels.enabled():
        return _outlier_flags_fused(data, flags, radial_bin, weights, nb, nsigma, grow_px, gain)
    num = np.zeros(nb)
    cnt = np.zeros(nb)
    vals = []
    for i, d in enumerate(data):
        npx = np.size(d)
        v = WORKSPACE.get(f"outlier.v{i}", npx, np.float32)
        if weights is not None:
            np.multiply(np.asarray(d, dtype=np.float32).ravel(), np.asarray(weights[i], dtype=np.float32).ravel(),
                        out=v)
        else:
            v[:] = np.asarray(d, dtype=np.float32).ravel()
        ok = flags[i].ravel() == 0
        b = radial_bin[i].ravel()
        w = WORKSPACE.get("outlier.w", npx, np.float64)  # float64 weights: bincount's own type, no copy
        np.copyto(w, ok)
        cnt += np.bincount(b, w, minlength=nb)
        w[:] = v
        np.copyto(w, 0.0, where=~ok)
        num += np.bincount(b, w, minlength=nb)
        del w
        vals.append((v, ok, b))
    mean = num / np.maximum(cnt, 1)
    thr = mean + nsigma * np.sqrt(gain * np.maximum(mean, 1.0))
    out = [np.zeros(f.shape, np.uint8) for f in flags]
    n = 0
    for i, (v, ok, b) in enumerate(vals):
        t = np.take(thr, b, out=WORKSPACE.get("outlier.w", v.size, np.float64), mode="clip")
        above = np.greater(v, t)
        del t
        above &= ok
        hit = local_outliers(v, None, ok, flags[i].shape, np.flatnonzero(above), nsigma, gain)
        if hit.size:
            y, x = np.divmod(hit, flags[i].shape[1])
            paint_disks(out, np.full(hit.size, i), x + 0.5, y + 0.5, grow_px, MaskBit.BRAGG)
            n += int(hit.size)
    return out, n


#: half-widths (pixels) of the box around a candidate outlier and of its excluded core: the local level is the mean
#: of the unflagged pixels in the box minus the core
LOCAL_BOX_PX = 5
LOCAL_CORE_PX = 1


def local_outliers(values: np.ndarray, weights: np.ndarray | None, ok: np.ndarray, shape: tuple[int, int],
                   candidates: np.ndarray, nsigma: float, gain: float, box: int = LOCAL_BOX_PX,
                   core: int = LOCAL_CORE_PX) -> np.ndarray:
    """The candidates (flat indices above their |q| shell's threshold) that also stand ``nsigma`` Poisson sigmas
    above their own neighbourhood (a (2 box + 1)^2 square without its (2 core + 1)^2 centre, unflagged pixels).

    Broad features (diffuse halos several pixels wide) rise with their surroundings and are kept as data; small
    bright spots (unpredicted partials, zingers, a second lattice) do not, and are masked. Without this second
    test the masked fraction of a halo's centre grew with the still's brightness, so brighter stills lost more of
    their strongest diffuse pixels and came out with lower scales.
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        return candidates
    ny, nx = shape
    raw = np.asarray(values).reshape(ny, nx)
    wts = None if weights is None else np.asarray(weights).reshape(ny, nx)
    good = np.asarray(ok, dtype=bool).reshape(ny, nx)

    def vals(yy, xx):  # the (polarisation-flattened) value, as the shell test saw it
        v = raw[yy, xx].astype(np.float32)
        return v * wts[yy, xx] if wts is not None else v

    cy, cx = np.divmod(candidates, nx)
    d = np.arange(-box, box + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    ring = (np.abs(dy) > core) | (np.abs(dx) > core)
    dy, dx = dy[ring], dx[ring]
    keep = np.empty(candidates.size, dtype=bool)
    step = 4096  # candidates per block: bounded temporaries
    for a in range(0, candidates.size, step):
        yy = cy[a:a + step, None] + dy[None, :]
        xx = cx[a:a + step, None] + dx[None, :]
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy = np.clip(yy, 0, ny - 1)
        xx = np.clip(xx, 0, nx - 1)
        use = inside & good[yy, xx]
        n = use.sum(axis=1)
        level = np.where(use, vals(yy, xx), 0.0).sum(axis=1) / np.maximum(n, 1)
        thr = level + nsigma * np.sqrt(gain * np.maximum(level, 1.0))
        keep[a:a + step] = (n == 0) | (vals(cy[a:a + step], cx[a:a + step]) > thr)
    return candidates[keep]


def _outlier_flags_fused(data, flags, radial_bin, weights, nb, nsigma, grow_px, gain):
    """``outlier_flags`` with the shell sums and the threshold test as one pass each per panel
    (``kernels.shell_sums`` / ``shell_outliers``): the same sums in the same order, the same flags."""
    num = np.zeros(nb)
    cnt = np.zeros(nb)
    args = []
    for i, d in enumerate(data):
        dd = np.ascontiguousarray(d, dtype=np.float32).ravel()
        has_w = weights is not None
        w = np.ascontiguousarray(weights[i], dtype=np.float32).ravel() if has_w else dd[:1]
        f = np.ascontiguousarray(flags[i]).ravel()
        b = np.ascontiguousarray(radial_bin[i]).ravel()
        c_i, n_i = np.zeros(nb), np.zeros(nb)
        kernels.shell_sums(dd, w, has_w, f, b, c_i, n_i)
        cnt += c_i
        num += n_i
        args.append((dd, w, has_w, f, b))
    mean = num / np.maximum(cnt, 1)
    thr = mean + nsigma * np.sqrt(gain * np.maximum(mean, 1.0))
    out = [np.zeros(f.shape, np.uint8) for f in flags]
    n = 0
    for i, (dd, w, has_w, f, b) in enumerate(args):
        hits = np.empty(max(1, dd.size // 64), np.int64)
        m = kernels.shell_outliers(dd, w, has_w, f, b, thr, hits)
        if m > hits.size:  # more than 1/64 of the pixels: count first, then collect
            hits = np.empty(m, np.int64)
            kernels.shell_outliers(dd, w, has_w, f, b, thr, hits)
        hit = local_outliers(dd, w if has_w else None, f == 0 if m else f, flags[i].shape, hits[:m], nsigma, gain)
        if hit.size:
            y, x = np.divmod(hit, flags[i].shape[1])
            paint_disks(out, np.full(hit.size, i), x + 0.5, y + 0.5, grow_px, MaskBit.BRAGG)
            n += int(hit.size)
    return out, n


def combine(*flag_sets: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Bitwise OR of several per-panel flag lists."""
    out = [np.array(f, dtype=np.uint8, copy=True) for f in flag_sets[0]]
    for fs in flag_sets[1:]:
        for i, f in enumerate(fs):
            out[i] |= f
    return out
