"""Synthetic planted-truth data for the scaler tests."""
from __future__ import annotations

import numpy as np
import pytest


def make_planted(n_stills=200, n_per_still=600, n_voxels=2000, noise=0.05, spread=0.2, q_range=(0.1, 0.6),
                 voxel_q_halfwidth=0.02, resolution_factor=None, seed=7):
    """Observations I = b_s * g(q) * I_v * (1 + noise * N(0,1)), sigma = noise * model.

    b_s log-normal with ``spread`` (sigma of log b); each voxel sits at a |q| and its observations
    spread by +- ``voxel_q_halfwidth`` around it (1/Å).
    """
    rng = np.random.default_rng(seed)
    still = np.repeat(np.arange(n_stills), n_per_still)
    vox = rng.integers(0, n_voxels, still.size)
    vq = rng.uniform(q_range[0] + voxel_q_halfwidth, q_range[1] - voxel_q_halfwidth, n_voxels)
    q = vq[vox] + rng.uniform(-voxel_q_halfwidth, voxel_q_halfwidth, still.size)
    i_ref = rng.gamma(2.0, 50.0, n_voxels) + 10.0
    b_true = np.exp(rng.normal(0.0, spread, n_stills))
    g = np.ones_like(q) if resolution_factor is None else resolution_factor(q)
    model = b_true[still] * g * i_ref[vox]
    sigma = noise * model
    inten = model + rng.normal(0.0, 1.0, model.size) * sigma
    return {"still_id": still, "voxel_id": vox, "q_magnitude": q, "intensity": inten, "sigma": sigma,
            "b_true": b_true, "i_ref": i_ref, "g": g}


def rms_relative(b, b_true):
    """rms of b/b_true - 1 after fixing the overall scale (geometric mean of the ratio = 1)."""
    r = np.asarray(b) / np.asarray(b_true)
    r = r / np.exp(np.mean(np.log(r)))
    return float(np.sqrt(np.mean((r - 1.0) ** 2)))


@pytest.fixture(scope="session")
def planted():
    return make_planted


@pytest.fixture(scope="session")
def rms_rel():
    return rms_relative
