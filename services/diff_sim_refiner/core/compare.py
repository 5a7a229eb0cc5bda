"""Image comparison metrics used to validate renders against reference images (numpy/scipy only)."""
from __future__ import annotations

import numpy as np


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def sum_ratio(test: np.ndarray, ref: np.ndarray) -> float:
    return float(np.asarray(test, np.float64).sum() / np.asarray(ref, np.float64).sum())


def brightest_peaks(img: np.ndarray, n: int = 20, size: int = 5) -> np.ndarray:
    """(n, 2) slow/fast positions of the n brightest local maxima (``size`` x ``size`` neighbourhood)."""
    from scipy.ndimage import maximum_filter  # scipy (~0.2 s) only for this comparison helper

    img = np.asarray(img, np.float64)
    mx = maximum_filter(img, size=size, mode="constant", cval=-np.inf)
    cand = np.argwhere((img == mx) & (img > 0))
    vals = img[cand[:, 0], cand[:, 1]]
    order = np.argsort(-vals, kind="stable")
    # drop plateau duplicates closer than the neighbourhood
    picked: list[np.ndarray] = []
    for i in order:
        p = cand[i]
        if all(np.abs(p - q).max() >= size // 2 + 1 for q in picked):
            picked.append(p)
        if len(picked) == n:
            break
    return np.array(picked, dtype=np.int64).reshape(-1, 2)


def centroid(img: np.ndarray, pos, half: int = 2) -> np.ndarray:
    """Intensity-weighted centroid (slow, fast) in a (2 half + 1)^2 window around ``pos``."""
    s, f = int(pos[0]), int(pos[1])
    s0, s1 = max(s - half, 0), min(s + half + 1, img.shape[0])
    f0, f1 = max(f - half, 0), min(f + half + 1, img.shape[1])
    w = np.clip(np.asarray(img[s0:s1, f0:f1], np.float64), 0, None)
    if w.sum() <= 0:
        return np.array([s, f], dtype=np.float64)
    ss, ff = np.mgrid[s0:s1, f0:f1]
    return np.array([(w * ss).sum() / w.sum(), (w * ff).sum() / w.sum()])


def peak_offsets(test: np.ndarray, ref: np.ndarray, n: int = 20) -> np.ndarray:
    """Distance (px) between centroids of the reference's n brightest peaks in ``ref`` and ``test``."""
    peaks = brightest_peaks(ref, n)
    test = np.asarray(test, np.float64)
    out = []
    for p in peaks:
        s0, f0 = max(p[0] - 3, 0), max(p[1] - 3, 0)
        win = test[s0:p[0] + 4, f0:p[1] + 4]
        q = np.unravel_index(int(np.argmax(win)), win.shape)
        q = (s0 + q[0], f0 + q[1])  # the test image's own peak near the reference peak
        out.append(np.linalg.norm(centroid(test, q) - centroid(ref, p)))
    return np.array(out)


def compare(test: np.ndarray, ref: np.ndarray, n_peaks: int = 20) -> dict:
    off = peak_offsets(test, ref, n_peaks)
    return dict(pearson=pearson(test, ref), sum_ratio=sum_ratio(test, ref),
                max_peak_offset_px=float(off.max()) if off.size else 0.0, n_peaks=int(off.size),
                max_abs_diff=float(np.abs(np.asarray(test, np.float64) - ref).max()))


__all__ = ["pearson", "sum_ratio", "brightest_peaks", "centroid", "peak_offsets", "compare"]
