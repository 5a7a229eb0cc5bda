"""Merged diffuse maps judged against planted truth and against each other (demo, tests, benchmarks).

These checks read only the merged NeXus map (``/entry/map``: ``intensity``, ``counts`` and the voxel-centre
axes ``h``, ``k``, ``l``) and a truth function evaluated in reciprocal space by the generator; they share no
code with the services whose output they judge.

The truth is a callable ``truth(hkl, ndiv)``: planted intensity averaged over the voxels of width 1/ndiv centred
on the rows of ``hkl`` (n, 3), e.g. ``diff_sim_refiner.datasets.stills.DiffuseTruth.on_voxels``.

- ``map_vs_truth``: Pearson CC; the straight-line fit map = a·truth + b over the measured voxels (an offset b
  is what background left in the map looks like); map/(a·truth) per decile of true intensity (a weighting bias
  or a wrong correction bends this curve).
- ``map_ratio_flatness``: two maps of the same crystal (e.g. the same stills at two doses) divided voxel by voxel,
  then the ratio per decile of intensity and per resolution shell, normalised by the overall ratio: flat within
  noise when the pipeline is unbiased at both count levels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def read_map(path: str | Path) -> dict:
    """Intensity, counts and voxel-centre axes of a merged map file."""
    import h5py

    with h5py.File(path, "r") as f:
        g = f["entry/map"]
        return {"intensity": g["intensity"][()], "counts": g["counts"][()],
                "h": g["h"][()], "k": g["k"][()], "l": g["l"][()]}


def voxel_centres(m: dict, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional h, k, l of the voxels selected by ``mask`` (shape of the map)."""
    ih, ik, il = np.nonzero(mask)
    return m["h"][ih], m["k"][ik], m["l"][il]


def subdivisions(m: dict) -> int:
    """Voxels per reciprocal-lattice unit of a map (from its h axis)."""
    return int(round(1.0 / float(m["h"][1] - m["h"][0])))


def _truth_at(truth: Callable, m: dict, h, k, l) -> np.ndarray:
    return np.asarray(truth(np.stack([h, k, l], axis=1), subdivisions(m)), dtype=np.float64)


def _ratio_by_bins(x: np.ndarray, num: np.ndarray, den: np.ndarray, n_bins: int) -> list[float]:
    """sum(num)/sum(den) in bins of equal population of x."""
    edges = np.quantile(x, np.linspace(0, 1, n_bins + 1))
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    sn = np.bincount(idx, weights=num, minlength=n_bins)
    sd = np.bincount(idx, weights=den, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(v) for v in sn / sd]


def map_vs_truth(map_path: str | Path, truth: Callable, min_count: int = 1, n_bins: int = 10) -> dict:
    """Compare a merged map with the planted truth ``truth(hkl, ndiv)``."""
    m = read_map(map_path)
    measured = (m["counts"] >= min_count) & np.isfinite(m["intensity"])
    h, k, l = voxel_centres(m, measured)
    t = _truth_at(truth, m, h, k, l)
    y = m["intensity"][measured].astype(np.float64)
    a, b = np.polyfit(t, y, 1)
    ratio = _ratio_by_bins(t, y, a * t, n_bins)
    return {
        "n_voxels": int(measured.sum()),
        "cc": float(np.corrcoef(t, y)[0, 1]),
        "slope": float(a),
        "offset": float(b),
        "offset_fraction_of_mean": float(b / y.mean()),
        "ratio_by_truth_decile": ratio,
        "ratio_flatness": float(max(abs(r - 1.0) for r in ratio)),
    }


def map_ratio_flatness(map_a: str | Path, map_b: str | Path, unit_cell, min_count: int = 1, n_bins: int = 8,
                       truth: Callable | None = None) -> dict:
    """Ratio of two maps on the same grid (sum a / sum b) per intensity bin and per resolution shell, each
    divided by the overall ratio.

    Voxels are binned by ``truth(hkl, ndiv)`` when given, else by map a (pass the more precise map as a):
    binning by a noisy map would select its own noise and bend the curve.
    """
    from cctbx import uctbx

    a, b = read_map(map_a), read_map(map_b)
    if a["intensity"].shape != b["intensity"].shape:
        raise ValueError(f"{map_a} and {map_b} are on different grids")
    both = ((a["counts"] >= min_count) & (b["counts"] >= min_count)
            & np.isfinite(a["intensity"]) & np.isfinite(b["intensity"]))
    ya = a["intensity"][both].astype(np.float64)
    yb = b["intensity"][both].astype(np.float64)
    overall = ya.sum() / yb.sum()
    h, k, l = voxel_centres(a, both)
    uc = uctbx.unit_cell(tuple(unit_cell))
    g = uc.reciprocal_metrical_matrix()  # (a*², b*², c*², a*·b*, a*·c*, b*·c*)
    s2 = (g[0] * h * h + g[1] * k * k + g[2] * l * l + 2 * (g[3] * h * k + g[4] * h * l + g[5] * k * l))
    key = _truth_at(truth, a, h, k, l) if truth is not None else ya
    by_i = [r / overall for r in _ratio_by_bins(key, ya, yb, n_bins)]
    by_s = [r / overall for r in _ratio_by_bins(np.sqrt(s2), ya, yb, n_bins)]
    return {"n_voxels": int(both.sum()), "overall_ratio": float(overall), "cc": float(np.corrcoef(ya, yb)[0, 1]),
            "ratio_by_intensity": by_i, "ratio_by_resolution": by_s,
            "flatness": float(max(abs(r - 1.0) for r in by_i + by_s))}


def scale_errors(scales_json: str | Path, still_names: dict[str, str], planted: dict[str, float]) -> dict:
    """Recovered per-still scales vs planted ones (file name -> scale), both normalised to geometric mean 1.

    ``still_names`` maps the keys of scales.json to the merger's still ids (``<image path>#<index>``).
    """
    import json

    scales = json.loads(Path(scales_json).read_text())
    scales = scales.get("scales", scales)
    rec, ref = [], []
    for key, value in scales.items():
        name = Path(str(still_names.get(key, key)).split("#")[0]).name
        if name in planted:
            rec.append(float(value))
            ref.append(float(planted[name]))
    if not rec:
        return {"n_scales_compared": 0, "scale_error_max": None, "scale_error_rms": None}
    ratio = np.asarray(rec) / np.asarray(ref)
    ratio /= np.exp(np.mean(np.log(ratio)))
    err = np.abs(ratio - 1.0)
    return {"n_scales_compared": int(err.size), "scale_error_max": float(err.max()),
            "scale_error_rms": float(np.sqrt(np.mean(err ** 2)))}
