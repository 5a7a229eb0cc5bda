"""The seed's stages as small functions over numpy / CuPy arrays.

Per-chunk code (``Preprocessor.apply``, ``stats_map``, ``MatchedFilter.scores``, ``softmax_confidence``,
``GatedCoM.apply``) takes the array module ``xp`` and only uses what numpy and CuPy share. Everything that
works on whole detector images or real-space maps (templates, gates, baselines, rotation, iCoM) is small
and runs on numpy.

Array conventions: a block of frames is (n, P) float32 with P = ky * kx (row-major detector pixels);
detector coordinates are (y, x) in pixels, the centre (cy, cx) in the same units.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from skimage.metrics import structural_similarity

from .calibration import radial_grid, radial_mask
from .xp import to_numpy


# --------------------------------------------------------------------------------------- preprocessing
class Preprocessor:
    """log(I+1) -> per-frame mean background subtraction -> central-beam mask (applied in this order).

    The background level of a frame is the mean of its pixels beyond ``bg_radius`` from the centre (the outer
    radius of the template ROI when given, else 45 % of the smaller detector side); the mask zeroes pixels
    within ``central_mask_px`` of the centre. Used for templates and the matched filter; the CoM/DPC stage
    works on raw intensities so deflections keep their physical meaning.
    """

    def __init__(self, cfg, frame_shape, cy: float, cx: float, bg_radius: float | None = None):
        self.cfg = cfg
        self.frame_shape = tuple(frame_shape)
        r = radial_grid(frame_shape, cy, cx).ravel()
        self.keep = (r > cfg.central_mask_px).astype(np.float32) if cfg.central_mask_px > 0 else None
        if bg_radius is None:
            bg_radius = 0.45 * min(frame_shape)
        bg = r > bg_radius
        if bg.sum() < 4:  # detector too small for an outer region: use the 4 corner pixels' ring
            bg = r >= np.sort(r)[-4]
        self.bg_weights = (bg / bg.sum()).astype(np.float32)
        self.bg_radius = float(bg_radius)
        self._dev: dict = {}

    @property
    def active(self) -> bool:
        c = self.cfg
        return bool(c.log_transform or c.background_subtract or self.keep is not None)

    def _on(self, xp, name):
        key = (xp.__name__, name)
        if key not in self._dev:
            self._dev[key] = xp.asarray(getattr(self, name))
        return self._dev[key]

    def apply(self, xp, x):
        """Preprocess a (n, P) float32 block (returns a new array; ``x`` is not modified)."""
        e, bg = self.transform(xp, x)
        e -= bg[:, None]
        if self.keep is not None:
            e *= self._on(xp, "keep")
        return e

    def transform(self, xp, x, inplace: bool = False, nonneg: bool = False):
        """The streaming form used by the passes: (e, bg) with e = log(I+1) (or I) and bg the per-frame
        background level, so that the preprocessed frame is ``(e - bg) * keep``.

        The subtraction and the mask are not applied frame by frame: they are folded into the sums
        (``stats_map``, ``MatchedFilter.scores``) and the final statistics (``finalize_stats``), which
        saves two passes over each block. ``inplace`` reuses ``x``'s memory for e (x is then consumed);
        ``nonneg`` skips the clip at 0 (unsigned integer data).
        """
        c = self.cfg
        if c.log_transform:
            src = x if nonneg else xp.maximum(x, 0)
            e = xp.log1p(src, out=x if inplace else (None if nonneg else src))
        else:
            e = x if inplace else x.copy()
        if c.background_subtract:
            bg = e @ self._on(xp, "bg_weights")
        else:
            bg = xp.zeros(x.shape[0], dtype=e.dtype)
        return e, bg


# --------------------------------------------------------------------------------------- statistics (map / merge)
@dataclass
class StatsPartial:
    """Additive partial sums of one or more chunks (map/merge: partials from any split of the scan add up).

    Sums are of D = X_pre - ref (shifted data, for a stable variance), in float64.
    ``s1``/``s2``: rows = [all, half0, half1]; ``cs``: rows = [clusters..., clusters x half0..., x half1...];
    ``cnt``: counts with the same row layout as s1 followed by cs; ``raw_c``: raw-intensity sums
    with rows [all, clusters...] for the true mean patterns.
    """

    s1: np.ndarray
    s2: np.ndarray
    cs: np.ndarray
    cnt: np.ndarray
    raw_c: np.ndarray

    def __add__(self, other: "StatsPartial") -> "StatsPartial":
        return StatsPartial(*(getattr(self, f) + getattr(other, f) for f in ("s1", "s2", "cs", "cnt", "raw_c")))

    @classmethod
    def zeros(cls, n_clusters: int, n_pix: int) -> "StatsPartial":
        c = n_clusters
        return cls(
            np.zeros((3, n_pix)), np.zeros((3, n_pix)), np.zeros((3 * c, n_pix)),
            np.zeros(3 + 3 * c), np.zeros((1 + c, n_pix)),
        )


def membership_matrix(xp, lab_idx, half, n_clusters: int):
    """(3 + 3C, n) float32 0/1 rows: [all, half0, half1, cluster c, cluster c & half0, cluster c & half1]."""
    n = lab_idx.shape[0]
    c = n_clusters
    cl = xp.arange(c)[:, None]
    inc = (lab_idx[None, :] == cl).astype(xp.float32)  # (C, n); lab_idx -1 matches nothing
    h0 = (half == 0).astype(xp.float32)[None, :]
    h1 = (half == 1).astype(xp.float32)[None, :]
    ones = xp.ones((1, n), dtype=xp.float32)
    return xp.concatenate([ones, h0, h1, inc, inc * h0, inc * h1], axis=0)


class StatsAccumulator:
    """Accumulates one chunk's sums tile by tile in float32 on the device; ``partial()`` hands a float64
    ``StatsPartial`` to the host (once per chunk). Tiles are small (cache-sized), so each tile's
    conversion, log and products run while it is hot in cache.

    With D_i = e_i - ref - bg_i (``Preprocessor.transform`` gives e, bg) and membership rows a:
    sum a_i D_i = a.e' - (a.bg) 1 and sum r_i D_i^2 = sum r_i e'_i^2 - 2 (r bg).e' + r.bg^2 (e' = e - ref),
    so one matrix product and one sum of squares per tile cover every row. Split-half squares only when
    ``split``.
    """

    def __init__(self, xp, n_clusters: int, n_pix: int, split: bool):
        c = n_clusters
        self.xp, self.c, self.split = xp, c, split
        self.m = 3 + 3 * c
        self.rr = 3 if split else 1
        f32 = xp.float32
        self.first = xp.zeros((self.m + self.rr, n_pix), dtype=f32)  # a.e' rows, then (r bg).e' rows
        self.sq = xp.zeros((self.rr, n_pix), dtype=f32)
        self.raw = xp.zeros((1 + c, n_pix), dtype=f32)
        self.abg = xp.zeros(self.m, dtype=f32)
        self.rbg2 = xp.zeros(self.rr, dtype=f32)
        self.cnt = xp.zeros(self.m, dtype=f32)
        self._raw_rows = xp.asarray(np.r_[0, 3:3 + c])

    def add(self, x, lab_idx, half, pre, ref, nonneg: bool = False) -> None:
        """Add a (n, P) float32 tile of raw frames; ``x`` is consumed (reused for the log in place)."""
        xp = self.xp
        a = membership_matrix(xp, lab_idx, half, self.c)
        self.raw += a[self._raw_rows] @ x
        e, bg = pre.transform(xp, x, inplace=True, nonneg=nonneg)
        e -= ref[None, :]
        r = a[:self.rr]
        self.first += xp.concatenate([a, r * bg[None, :]], axis=0) @ e
        if self.split:
            self.sq += r @ (e * e)
        else:
            self.sq += xp.einsum("ij,ij->j", e, e)[None, :]
        self.abg += a @ bg
        self.rbg2 += r @ (bg * bg)
        self.cnt += a.sum(axis=1)

    def partial(self) -> StatsPartial:
        f = to_numpy(self.first).astype(np.float64)
        abg = to_numpy(self.abg).astype(np.float64)
        first = f[:self.m] - abg[:, None]
        second = (to_numpy(self.sq).astype(np.float64) - 2 * f[self.m:]
                  + to_numpy(self.rbg2).astype(np.float64)[:, None])
        s2 = np.zeros((3, f.shape[1]))
        s2[:self.rr] = second
        return StatsPartial(s1=first[:3], s2=s2, cs=first[3:], cnt=to_numpy(self.cnt).astype(np.float64),
                            raw_c=to_numpy(self.raw).astype(np.float64))


def stats_map(xp, x, lab_idx, half, pre, ref, n_clusters: int, split: bool = True, nonneg: bool = False):
    """Partial sums (``StatsPartial``) of one block of raw float32 frames (consumed)."""
    acc = StatsAccumulator(xp, n_clusters, x.shape[1], split)
    acc.add(x, lab_idx, half, pre, ref, nonneg)
    return acc.partial()


@dataclass
class Stats:
    mu: np.ndarray  # (ky, kx) global mean of preprocessed frames
    sigma: np.ndarray  # (ky, kx) global std (ddof=0)
    mu_c: np.ndarray  # (C, ky, kx) cluster means of preprocessed frames
    counts: np.ndarray  # (C,)
    mu_raw: np.ndarray  # (ky, kx) global mean of raw frames
    mu_c_raw: np.ndarray  # (C, ky, kx) true cluster mean patterns (raw intensities)
    halves: list = field(default_factory=list)  # [(mu, sigma, mu_c, counts)] per half


def finalize_stats(p: StatsPartial, ref: np.ndarray, frame_shape, n_clusters: int, keep=None) -> Stats:
    """Means and standard deviations from merged partials; ``keep`` (0/1 per pixel) applies the central
    mask to the statistics (a masked pixel is 0 in every preprocessed frame: mean 0, std 0)."""
    c = n_clusters
    shp = tuple(frame_shape)
    ref = np.asarray(ref, dtype=np.float64)

    def moments(row):
        n = p.cnt[row]
        m = p.s1[row] / max(n, 1)
        var = np.maximum(p.s2[row] / max(n, 1) - m * m, 0.0)
        return ref + m, np.sqrt(var), n

    def cmeans(rows_start, cnts):
        cs = p.cs[rows_start:rows_start + c]
        with np.errstate(invalid="ignore", divide="ignore"):
            mc = ref[None, :] + cs / np.maximum(cnts, 1)[:, None]
        return mc.reshape((c,) + shp)

    mu, sig, n = moments(0)
    counts = p.cnt[3:3 + c]
    halves = []
    for h in (1, 2):
        mh, sh, _ = moments(h)
        ch = p.cnt[3 + h * c:3 + (h + 1) * c]
        halves.append((mh.reshape(shp), sh.reshape(shp), cmeans(h * c, ch), ch))
    raw_n = max(p.cnt[0], 1)
    mu_c_raw = p.raw_c[1:] / np.maximum(counts, 1)[:, None]
    out = Stats(
        mu=mu.reshape(shp), sigma=sig.reshape(shp), mu_c=cmeans(0, counts), counts=counts,
        mu_raw=(p.raw_c[0] / raw_n).reshape(shp), mu_c_raw=mu_c_raw.reshape((c,) + shp), halves=halves,
    )
    if keep is not None:
        k = np.asarray(keep, dtype=np.float64).reshape(shp)
        out.mu, out.sigma, out.mu_c = out.mu * k, out.sigma * k, out.mu_c * k
        out.halves = [(m_ * k, s_ * k, c_ * k, n_) for m_, s_, c_, n_ in halves]
    return out


# --------------------------------------------------------------------------------------- templates and gates
def make_templates(mu_c: np.ndarray, mu: np.ndarray, sigma: np.ndarray, eps: float):
    """T_c = (mu_c - mu) / (sigma + eps), then L2-normalised. Returns (T, norms before normalisation)."""
    t = (np.asarray(mu_c, np.float64) - mu[None]) / (sigma[None] + eps)
    norms = np.sqrt((t * t).reshape(len(t), -1).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        t = t / norms[:, None, None]
    t[norms == 0] = 0.0
    return t, norms


def mirror_bilinear(g: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """g(2 cy - y, 2 cx - x), bilinear, zero beyond the array (``ndimage.map_coordinates`` with order=1,
    mode='grid-constant', to rounding). The mirrored coordinates of all pixels share one fractional part, so
    this is four flipped, shifted copies of g: ~50x cheaper than the general interpolation at 128 x 128."""
    g = np.asarray(g, dtype=np.float64)
    ky, kx = g.shape
    y0, x0 = np.floor(2.0 * cy), np.floor(2.0 * cx)
    fy, fx = 2.0 * cy - y0, 2.0 * cx - x0
    # g(Y + dy - i, X + dx - j) = flipped g at (i + ky - 1 - Y - dy, j + kx - 1 - X - dx): shifted copies of the
    # flipped array, zero where the shift leaves it
    gf = g[::-1, ::-1]
    sy, sx = ky - 1 - int(y0), kx - 1 - int(x0)

    def shifted(oy, ox):  # out[i, j] = gf[i + oy, j + ox], 0 off the array
        out = np.zeros((ky, kx))
        i0, i1 = max(0, -oy), min(ky, ky - oy)
        j0, j1 = max(0, -ox), min(kx, kx - ox)
        if i1 > i0 and j1 > j0:
            out[i0:i1, j0:j1] = gf[i0 + oy:i1 + oy, j0 + ox:j1 + ox]
        return out

    c00, c01, c10, c11 = shifted(sy, sx), shifted(sy, sx - 1), shifted(sy - 1, sx), shifted(sy - 1, sx - 1)
    return (1.0 - fy) * ((1.0 - fx) * c00 + fx * c01) + fy * ((1.0 - fx) * c10 + fx * c11)


def symmetrize_gate(g: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """Point-reflection symmetrisation of a gate about the (sub-pixel) beam centre: 0.5 (G + R G).

    R G (y, x) = G(2 cy - y, 2 cx - x), bilinearly interpolated (zero outside the detector). Pixels whose mirror
    image falls off the detector are dropped first, so every pixel's weight is mirrored in full: bilinear
    weights reproduce linear functions, hence the centroid of R G is 2 c - centroid(G) and the centroid of the
    result is the centre exactly (a featureless pattern gives CoM 0 to rounding). A pattern that is
    centro-symmetric about the centre gives CoM 0 up to the sampling (aliasing) error of gate x pattern.
    """
    g = np.asarray(g, dtype=np.float64)
    ky, kx = g.shape
    yy, xx = np.indices((ky, kx), dtype=np.float64)
    my, mx = 2.0 * cy - yy, 2.0 * cx - xx
    inside = (my >= 0) & (my <= ky - 1) & (mx >= 0) & (mx <= kx - 1)
    g = np.where(inside, g, 0.0)
    r = mirror_bilinear(g, cy, cx)
    out = 0.5 * (g + r)
    out[np.abs(out) < 1e-12] = 0.0  # interpolation round-off: keep empty pixels exactly empty
    return out


def symmetrize(g: np.ndarray, mode: str, center=None) -> np.ndarray:
    """'beam': about the beam centre (``symmetrize_gate``); 'array': the seed's literal 0.5 (G + G[::-1, ::-1])
    (about the array centre: biased when the beam is elsewhere); 'none': unchanged."""
    if mode == "beam":
        if center is None:
            raise ValueError("beam-centred gate symmetrisation needs the beam centre (cy, cx)")
        return symmetrize_gate(g, *center)
    if mode == "array":
        return 0.5 * (g + g[::-1, ::-1])
    if mode == "none":
        return np.asarray(g, dtype=np.float64)
    raise ValueError(f"unknown gate symmetrisation {mode!r}")


def make_gates(templates: np.ndarray, top_percent: float, smooth_sigma: float | None, roi_mask: np.ndarray | None,
               center=None, mode: str = "beam"):
    """Virtual detector gates from templates.

    threshold = percentile(T_c, 100 - top_percent); G = T_c >= threshold; optional Gaussian smoothing
    (``smooth_sigma`` px); G *= radial ROI mask; then the point-reflection symmetrisation about the beam centre
    ``center`` = (cy, cx) (``mode='beam'``, last so the gate's centroid is the centre exactly; its support may
    exceed the ROI band by less than a pixel). ``mode='array'`` is the seed's literal array flip (in the seed's
    order: threshold, flip, smooth, ROI), kept for comparison.
    """
    gates = []
    for t in templates:
        thr = np.percentile(t, 100.0 - top_percent)
        g = (t >= thr).astype(np.float64)
        if mode == "array":
            g = symmetrize(g, "array")
        if smooth_sigma:
            g = ndimage.gaussian_filter(g, smooth_sigma)
        if roi_mask is not None:
            g = g * roi_mask
        if mode != "array":
            g = symmetrize(g, mode, center)
        gates.append(g)
    return np.array(gates)


def gate_coverage(gates: np.ndarray, templates: np.ndarray | None = None, captured_warn: float = 0.5) -> list[dict]:
    """Per gate: detector area (``coverage`` = sum G / P, set by top_percent and smoothing), ``support``
    (G > 0.1 % of max) and, given the templates, measures that follow template quality:
    ``signal_captured`` = sum G T+^2 / sum T+^2 (fraction of the template's positive energy inside the gate:
    near 1 for a compact, distinctive template, near the gate's area for a noise template) and
    ``max_overlap`` with another gate (sum min(Ga, Gb) / sum max(Ga, Gb): near 1 = the gates do not
    discriminate). ``ok`` is False when signal_captured < ``captured_warn``.
    """
    out = []
    for i, g in enumerate(gates):
        w = float(g.sum() / g.size)
        s = float((g > 1e-3 * max(g.max(), 1e-12)).mean())
        rec = {"coverage": w, "support": s}
        if templates is not None:
            tp = np.clip(np.asarray(templates[i], dtype=np.float64), 0, None) ** 2
            gn = g / max(float(g.max()), 1e-12)
            cap = float((gn * tp).sum() / tp.sum()) if tp.sum() > 0 else 0.0
            ov = [float(np.minimum(g, h).sum() / max(np.maximum(g, h).sum(), 1e-12))
                  for j, h in enumerate(gates) if j != i]
            rec.update(signal_captured=cap, max_overlap=max(ov) if ov else None, ok=cap >= captured_warn,
                       status=("distinctive template: the gate holds most of its signal" if cap >= captured_warn
                               else "the gate holds little of the template's signal (noisy or diffuse template)"))
        out.append(rec)
    return out


def split_half_ssim(stats: Stats, eps: float, valid: np.ndarray) -> list[float | None]:
    """SSIM between templates built from two random halves of the scan (one value per cluster)."""
    (m0, s0, c0, n0), (m1, s1, c1, n1) = stats.halves
    t0, _ = make_templates(c0, m0, s0, eps)
    t1, _ = make_templates(c1, m1, s1, eps)
    out: list[float | None] = []
    for i in range(len(t0)):
        if not valid[i] or n0[i] < 1 or n1[i] < 1:
            out.append(None)
            continue
        a, b = t0[i], t1[i]
        rng = float(max(a.max(), b.max()) - min(a.min(), b.min())) or 1.0
        win = min(7, *a.shape)
        win = win if win % 2 else win - 1
        out.append(float(structural_similarity(a, b, data_range=rng, win_size=win)))
    return out


# --------------------------------------------------------------------------------------- matched filter
class MatchedFilter:
    """S_c(i) = sum_k T_c(k) Z_i(k), Z_i = (I_i - mu) / (sigma + eps) ('diag' whitening) or I_i - mu ('none').

    Evaluated as one matrix product per chunk: S = X W - b with W = T^T w and b = (mu w) . T.
    """

    def __init__(self, templates: np.ndarray, mu: np.ndarray, sigma: np.ndarray, eps: float, whiten: str):
        c = len(templates)
        t = templates.reshape(c, -1).astype(np.float64)
        w = 1.0 / (sigma.ravel() + eps) if whiten == "diag" else np.ones(sigma.size)
        self.W = (t * w[None]).T.astype(np.float32)  # (P, C)
        self.b = ((mu.ravel() * w) @ t.T).astype(np.float32)  # (C,)
        self.colsum = self.W.astype(np.float64).sum(axis=0).astype(np.float32)  # (C,) = 1 . W
        self._dev: dict = {}

    def scores(self, xp, x_pre, bg=None):
        """S for preprocessed frames, or for ``transform`` output (e, bg): (e - bg 1) W = e W - bg (1 W).
        Masked pixels need no masking here: T (hence W) is zero there."""
        key = xp.__name__
        if key not in self._dev:
            self._dev[key] = (xp.asarray(self.W), xp.asarray(self.b), xp.asarray(self.colsum))
        w, b, cs = self._dev[key]
        s = x_pre @ w - b[None, :]
        if bg is not None:
            s -= bg[:, None] * cs[None, :]
        return s


def softmax_confidence(xp, s, temp: float):
    """Softmax over clusters of S / temp; returns (probabilities, argmax index, max probability)."""
    z = s / temp
    z = z - z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    idx = xp.argmax(p, axis=1)
    return p, idx, p.max(axis=1)


# --------------------------------------------------------------------------------------- gated centre of mass
class GatedCoM:
    """C_x = sum_k x G I / sum_k G I (and C_y) for one or several gates, in detector px from the centre.

    All gates are stacked into one (P, 3K) lookup table so a chunk costs one matrix product; ``apply`` picks
    each frame's gate by index (adaptive mode) or uses gate 0 (union / single gate).
    """

    def __init__(self, gates: np.ndarray, cy: float, cx: float):
        gates = np.asarray(gates, dtype=np.float64)
        if gates.ndim == 2:
            gates = gates[None]
        k, ky, kx = gates.shape
        yy, xx = np.indices((ky, kx), dtype=np.float64)
        cols = []
        for g in gates:
            cols += [(g * (xx - cx)).ravel(), (g * (yy - cy)).ravel(), g.ravel()]
        self.M = np.stack(cols, axis=1).astype(np.float32)  # (P, 3K)
        self.n_gates = k
        # the same moments from one gate row and the pixel offsets (the native pass-2 kernel forms the products)
        self.frame_shape = (ky, kx)
        self.G = gates.reshape(k, -1).astype(np.float32)
        self.dx = (np.arange(kx) - cx).astype(np.float32)
        self.dy = (np.arange(ky) - cy).astype(np.float32)
        self._dev: dict = {}

    def products(self, xp, x_raw):
        """(n, K, 3) gated moments [sum x G I, sum y G I, sum G I] of a block: one matrix product."""
        key = xp.__name__
        if key not in self._dev:
            self._dev[key] = xp.asarray(self.M)
        return (x_raw @ self._dev[key]).reshape(x_raw.shape[0], self.n_gates, 3)

    def select(self, xp, r, gate_idx=None):
        """CoM from ``products``: each frame's gate by index (adaptive) or gate 0 (union / single gate)."""
        if gate_idx is None:
            sel = r[:, 0, :]
        else:
            sel = xp.take_along_axis(r, gate_idx.reshape(-1, 1, 1).astype(xp.int64), axis=1)[:, 0, :]
        den = sel[:, 2]
        valid = den > 0
        safe = xp.where(valid, den, 1)
        cxv = xp.where(valid, sel[:, 0] / safe, 0)
        cyv = xp.where(valid, sel[:, 1] / safe, 0)
        return cxv, cyv, valid

    def apply(self, xp, x_raw, gate_idx=None):
        """Return (com_x, com_y, valid) for a (n, P) block; frames with sum G I <= 0 get 0 and valid False."""
        return self.select(xp, self.products(xp, x_raw), gate_idx)

    def apply_all(self, xp, x_raw):
        """(n, K) com_x, com_y, valid for every gate (used for the descan reference scan)."""
        key = xp.__name__
        if key not in self._dev:
            self._dev[key] = xp.asarray(self.M)
        r = (x_raw @ self._dev[key]).reshape(x_raw.shape[0], self.n_gates, 3)
        den = r[..., 2]
        valid = den > 0
        safe = xp.where(valid, den, 1)
        return xp.where(valid, r[..., 0] / safe, 0), xp.where(valid, r[..., 1] / safe, 0), valid


# --------------------------------------------------------------------------------------- real-space corrections
def apply_baseline(c: np.ndarray, mode: str, roi=None) -> np.ndarray:
    """Remove offsets: 'median' (global), 'rowcol' (row medians, then column medians), 'roi' (mean of a
    reference region [y0, y1, x0, x1]) or 'none'."""
    c = np.asarray(c, dtype=np.float64)
    if mode == "none":
        return c.copy()
    if mode == "median":
        return c - np.median(c)
    if mode == "rowcol":
        d = c - np.median(c, axis=1)[:, None]
        return d - np.median(d, axis=0)[None, :]
    if mode == "roi":
        y0, y1, x0, x1 = roi
        if y1 > c.shape[0] or x1 > c.shape[1]:
            raise ValueError(f"dpc.baseline_roi {list(roi)} lies outside the {c.shape[0]} x {c.shape[1]} scan")
        return c - c[y0:y1, x0:x1].mean()
    raise ValueError(f"unknown baseline {mode!r}")


def rotate_vectors(cx, cy, angle_deg: float, flip: bool):
    """Detector -> scan frame: optionally mirror x (cx -> -cx), then rotate counter-clockwise by angle."""
    cx = -np.asarray(cx) if flip else np.asarray(cx)
    cy = np.asarray(cy)
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return ca * cx - sa * cy, sa * cx + ca * cy


def estimate_rotation(cx: np.ndarray, cy: np.ndarray, flips=(False, True)) -> dict:
    """Scan rotation (and flip) that makes the CoM field curl-free.

    curl(R_a C) = cos(a) curl(C) + sin(a) div(C), so mean(curl^2) is a quadratic form in (cos a, sin a):
    its minimum is the eigenvector of the smaller eigenvalue of [[<curl^2>, <curl div>], [<curl div>, <div^2>]].
    The angle is defined modulo 180 deg (a field and its negative are both curl-free); it is returned in
    [-90, 90). The flip with the smaller residual curl wins.
    """
    best = None
    for flip in flips:
        u = -cx if flip else cx
        v = cy
        du_dy, du_dx = np.gradient(u)
        dv_dy, dv_dx = np.gradient(v)
        curl = dv_dx - du_dy
        div = du_dx + dv_dy
        a = np.array([[np.mean(curl * curl), np.mean(curl * div)], [np.mean(curl * div), np.mean(div * div)]])
        w, vecs = np.linalg.eigh(a)
        c, s = vecs[:, 0]
        ang = math.degrees(math.atan2(s, c))
        ang = (ang + 90.0) % 180.0 - 90.0
        total = float(np.trace(a)) or 1.0
        rec = {"rotation_deg": ang, "flip": flip, "residual_curl_fraction": float(w[0] / total)}
        if best is None or rec["residual_curl_fraction"] < best["residual_curl_fraction"]:
            best = rec
    return best


def fit_plane(m: np.ndarray) -> np.ndarray:
    """Least-squares plane a + b y + c x through a map (descan is linear in scan position)."""
    h, w = m.shape
    yy, xx = np.indices((h, w), dtype=np.float64)
    a = np.stack([np.ones(h * w), yy.ravel(), xx.ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(a, m.ravel(), rcond=None)
    return (a @ coef).reshape(h, w)


def integrate_com(cx: np.ndarray, cy: np.ndarray, step: float = 1.0) -> np.ndarray:
    """iCoM: the potential phi with grad(phi) = (cx, cy), by Fourier integration on the scan grid.

    phi = F^-1[(qx F[cx] + qy F[cy]) / (2 pi i |q|^2)], zero mean; ``step`` is the scan step (units of phi =
    units of C x step). Maps are mirror-extended to suppress edge artefacts of the periodic transform.
    """
    h, w = cx.shape
    # mirror-symmetric extension: flip the sign of the component normal to each mirror so the field stays a gradient
    px = np.block([[cx, -cx[:, ::-1]], [cx[::-1, :], -cx[::-1, ::-1]]])
    py = np.block([[cy, cy[:, ::-1]], [-cy[::-1, :], -cy[::-1, ::-1]]])
    qy = np.fft.fftfreq(2 * h, d=step)[:, None]
    qx = np.fft.fftfreq(2 * w, d=step)[None, :]
    q2 = qx * qx + qy * qy
    q2[0, 0] = 1.0
    f = (qx * sfft.fft2(px) + qy * sfft.fft2(py)) / (2j * np.pi * q2)  # scipy's FFT: ~2x numpy's here
    f[0, 0] = 0.0
    phi = np.real(sfft.ifft2(f))[:h, :w]
    return phi - phi.mean()


def hsv_image(ex: np.ndarray, ey: np.ndarray, clip_percentile: float = 99.0) -> np.ndarray:
    """RGB image: hue = field angle, value = |E| normalised at the given percentile, saturation 1."""
    from matplotlib.colors import hsv_to_rgb  # imported at first use: 0.13 s, only the figures need it

    mag = np.hypot(ex, ey)
    top = np.percentile(mag, clip_percentile) or (mag.max() or 1.0)
    hue = (np.arctan2(ey, ex) / (2 * np.pi)) % 1.0
    hsv = np.stack([hue, np.ones_like(hue), np.clip(mag / top, 0, 1)], axis=-1)
    return hsv_to_rgb(hsv)


def warn(msg: str, sink: list) -> None:
    sink.append(msg)
    warnings.warn(msg, stacklevel=3)
