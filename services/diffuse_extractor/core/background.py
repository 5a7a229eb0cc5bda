"""Background estimates: from background-only frames, or per still as a smooth isotropic B(|q|).

Two ways to know the background under a diffuse still:

- **Background frames** (:func:`estimate_background`): frames taken without the crystal in the same
  geometry (the usual practice at beamlines, and mdx2's). Their counts are summed per pixel over
  the good frames (module gaps, untrusted/overloaded pixels, beamstop, per-frame outliers and
  hot pixels excluded), binned ``bin_px`` x ``bin_px``, smoothed with a mask-aware normalised
  Gaussian convolution on the bin grid (bins with no good pixel take their nearest good
  neighbour's value) and interpolated back to every pixel (bilinear between bin centres). The
  result is the mean background counts (ADU) per frame at the frames' exposure and its variance
  (Poisson variance of the summed counts through the same linear smoothing; the bilinear
  interpolation of variances makes it a slight overestimate). The extractor scales it to each
  still by the ratio of exposure time x transmission and subtracts it per pixel.
- **Isotropic per-still estimate** (:func:`isotropic_profile`): without background frames, a smooth
  B(|q|) fitted to the still's own Bragg-free, unmasked pixels in corrected intensity units: per
  narrow |q| shell an iteratively 3-sigma-clipped mean (sigma from the Poisson model of the shell
  mean, so bright anisotropic features and residual peaks are rejected while the counting noise
  is not biased), then smoothed along |q|. Always computed and reported; subtracted only when asked.
  **Limitation**: it cannot tell an isotropic background from the isotropic part of the diffuse
  signal (e.g. liquid-like or Compton-like scattering of the crystal itself): subtracting it also
  removes the diffuse signal's isotropic component, and in shells where anisotropic diffuse
  covers most of the azimuth it tends towards the lower envelope of the signal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.ndimage import correlate1d, distance_transform_edt, gaussian_filter1d  # loaded by .masks already (the extractor's masks)

from . import kernels
from .errors import InputError


# --------------------------------------------------------------------------- isotropic B(|q|)
@dataclass
class IsotropicProfile:
    """B(|q|) per shell: centres (1/angstrom), B and its standard error (corrected intensity units)."""

    q: np.ndarray
    b: np.ndarray  # NaN where a shell had too few pixels
    sigma: np.ndarray
    n_pixels: np.ndarray  # pixels kept (after clipping) per shell, in the sample used
    stride: int
    clip_nsigma: float

    def at(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """B and its variance interpolated at |q| (float32), constant beyond the first/last good shell."""
        ok = np.isfinite(self.b)
        if not ok.any():
            z = np.zeros(np.shape(q), np.float32)
            return z, z.copy()
        b = np.interp(q, self.q[ok], self.b[ok]).astype(np.float32)
        v = np.interp(q, self.q[ok], self.sigma[ok] ** 2).astype(np.float32)
        return b, v

    def summary(self) -> dict:
        ok = np.isfinite(self.b)
        return {"method": "per-|q|-shell clipped mean of the unmasked pixels, smoothed (reported, subtracted "
                          "only with background='isotropic')",
                "n_shells": int(self.q.size), "n_shells_fitted": int(ok.sum()), "pixel_stride": int(self.stride),
                "clip_nsigma": float(self.clip_nsigma),
                "q_range": [float(self.q[ok].min()), float(self.q[ok].max())] if ok.any() else None,
                "b_min": float(np.nanmin(self.b)) if ok.any() else None,
                "b_median": float(np.nanmedian(self.b)) if ok.any() else None,
                "b_max": float(np.nanmax(self.b)) if ok.any() else None}

    def as_array(self) -> np.ndarray:
        """(n_shells, 3): q centre, B, sigma(B) (the ``/entry/background_profile`` dataset)."""
        return np.stack([self.q, self.b, self.sigma], axis=1)


def isotropic_profile(q: np.ndarray, intensity: np.ndarray, exposure: np.ndarray, *, gain: float = 1.0,
                      n_shells: int | None = None, max_sample: int = 262_144, clip_nsigma: float = 2.5,
                      clip_low_nsigma: float = 4.0,
                      iterations: int = 6, smooth_shells: float = 1.0, min_pixels: int = 20) -> IsotropicProfile:
    """Fit B(|q|) to a still's unmasked pixels (table columns ``q``, ``intensity``, ``exposure``).

    Pixels are sampled with a stride so that at most ``max_sample`` are used (~1000 per shell on a
    6M detector). Per shell of |q| (``n_shells`` equal widths between the smallest and largest |q|;
    default from the sample size, 32..256), starting from the shell mean, ``iterations`` times: in
    photons, a pixel expects lambda = B e / gain (e = exposure = 1/correction); keep it when its
    photons x lie within [lambda - clip_low_nsigma sqrt(lambda), lambda + clip_nsigma sqrt(lambda)],
    and set B = (mean of the kept intensities) / f, where f = E[X | X <= C] / lambda for a Poisson
    X of the shell's mean lambda and its cut C = floor(lambda + clip_nsigma sqrt(lambda)) (exactly
    P(X <= C - 1) / P(X <= C)): cutting the upper tail would otherwise bias B low at a few photons.
    The shell values are then smoothed along |q| with a Gaussian of ``smooth_shells`` shells
    (weighted by the pixel counts).
    """
    n = int(np.shape(q)[0])
    stride = max(1, -(-n // max_sample))
    qs = np.asarray(q[::stride], dtype=np.float64)
    I = np.asarray(intensity[::stride], dtype=np.float64)
    e = np.asarray(exposure[::stride], dtype=np.float64)
    ok = np.isfinite(qs) & np.isfinite(I) & np.isfinite(e) & (e > 0)
    if not ok.all():
        qs, I, e = qs[ok], I[ok], e[ok]
    m = qs.size
    if n_shells is None:
        n_shells = int(np.clip(m // 1000, 32, 256))
    if m == 0:
        nan = np.full(n_shells, np.nan)
        return IsotropicProfile(nan.copy(), nan, nan.copy(), np.zeros(n_shells, np.int64), stride, clip_nsigma)
    lo, hi = float(qs.min()), float(qs.max())
    width = (hi - lo) / n_shells if hi > lo else 1.0
    b = np.minimum(((qs - lo) / width).astype(np.int64), n_shells - 1)
    cnt = np.bincount(b, minlength=n_shells).astype(np.float64)
    mean = np.bincount(b, I, minlength=n_shells) / np.maximum(cnt, 1)
    from scipy.stats import poisson  # scipy.stats (~0.3 s): only this truncation correction needs it

    g = float(gain)
    keep = np.ones(m, bool)
    ep = e / g  # photons per unit intensity
    x = I * ep  # photons
    fused = kernels.enabled()
    for _ in range(iterations):
        if fused:  # one pass instead of ~10 array operations (same sums, same order)
            cnt, s_i, s_ep = np.zeros(n_shells), np.zeros(n_shells), np.zeros(n_shells)
            kernels.shell_clip_sums(mean, b, x, ep, I, float(clip_nsigma), float(-clip_low_nsigma), keep, cnt, s_i,
                                    s_ep)
        else:
            lam = np.maximum(mean[b], 0.0) * ep
            root = np.sqrt(np.maximum(lam, 1.0))
            d = x - lam
            keep = (d <= clip_nsigma * root) & (d >= -clip_low_nsigma * root)
            cnt = np.bincount(b, keep, minlength=n_shells).astype(np.float64)
            s_i = np.bincount(b, np.where(keep, I, 0.0), minlength=n_shells)
            s_ep = np.bincount(b, np.where(keep, ep, 0.0), minlength=n_shells)
        kept_mean = s_i / np.maximum(cnt, 1)
        lam_shell = np.maximum(mean, 0.0) * s_ep / np.maximum(cnt, 1)
        cut = np.floor(lam_shell + clip_nsigma * np.sqrt(np.maximum(lam_shell, 1.0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            f = poisson.cdf(cut - 1, lam_shell) / poisson.cdf(cut, lam_shell)
        f = np.where(np.isfinite(f) & (f > 0.5), f, 1.0)
        new = kept_mean / f
        if np.allclose(new, mean, rtol=1e-6, atol=0):
            mean = new
            break
        mean = new
    var_pix = np.bincount(b, np.where(keep, (I - mean[b]) ** 2, 0.0), minlength=n_shells) / np.maximum(cnt - 1, 1)
    good = cnt >= min_pixels
    w = np.where(good, cnt, 0.0)
    if smooth_shells > 0:
        num = gaussian_filter1d(w * np.where(good, mean, 0.0), smooth_shells, mode="constant")
        den = gaussian_filter1d(w, smooth_shells, mode="constant")
        # variance of the weighted mean of shell means: sum k^2 w^2 var/w / (sum k w)^2
        k = _gauss_kernel(smooth_shells)
        vnum = correlate1d(np.where(good, w * var_pix, 0.0), k * k, mode="constant")
        with np.errstate(invalid="ignore", divide="ignore"):
            bsm = num / den
            vsm = vnum / (den * den)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            bsm = np.where(good, mean, np.nan)
            vsm = var_pix / np.maximum(cnt, 1)
    bsm = np.where(good, bsm, np.nan)
    centres = lo + (np.arange(n_shells) + 0.5) * width
    return IsotropicProfile(centres, bsm, np.sqrt(np.where(good, vsm, np.nan)), cnt.astype(np.int64), stride,
                            clip_nsigma)


def _gauss_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    r = int(truncate * sigma + 0.5)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def subtract_isotropic(profile: IsotropicProfile, table: dict) -> dict:
    """Columns ``intensity``, ``sigma`` and ``background`` after subtracting B(|q|) from a table.

    ``background`` is in ADU (B / correction = B x exposure), so that ``intensity x exposure =
    raw - background`` still holds; the variance of B is added to sigma^2 (corrected units).
    """
    b, v = profile.at(table["q"])
    inten = np.subtract(table["intensity"], b)
    sig = np.asarray(table["sigma"], dtype=np.float32)
    sig = np.sqrt(sig * sig + v)
    bkg = b * table["exposure"]
    return {"intensity": inten.astype(np.float32, copy=False), "sigma": sig.astype(np.float32, copy=False),
            "background": bkg.astype(np.float32, copy=False)}


# --------------------------------------------------------------------------- background frames
@dataclass
class FrameBackground:
    """Background from background-only frames, per panel, at full resolution (ADU per frame)."""

    mean: list[np.ndarray]  # float32 (ny, nx): smoothed mean counts per frame
    variance: list[np.ndarray]  # float32 (ny, nx): variance of that estimate (ADU^2)
    binned: list[np.ndarray]  # float32 (nyb, nxb): the smoothed bin values (counts per pixel per frame)
    good: list[np.ndarray]  # int32 (ny, nx): number of frames in which the pixel was used
    n_frames: int
    bin_px: int
    smooth_bins: float
    info: dict = field(default_factory=dict)


def _block_sums(a: np.ndarray, b: int) -> np.ndarray:
    ny, nx = a.shape
    nyb, nxb = -(-ny // b), -(-nx // b)
    pad = np.zeros((nyb * b, nxb * b), dtype=np.float64)
    pad[:ny, :nx] = a
    return pad.reshape(nyb, b, nxb, b).sum(axis=(1, 3))


def _smooth(sums: np.ndarray, counts: np.ndarray, sigma: float, gain: float):
    """Normalised convolution of the bin sums: value per pixel per frame and its variance."""
    if sigma > 0:
        k = _gauss_kernel(sigma, truncate=3.0)
        k2 = k * k

        def conv(a, kern):
            return correlate1d(correlate1d(a, kern, axis=0, mode="constant"), kern, axis=1, mode="constant")

        num, den, vnum = conv(sums, k), conv(counts, k), conv(sums * gain, k2)
    else:
        num, den, vnum = sums, counts, sums * gain
    with np.errstate(invalid="ignore", divide="ignore"):
        val = num / den
        var = np.maximum(vnum, gain * gain * (k2.sum() if sigma > 0 else 1.0)) / (den * den)
    empty = ~(den > 1e-9 * max(float(den.max()), 1e-300))
    if empty.all():
        raise InputError("no good pixel in any background frame")
    if empty.any():  # bins with no good pixel in reach: the nearest good bin's value
        idx = distance_transform_edt(empty, return_distances=False, return_indices=True)
        val = val[tuple(idx)]
        var = var[tuple(idx)]
    return val, var


def _expand(binned: np.ndarray, b: int, shape) -> np.ndarray:
    """Bilinear interpolation of bin-centre values at every pixel centre (beyond the outer centres: constant)."""
    ny, nx = shape
    yb = np.clip((np.arange(ny) + 0.5) / b - 0.5, 0, binned.shape[0] - 1)
    xb = np.clip((np.arange(nx) + 0.5) / b - 0.5, 0, binned.shape[1] - 1)
    rows = _interp_rows(np.asarray(binned, dtype=np.float64).T, xb).T  # along x for every bin row
    return _interp_rows(rows, yb).astype(np.float32)  # then along y


def _interp_rows(rows: np.ndarray, yb: np.ndarray) -> np.ndarray:
    i0 = np.floor(yb).astype(np.int64)
    i1 = np.minimum(i0 + 1, rows.shape[0] - 1)
    t = (yb - i0)[:, None]
    return rows[i0] * (1.0 - t) + rows[i1] * t


def estimate_background(frames: Sequence[Sequence[np.ndarray]], frame_flags: Sequence[Sequence[np.ndarray]],
                        static_bad: Sequence[np.ndarray] | None = None, *, bin_px: int = 8,
                        smooth_bins: float = 0.5, outlier_nsigma: float = 6.0, gain: float = 1.0) -> FrameBackground:
    """Smooth background per pixel from background-only frames (see the module docstring).

    ``frames[f][p]``: counts of frame f, panel p; ``frame_flags[f][p]``: that frame's flags (nonzero =
    not used: untrusted, gaps, overloads); ``static_bad[p]``: pixels never used (beamstop, user masks).
    Outliers: with >= 3 frames, a pixel value above the per-pixel median over the frames by
    ``outlier_nsigma`` Poisson sigmas is dropped from that frame (zingers); then a pixel whose
    mean over its good frames exceeds the smoothed background by ``outlier_nsigma`` sigmas of
    that mean (hot pixels, stray spots) is dropped everywhere, and the estimate is made again.
    """
    nf = len(frames)
    if nf == 0:
        raise InputError("no background frames")
    n_panels = len(frames[0])
    g = float(gain)
    means, variances, binned, used = [], [], [], []
    n_zinger = n_hot = 0
    for p in range(n_panels):
        stack = np.stack([np.asarray(f[p], dtype=np.float32) for f in frames])
        ok = np.stack([np.asarray(fl[p]) == 0 for fl in frame_flags])
        ok &= stack >= 0
        if static_bad is not None and static_bad[p] is not None:
            ok &= ~np.asarray(static_bad[p], dtype=bool)[None]
        if nf >= 3:
            med = np.median(np.where(ok, stack, np.nan), axis=0) if not ok.all() else np.median(stack, axis=0)
            med = np.nan_to_num(med, nan=0.0)
            thr = med + outlier_nsigma * np.sqrt(g * np.maximum(med, g))
            zing = ok & (stack > thr[None])
            n_zinger += int(zing.sum())
            ok &= ~zing
        n = ok.sum(axis=0).astype(np.int32)
        s = np.where(ok, stack, 0.0).sum(axis=0, dtype=np.float64)
        del stack
        shape = s.shape
        for it in range(2):
            val, var = _smooth(_block_sums(s, bin_px), _block_sums(n, bin_px), smooth_bins, g)
            if it == 1:
                break
            pix_mean = _expand(val, bin_px, shape).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                hot = (n > 0) & (s / np.maximum(n, 1) > pix_mean + outlier_nsigma *
                                 np.sqrt(g * np.maximum(pix_mean, g) / np.maximum(n, 1)))
            n_hot += int(hot.sum())
            if not hot.any():
                break
            s[hot] = 0.0
            n[hot] = 0
        means.append(_expand(val, bin_px, shape))
        variances.append(_expand(var, bin_px, shape))
        binned.append(val.astype(np.float32))
        used.append(n)
    info = {"n_frames": nf, "bin_px": int(bin_px), "smooth_bins": float(smooth_bins), "gain": g,
            "outlier_nsigma": float(outlier_nsigma), "n_zinger_pixels": n_zinger, "n_hot_pixels": n_hot,
            "mean_counts_per_frame": float(np.mean([float(np.mean(m)) for m in means]))}
    return FrameBackground(means, variances, binned, used, nf, int(bin_px), float(smooth_bins), info)
