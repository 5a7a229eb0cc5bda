"""Quality checks of a polarisation run (run.json ``quality`` and the console summary).

Each check returns a dict with its measured value(s), the threshold, ``ok`` and a ``message``; a failing check
is reported as a warning by the pipeline, which still writes every output. The checks are built so they can
fail: each measures something the data or the configuration decides (the tests construct a failing and a
passing input for each).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from . import stages as st

OTHER_BASELINE = {"rowcol": "median (or roi with a vacuum region)", "median": "roi (with a vacuum region)",
                  "roi": "median", "none": "median"}


def baseline_check(before_x, before_y, after_x, after_y, baseline: str, warn_fraction: float) -> dict:
    """Fraction of the CoM-field variance the baseline removed: var(C_before - C_after) / var(C_before), x and y
    pooled. A global median removes a constant (fraction 0); 'rowcol' removes everything that is constant
    along scan rows or columns, i.e. most of a field organised in stripe domains along either axis."""
    bx, by = np.asarray(before_x, float), np.asarray(before_y, float)
    dx, dy = bx - np.asarray(after_x, float), by - np.asarray(after_y, float)
    tot = float(bx.var() + by.var())
    frac = float((dx.var() + dy.var()) / tot) if tot > 0 else 0.0
    ok = frac <= warn_fraction
    msg = (f"baseline '{baseline}' removed {100 * frac:.0f}% of the CoM field variance" +
           ("" if ok else f" (> {100 * warn_fraction:.0f}%): it may erase the field itself (e.g. stripe domains "
            f"along the scan axes); unless the scan has drift, try dpc.baseline: {OTHER_BASELINE[baseline]}"))
    return {"baseline": baseline, "removed_variance_fraction": frac, "threshold": warn_fraction, "ok": ok,
            "message": msg}


def symmetrize_pattern(p: np.ndarray, cy: float, cx: float) -> np.ndarray:
    """0.5 (p + p mirrored about the centre) where the mirror lies on the detector; p itself elsewhere (no
    mirror to average with). Removes the deflection of a pattern and keeps everything else."""
    p = np.asarray(p, dtype=np.float64)
    ky, kx = p.shape
    yy, xx = np.indices((ky, kx), dtype=np.float64)
    my, mx = 2.0 * cy - yy, 2.0 * cx - xx
    inside = (my >= 0) & (my <= ky - 1) & (mx >= 0) & (mx <= kx - 1)
    r = st.mirror_bilinear(p, cy, cx)  # = map_coordinates(order=1) where the mirror is on the detector
    return np.where(inside, 0.5 * (p + r), p)


def _com(pattern, gate, cy, cx):
    ky, kx = pattern.shape
    yy, xx = np.indices((ky, kx), dtype=np.float64)
    w = gate * pattern
    s = float(w.sum())
    if s <= 0:
        return None
    return [float((w * (yy - cy)).sum() / s), float((w * (xx - cx)).sum() / s)]


def gate_bias_check(gates, patterns, names, mean_pattern, cy: float, cx: float, warn_px: float,
                    center_warn_px: float) -> dict:
    """Gated CoM (y, x; detector px from the centre) of each cluster's mean pattern, centro-symmetrised about the
    centre, under the CoM gate its frames use (``gates[i]`` with ``patterns[i]``): a pattern without any
    deflection, so a non-zero value is the gate's own bias (a gate not symmetric about the beam). Per cluster,
    because such biases differ between clusters (and may cancel in the global mean) and no baseline removes them.
    Also the raw global mean pattern's CoM within the detector region whose mirror lies on the detector
    (``center_offset_px``): where the beam is relative to the centre used (mean deflection included); a large
    value means a wrong (given) centre."""
    bias = {}
    for name, g, p in zip(names, gates, patterns):
        sym = symmetrize_pattern(p, cy, cx)
        bias[name] = _com(sym, np.asarray(g, float), cy, cx)
    worst = max((max(abs(v[0]), abs(v[1])) for v in bias.values() if v is not None), default=0.0)
    mu = np.asarray(mean_pattern, dtype=np.float64)
    region = st.symmetrize_gate(np.ones_like(mu), cy, cx)
    off = _com(mu, region, cy, cx) or [0.0, 0.0]
    off_abs = float(np.hypot(*off))
    ok_bias, ok_center = worst <= warn_px, off_abs <= center_warn_px
    msgs = []
    if not ok_bias:
        msgs.append(f"gate bias up to {worst:.3f} px (> {warn_px} px) on deflection-free (centro-symmetrised) "
                    "cluster mean patterns: the CoM gates are not symmetric about the beam (templates.symmetrize: "
                    "beam)")
    if not ok_center:
        msgs.append(f"the mean pattern's centre of mass is {off_abs:.2f} px from the beam centre used "
                    f"(> {center_warn_px} px): check calibration.center_y/x (or let it be detected)")
    return {"gate_bias_px": bias, "max_abs_bias_px": float(worst), "threshold_px": warn_px,
            "center_offset_px": off, "center_threshold_px": center_warn_px, "ok": ok_bias and ok_center,
            "message": "; ".join(msgs) or f"gate bias <= {worst:.3f} px; mean pattern {off_abs:.2f} px from centre"}


def auto_temperature(S: np.ndarray) -> float:
    """Softmax temperature scaled to the spread of the scores: the standard deviation of S over all frames
    and clusters (S/tau has unit variance). Well separated clusters then give a mean confidence of about
    0.7-0.9 (two equal clusters with opposite templates: S = +-a, tau = a, p = e^2 / (1 + e^2) = 0.88) and
    unseparated ones stay near chance, so the map says something either way."""
    s = np.asarray(S, dtype=np.float64)
    tau = float(s.std())
    return tau if tau > 0 and np.isfinite(tau) else 1.0


def confidence_from_scores(S: np.ndarray, temp: float) -> np.ndarray:
    """Max softmax probability over clusters of S / temp (S: (n, C))."""
    z = np.asarray(S, dtype=np.float64) / temp
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e.max(axis=1) / e.sum(axis=1)).astype(np.float32)


def confidence_check(conf: np.ndarray, n_clusters: int, temp: float, temp_source: str, saturated: float,
                     flat_margin: float) -> dict:
    """Saturated (mean > ``saturated``: the temperature is too low to say anything) or flat (mean within
    ``flat_margin`` of chance 1/C: the templates do not separate the clusters)."""
    m = float(np.mean(conf))
    chance = 1.0 / n_clusters
    if n_clusters < 2:
        return {"mean": m, "temperature": temp, "temperature_source": temp_source, "ok": True,
                "message": "one cluster: confidence is 1 by construction"}
    sat = m > saturated
    flat = m < chance + flat_margin
    if sat:
        msg = (f"mean confidence {m:.3f} > {saturated}: saturated at softmax_temp {temp:.3g}; "
               "use matched_filter.softmax_temp: auto (or a higher value)")
    elif flat:
        msg = f"mean confidence {m:.3f} is near chance ({chance:.2f}): the templates do not separate the clusters"
    else:
        msg = f"mean confidence {m:.3f} (chance {chance:.2f}, temperature {temp:.3g} from {temp_source})"
    return {"mean": m, "chance_level": chance, "temperature": temp, "temperature_source": temp_source,
            "saturated_above": saturated, "flat_below": chance + flat_margin, "ok": not (sat or flat),
            "message": msg}


def gate_signal_check(coverage: dict) -> dict:
    """Summary of the per-gate ``signal_captured`` (``stages.gate_coverage``): fails if any gate holds little
    of its template's signal."""
    bad = {c: v["signal_captured"] for c, v in coverage.items() if not v.get("ok", True)}
    vals = {c: v.get("signal_captured") for c, v in coverage.items()}
    msg = ("every gate holds most of its template's signal" if not bad else
           "gate(s) " + ", ".join(f"{c} ({100 * v:.0f}%)" for c, v in bad.items()) +
           " hold little of their template's signal: noisy or diffuse templates (check the labels)")
    return {"signal_captured": vals, "ok": not bad, "message": msg}


def _ssim(a, b):
    rng = float(max(a.max(), b.max()) - min(a.min(), b.min()))
    if rng == 0:
        return 1.0
    win = min(7, *a.shape)
    win = win if win % 2 else win - 1
    return float(structural_similarity(a, b, data_range=rng, win_size=win))


def field_split_half_check(ex: np.ndarray, ey: np.ndarray, warn_below: float) -> dict:
    """SSIM (scikit-image) between the field maps of the even and the odd scan columns: two interleaved halves
    of the positions that see the same structure (when it is larger than a scan step) with independent noise.
    Low SSIM: the field maps are dominated by noise."""
    ex, ey = np.asarray(ex, float), np.asarray(ey, float)
    h, w = ex.shape
    w2 = w // 2
    if w2 < 3 or h < 3:
        return {"ssim_ex": None, "ssim_ey": None, "ok": True, "message": "scan too small for a split-half SSIM"}
    sx = _ssim(ex[:, 0:2 * w2:2], ex[:, 1:2 * w2:2])
    sy = _ssim(ey[:, 0:2 * w2:2], ey[:, 1:2 * w2:2])
    ok = min(sx, sy) >= warn_below
    msg = (f"split-half (even/odd columns) field SSIM Ex {sx:.2f}, Ey {sy:.2f}" +
           ("" if ok else f" (< {warn_below}): the field maps are dominated by noise"))
    return {"ssim_ex": sx, "ssim_ey": sy, "threshold": warn_below, "ok": ok, "message": msg}
