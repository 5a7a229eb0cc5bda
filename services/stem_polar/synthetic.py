"""Synthetic 4D-STEM scans with planted ground truth (tests, the demo, benchmarks).

Each probe position sees a bright-field disk (anti-aliased edge) shifted by a known deflection, plus one
Friedel-asymmetric pair of Bragg spots (+g brighter than -g) whose direction depends on the planted domain.
The deflection is given in the scan frame (Fx, Fy, detector px) and rotated into the detector frame by
``-rot_deg`` (a detector rotated by rot_deg relative to the scan), optionally mirrored in x (``flip``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

# domain -> (polarisation unit vector (x, y), reciprocal vector g (y, x) in px, Friedel asymmetry)
DOMAINS = {
    0: ((1.0, 0.0), (0.0, 11.0), 0.5),
    1: ((-1.0, 0.0), (11.0, 0.0), 0.5),
    2: ((0.0, 1.0), (7.8, 7.8), -0.5),
}


def domain_map(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    b1 = w / 3 + 1.5 * np.sin(yy / 3.0)
    b2 = 2 * w / 3 + 0.4 * (yy - h / 2)
    dom = np.where(xx < b1, 0, np.where(xx < b2, 1, 2))
    return dom.astype(np.int64)


def render(shift_y, shift_x, dom, k=32, center=(15.3, 16.2), radius=6.0, disk_level=100.0, spot_level=60.0,
           background=2.0, noise=True, seed=0, dtype=np.uint16):
    """Frames (N, k, k) for flat arrays of detector-frame shifts (px) and domain ids."""
    n = shift_y.size
    yy, xx = np.mgrid[0:k, 0:k].astype(np.float64)
    cy = center[0] + shift_y.reshape(n, 1, 1)
    cx = center[1] + shift_x.reshape(n, 1, 1)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    img = disk_level * np.clip(radius - r + 0.5, 0.0, 1.0) + background
    for d, (_, (gy, gx), asym) in DOMAINS.items():
        m = (dom.ravel() == d).reshape(n, 1, 1)
        for sgn in (1, -1):
            amp = spot_level * (1 + sgn * asym)
            spot = amp * np.exp(-((yy - cy - sgn * gy) ** 2 + (xx - cx - sgn * gx) ** 2) / (2 * 1.0 ** 2))
            img = img + m * spot
    if noise:
        img = np.random.default_rng(seed).poisson(img).astype(np.float64)
    return img.astype(dtype)


def to_detector(fx, fy, rot_deg=0.0, flip=False):
    """Scan-frame field -> detector-frame shift (inverse of the service's flip-then-rotate)."""
    a = math.radians(-rot_deg)
    dx = math.cos(a) * fx - math.sin(a) * fy
    dy = math.sin(a) * fx + math.cos(a) * fy
    return (-dx if flip else dx), dy


def make_scan(h=24, w=24, k=32, amp=0.8, smooth=0.35, rot_deg=0.0, flip=False, field="domains", seed=0,
              noise=True, dtype=np.uint16, label_noise=0.0, center=(15.3, 16.2)):
    dom = domain_map(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if field == "domains":
        px = np.vectorize(lambda d: DOMAINS[d][0][0])(dom)
        py = np.vectorize(lambda d: DOMAINS[d][0][1])(dom)
        fx = amp * px + smooth * np.sin(2 * np.pi * yy / h)
        fy = amp * py + smooth * np.cos(2 * np.pi * xx / w)
        phi = None
    else:  # curl-free: F = grad(phi), phi = two Gaussian bumps of opposite sign
        phi = (np.exp(-((yy - h * 0.35) ** 2 + (xx - w * 0.3) ** 2) / (2 * (h / 6) ** 2))
               - np.exp(-((yy - h * 0.65) ** 2 + (xx - w * 0.7) ** 2) / (2 * (h / 6) ** 2)))
        gy, gx = np.gradient(phi)
        s = amp / np.abs(np.stack([gx, gy])).max()
        fx, fy, phi = gx * s, gy * s, phi * s
    dx, dy = to_detector(fx, fy, rot_deg, flip)
    frames = render(dy.ravel(), dx.ravel(), dom, k=k, noise=noise, seed=seed, dtype=dtype, center=center)
    labels = dom.ravel().copy()
    if label_noise:
        rng = np.random.default_rng(seed + 1)
        flipm = rng.random(labels.size) < label_noise
        labels[flipm] = rng.integers(0, 3, flipm.sum())
    return {"data": frames.reshape(h, w, k, k), "labels": labels, "domains": dom, "fx": fx, "fy": fy,
            "dx": dx, "dy": dy, "phi": phi, "center": center}


def write_demo_dataset(out_dir, h: int = 48, w: int = 48, k: int = 32, seed: int = 0) -> dict:
    """patterns.h5 (dataset ``patterns``, (H, W, ky, kx) uint16) and labels.npy with planted domains."""
    import h5py  # heavy: only the file writer needs it, not the in-memory scans

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = make_scan(h=h, w=w, k=k, seed=seed, center=(k / 2 - 0.7, k / 2 + 0.2))  # the tests' geometry at k=32
    with h5py.File(out / "patterns.h5", "w") as f:
        f.create_dataset("patterns", data=s["data"], chunks=(1, w, k, k))
    np.save(out / "labels.npy", s["labels"])
    np.savez(out / "truth.npz", fx=s["fx"], fy=s["fy"], domains=s["domains"])
    return s
