"""Scales from per-still voxel estimates at a few photons: weights from the Poisson model, not from the counts.

Planted: per-still scales b_s, voxel levels T_v, exposures e_sv; counts ~ Poisson(b_s T_v e_sv); the observation
table holds I = counts / e, sigma from the observed counts (as the voxel-merger writes it) and the exposure
(column ``weight``). The scaler must recover b_s; 1/sigma^2 from the counts instead would bias them.
"""
from __future__ import annotations

import numpy as np

from diffractflow.formats.scales import read_scales
from scaler.artifacts import write_observations
from scaler.pipeline import run_relative


def _planted_table(path, mean_photons: float, seed: int = 3, n_stills: int = 16, n_voxels: int = 24000,
                   with_exposure: bool = True):
    rng = np.random.default_rng(seed)
    b = np.exp(rng.normal(0.0, 0.35, n_stills))
    T = rng.exponential(1.0, n_voxels) + 0.2
    rows = []
    for s in range(n_stills):
        v = rng.choice(n_voxels, size=n_voxels // 2, replace=False)
        e = rng.uniform(0.5, 3.0, v.size) * mean_photons  # exposure x level -> a few photons per still-voxel
        counts = rng.poisson(b[s] * T[v] * e)
        rows.append((np.full(v.size, s), v, counts / e, np.sqrt(np.maximum(counts, 1)) / e, e))
    sid, vid, inten, sig, exp_ = (np.concatenate(c) for c in zip(*rows))
    q = 0.1 + 0.3 * (vid / n_voxels)
    names = [f"still_{s:02d}.cbf#0" for s in range(n_stills)]
    write_observations(path, sid, vid, q, inten, sig, still_names=names, weight=exp_ if with_exposure else None)
    return b


def _scale_error(out_dir, planted) -> float:
    sc = read_scales(out_dir / "scales.json")
    rec = np.array([sc[f"still_{i:02d}.cbf#0"] for i in range(len(planted))])
    r = rec / planted
    r /= np.exp(np.mean(np.log(r)))
    return float(np.sqrt(np.mean((r - 1) ** 2)))


def test_scales_unbiased_at_a_few_photons_with_exposure_weights(tmp_path):
    planted = _planted_table(tmp_path / "obs.h5", mean_photons=3.0)
    run_relative(tmp_path / "obs.h5", tmp_path / "out")
    err = _scale_error(tmp_path / "out", planted)
    # the same table without the exposure column: the scaler falls back to 1/sigma^2 from the counts
    _planted_table(tmp_path / "obs_counts.h5", mean_photons=3.0, with_exposure=False)
    run_relative(tmp_path / "obs_counts.h5", tmp_path / "out_counts")
    err_counts = _scale_error(tmp_path / "out_counts", planted)
    # photon-counting limit here ~0.5 % per still
    assert err < 0.01, (err, err_counts)
    assert err_counts > 3 * err, (err, err_counts)
