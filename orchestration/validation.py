"""Merged diffuse maps judged against planted truth and against each other (demo, tests, benchmarks).

These checks read only the merged NeXus map (``/entry/map``: ``intensity``, ``counts`` and the voxel-centre
axes ``h``, ``k``, ``l``; read through :mod:`diffractflow.formats`, the files' owner) and a truth function evaluated in reciprocal space by the generator; they share no
code with the services whose output they judge.

The truth is a callable ``truth(hkl, ndiv)``: planted intensity averaged over the voxels of width 1/ndiv centred
on the rows of ``hkl`` (n, 3), e.g. ``diff_sim_refiner.datasets.stills.DiffuseTruth.on_voxels``.

- ``sampled_reference``: the truth as the map can see it: the planted intensity at every merged pixel's TRUE
  Miller indices (from the generator's orientation and pixel geometry), averaged per voxel (over its symmetry
  orbit when the map was symmetry-merged) with the merger's weights. A voxel average of the truth would differ
  from what any pipeline measures where the Bragg mask removes a voxel's centre or one still's Ewald sphere cuts
  a voxel off-centre; this reference differs only by the pipeline's own errors (indexing, geometry, corrections,
  background, weighting, scaling, voxelisation).
- ``map_vs_truth``: Pearson CC; the straight-line fit map = a·truth + b over the measured voxels (an offset b
  is what background left in the map looks like); map/(a·truth) per decile of true intensity (a weighting bias
  or a wrong correction bends this curve).
- ``map_ratio_flatness``: two maps of the same crystal (e.g. the same stills at two doses) divided voxel by voxel,
  then the ratio per decile of intensity and per resolution shell, normalised by the overall ratio: flat within
  noise when the pipeline is unbiased at both count levels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np


def read_map(path: str | Path) -> dict:
    """Intensity, counts, voxel-centre axes and standard errors (``intensity_errors``) of a merged map file
    (:mod:`diffractflow.formats.merged_map`)."""
    # h5py and the format readers only when a map is read: the CLI's demo command imports this module
    from diffractflow.formats.merged_map import read_map as read_merged_map

    m = read_merged_map(path, ("intensity", "counts", "sigma", "h", "k", "l"))
    m["intensity_errors"] = m.pop("sigma")
    return m


def voxel_centres(m: dict, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional h, k, l of the voxels selected by ``mask`` (shape of the map)."""
    ih, ik, il = np.nonzero(mask)
    return m["h"][ih], m["k"][ik], m["l"][il]


def subdivisions(m: dict) -> int:
    """Voxels per reciprocal-lattice unit of a map (from its h axis)."""
    return int(round(1.0 / float(m["h"][1] - m["h"][0])))


def _truth_at(truth: Callable, m: dict, h, k, l) -> np.ndarray:
    return np.asarray(truth(np.stack([h, k, l], axis=1), subdivisions(m)), dtype=np.float64)


def _bin_index(x: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.quantile(x, np.linspace(0, 1, n_bins + 1))
    return np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)


def _ratio_by_bins(x: np.ndarray, num: np.ndarray, den: np.ndarray, n_bins: int) -> list[float]:
    """sum(num)/sum(den) in bins of equal population of x."""
    idx = _bin_index(x, n_bins)
    sn = np.bincount(idx, weights=num, minlength=n_bins)
    sd = np.bincount(idx, weights=den, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(v) for v in sn / sd]


def _ratio_errors_by_bins(x: np.ndarray, num: np.ndarray, den: np.ndarray, var_num: np.ndarray,
                          var_den: np.ndarray, n_bins: int) -> list[float]:
    """Relative standard error of sum(num)/sum(den) per bin of :func:`_ratio_by_bins`, from the voxels' own
    variances (independent voxels: counting noise; a background estimate shared by many voxels adds to it)."""
    idx = _bin_index(x, n_bins)
    sn, sd = (np.bincount(idx, weights=v, minlength=n_bins) for v in (num, den))
    vn, vd = (np.bincount(idx, weights=v, minlength=n_bins) for v in (var_num, var_den))
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(v) for v in np.sqrt(vn / sn ** 2 + vd / sd ** 2)]


def laue_rotations(symmetry: str | None) -> np.ndarray:
    """Integer matrices (n_ops, 3, 3) acting on column hkl: the Laue group of ``symmetry`` (identity if None)."""
    if not symmetry:
        return np.eye(3, dtype=np.int64)[None]
    # cctbx (~0.5 s) only when symmetry is applied
    from cctbx import sgtbx

    laue = sgtbx.space_group_info(symmetry).group().build_derived_laue_group()
    return np.array([np.array(op.r().as_double()).reshape(3, 3).T for op in laue.all_ops()]).round().astype(np.int64)


def orbit_keys(idx: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """One int64 key per symmetry orbit of integer voxel indices idx (3, n): the largest equivalent, packed."""
    cand = np.einsum("oij,jn->oin", ops, idx)  # (n_ops, 3, n)
    span = 1 << 20
    key = ((cand[:, 0] + span // 2) * span + (cand[:, 1] + span // 2)) * span + (cand[:, 2] + span // 2)
    return key.max(axis=0)


def sampled_reference(map_path: str | Path, stills: list[dict], truth: Callable, pixel_q: np.ndarray,
                      symmetry: str | None = None) -> np.ndarray:
    """Reference map (shape of the map, NaN where no pixel landed): per voxel orbit, the weighted mean of
    ``truth(h, k, l)`` at the true indices of the merged pixels.

    ``stills``: one dict per merged still: ``table`` (the diffuse-extractor's per-still HDF5, giving each pixel's
    voxel (h, k, l), position (x, y) and exposure weight), ``A`` (the generator's true U B, 1/Angstrom; for a
    rotation frame a list of them across its oscillation, averaged) and
    ``scale`` (the still's scale as merged). ``pixel_q``: true q = s1 - s0 of every pixel (slow, fast, 3).
    """
    # h5py (see read_map)
    from diffractflow.formats.still_table import StillTable

    m = read_map(map_path)
    ndiv = subdivisions(m)
    ops = laue_rotations(symmetry)
    keys_all, wt_all, w_all = [], [], []
    for st in stills:
        with StillTable(st["table"]) as table:  # the merger's weight: the exposure (v4), else 1/sigma^2
            px = table.read_columns(["h", "k", "l", "x", "y", "exposure" if table.has_exposure else "sigma"])
        hkl = np.stack([px[c].astype(np.float64) for c in ("h", "k", "l")])
        x, y = px["x"].astype(np.int64), px["y"].astype(np.int64)
        w = px["exposure"].astype(np.float64) if "exposure" in px else 1.0 / px["sigma"].astype(np.float64) ** 2
        q = pixel_q[y, x]
        As = np.asarray(st["A"], float)  # one U B (a still), or several across a rotation frame's oscillation
        t = 0.0
        for A in (As[None] if As.ndim == 2 else As):
            true_hkl = np.linalg.solve(A, q.T).T
            t = t + np.asarray(truth(true_hkl[:, 0], true_hkl[:, 1], true_hkl[:, 2]), dtype=np.float64)
        t = t / (1 if As.ndim == 2 else len(As))
        k = orbit_keys(np.rint(hkl * ndiv).astype(np.int64), ops)
        u, inv = np.unique(k, return_inverse=True)
        ww = w * float(st.get("scale", 1.0))
        keys_all.append(u)
        wt_all.append(np.bincount(inv, weights=ww * t, minlength=u.size))
        w_all.append(np.bincount(inv, weights=ww, minlength=u.size))
    keys = np.concatenate(keys_all)
    u, inv = np.unique(keys, return_inverse=True)
    swt = np.bincount(inv, weights=np.concatenate(wt_all), minlength=u.size)
    sw = np.bincount(inv, weights=np.concatenate(w_all), minlength=u.size)
    ref = np.full(m["intensity"].shape, np.nan)
    measured = m["counts"] > 0
    ih, ik, il = np.nonzero(measured)
    idx = np.stack([np.rint(m["h"][ih] * ndiv), np.rint(m["k"][ik] * ndiv), np.rint(m["l"][il] * ndiv)]).astype(np.int64)
    vk = orbit_keys(idx, ops)
    pos = np.clip(np.searchsorted(u, vk), 0, u.size - 1)
    found = (u[pos] == vk) & (sw[pos] > 0)
    vals = np.full(vk.size, np.nan)
    vals[found] = swt[pos[found]] / sw[pos[found]]
    ref[ih, ik, il] = vals
    return ref


def map_vs_truth(map_path: str | Path, truth: Callable | np.ndarray, min_count: int = 1, n_bins: int = 10) -> dict:
    """Compare a merged map with the planted truth: ``truth(hkl, ndiv)`` at voxel centres, or a reference array of
    the map's shape (e.g. :func:`sampled_reference`; NaN voxels are left out)."""
    m = read_map(map_path)
    measured = (m["counts"] >= min_count) & np.isfinite(m["intensity"])
    if isinstance(truth, np.ndarray):
        measured &= np.isfinite(truth)
        t = truth[measured].astype(np.float64)
    else:
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
    divided by the overall ratio, with each bin's relative standard error from the maps' own errors.

    Voxels are binned by ``truth(hkl, ndiv)`` when given, else by map a (pass the more precise map as a):
    binning by a noisy map would select its own noise and bend the curve. The weakest bins' ratios are
    noisy (at a few photons per voxel the weakest fifth holds a few % of the map's counts): judge a bin's
    deviation against its error (``*_errors``, ``significance`` = the largest |ratio - 1| / error), not alone.
    """
    # cctbx (see laue_rotations)
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
    out = {"n_voxels": int(both.sum()), "overall_ratio": float(overall), "cc": float(np.corrcoef(ya, yb)[0, 1]),
           "ratio_by_intensity": by_i, "ratio_by_resolution": by_s,
           "flatness": float(max(abs(r - 1.0) for r in by_i + by_s))}
    if a["intensity_errors"] is not None and b["intensity_errors"] is not None:
        va = a["intensity_errors"][both].astype(np.float64) ** 2
        vb = b["intensity_errors"][both].astype(np.float64) ** 2
        err_i = _ratio_errors_by_bins(key, ya, yb, va, vb, n_bins)
        err_s = _ratio_errors_by_bins(np.sqrt(s2), ya, yb, va, vb, n_bins)
        dev = [abs(r - 1.0) / e for r, e in zip(by_i + by_s, err_i + err_s) if e > 0]
        out.update(ratio_errors_by_intensity=err_i, ratio_errors_by_resolution=err_s,
                   significance=float(max(dev)) if dev else float("nan"))
    return out


def recovered_scales(scales_json: str | Path, still_names: Mapping[str, str] | Sequence[str] | None = None
                     ) -> dict[str, float]:
    """Image file name -> recovered scale from a scales file (:mod:`diffractflow.formats.scales`: keyed by still id
    ``<image path>#<index>``). ``still_names`` (the observation table's names, or statistics.json's {index: name})
    is needed only for an old run's scales keyed by table index."""
    # h5py (see read_map)
    from diffractflow.formats.scales import read_scales

    if isinstance(still_names, Mapping):
        still_names = [still_names.get(str(i), str(i)) for i in range(1 + max((int(k) for k in still_names), default=-1))]
    return {Path(k.split("#")[0]).name: v for k, v in read_scales(scales_json, still_names).items()}


def scale_errors(recovered: dict[str, float], planted: dict[str, float]) -> dict:
    """Recovered per-still scales vs planted ones (file name -> scale), both normalised to geometric mean 1."""
    rec, ref = [], []
    for name, value in recovered.items():
        if name in planted:
            rec.append(value)
            ref.append(float(planted[name]))
    if not rec:
        return {"n_scales_compared": 0, "scale_error_max": None, "scale_error_rms": None}
    ratio = np.asarray(rec) / np.asarray(ref)
    ratio /= np.exp(np.mean(np.log(ratio)))
    err = np.abs(ratio - 1.0)
    return {"n_scales_compared": int(err.size), "scale_error_max": float(err.max()),
            "scale_error_rms": float(np.sqrt(np.mean(err ** 2)))}
