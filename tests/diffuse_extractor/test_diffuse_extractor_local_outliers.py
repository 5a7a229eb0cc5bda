"""Outlier pixels are small bright spots, not the centres of broad diffuse features.

A pixel far above its |q| shell's mean is masked only if it also stands above its own neighbourhood: a diffuse
halo several pixels wide rises with its surroundings and stays data (otherwise the masked part of each halo grows
with the still's brightness and biases the scales); an unpredicted Bragg partial a pixel or two wide is masked.
"""
from __future__ import annotations

import numpy as np

from diffuse_extractor.core.masks import local_outliers


def test_halo_kept_small_spot_masked():
    rng = np.random.default_rng(5)
    ny = nx = 200
    y, x = np.mgrid[0:ny, 0:nx]
    halo = 60.0 * np.exp(-((y - 60) ** 2 + (x - 60) ** 2) / (2 * 5.5 ** 2))
    spot = 80.0 * np.exp(-((y - 150) ** 2 + (x - 140) ** 2) / (2 * 0.8 ** 2))
    img = rng.poisson(3.0 + halo + spot).astype(np.float32)
    mean = float(img.mean())
    candidates = np.flatnonzero(img.ravel() > mean + 8 * np.sqrt(mean))  # the |q|-shell test of outlier_flags
    cy, cx = np.divmod(candidates, nx)
    assert ((np.hypot(cy - 60, cx - 60) < 6).sum() >= 5) and ((np.hypot(cy - 150, cx - 140) < 3).sum() >= 1)
    kept = local_outliers(img.ravel(), None, np.ones(ny * nx, bool), (ny, nx), candidates, nsigma=8.0, gain=1.0)
    ky, kx = np.divmod(kept, nx)
    assert not (np.hypot(ky - 60, kx - 60) < 15).any(), "the broad halo's centre must stay data"
    assert (np.hypot(ky - 150, kx - 140) < 3).any(), "the small bright spot must be masked"


def test_weights_and_flags_are_respected():
    """Values are compared after the polarisation weights, and flagged pixels do not enter the local level."""
    ny = nx = 60
    img = np.full((ny, nx), 4.0, np.float32)
    img[30, 30] = 200.0
    w = np.full((ny, nx), 0.5, np.float32)
    ok = np.ones((ny, nx), bool)
    cand = np.array([30 * nx + 30])
    assert local_outliers(img.ravel(), w.ravel(), ok.ravel(), (ny, nx), cand, 8.0, 1.0).size == 1
    # a neighbourhood made bright only by flagged pixels (e.g. a masked Bragg disk) does not hide the spot
    img2 = img.copy()
    img2[24:37, 24:37] = 500.0
    img2[30, 30] = 200.0
    ok2 = ok.copy()
    ok2[24:37, 24:37] = False
    ok2[30, 30] = True
    assert local_outliers(img2.ravel(), None, ok2.ravel(), (ny, nx), cand, 8.0, 1.0).size == 1
    # ...but if those pixels are unflagged data, the spot sits inside a brighter broad feature and is kept
    assert local_outliers(img2.ravel(), None, ok.ravel(), (ny, nx), cand, 8.0, 1.0).size == 0
