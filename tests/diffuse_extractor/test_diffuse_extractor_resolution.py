"""d_min: only the pixels a run's map can use are extracted (the rest flagged RESOLUTION), checked against
dxtbx's own resolution of each pixel and against the whole-detector extraction."""
from __future__ import annotations

import numpy as np

from diffuse_extractor import ExtractionParams, MaskBit, extract_still


def _d_of_pixels(experiment, panel: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dxtbx's resolution (Å) at each pixel centre."""
    p, s0 = experiment.detector[panel], experiment.beam.get_s0()
    return np.array([p.get_resolution_at_pixel(s0, (float(a) + 0.5, float(b) + 0.5)) for a, b in zip(x, y)])


def test_d_min_keeps_exactly_the_pixels_inside_the_limit(synthetic_still):
    s = synthetic_still
    base = dict(beamstop="none", bragg_delpsi_max=0.003)
    full = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(**base))
    t_full = full.table
    rng = np.random.default_rng(3)
    # a limit through the middle of the pixels' resolution range: both sides well populated
    sample = rng.choice(len(t_full["x"]), 4000, replace=False)
    d_sample = np.concatenate([_d_of_pixels(s.experiment, p, t_full["x"][sample][t_full["panel"][sample] == p],
                                            t_full["y"][sample][t_full["panel"][sample] == p]) for p in (0, 1)])
    d_min = float(np.median(d_sample))
    cut = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(**base, d_min=d_min))
    t = cut.table
    assert 0.3 < len(t["x"]) / len(t_full["x"]) < 0.7
    assert cut.info["n_masked_resolution"] > 0.3 * cut.info["n_pixels_total"]
    for p in (0, 1):
        # every kept pixel is inside the limit, every full-table pixel inside it is kept, with the same values
        sel_full = t_full["panel"] == p
        d_full = _d_of_pixels(s.experiment, p, t_full["x"][sel_full], t_full["y"][sel_full])
        inside = d_full >= d_min * (1 + 1e-6)
        boundary = np.abs(d_full / d_min - 1) < 1e-6  # float32 unit vectors: undecided within 1e-6
        keys_full = (t_full["y"][sel_full] * 100000 + t_full["x"][sel_full])
        sel = t["panel"] == p
        keys = t["y"][sel] * 100000 + t["x"][sel]
        assert set(keys_full[inside]) <= set(keys) <= set(keys_full[inside | boundary])
        order_full = {k: i for i, k in enumerate(keys_full)}
        idx = np.array([order_full[k] for k in keys])
        np.testing.assert_array_equal(t["intensity"][sel], t_full["intensity"][sel_full][idx])
        np.testing.assert_array_equal(t["sigma"][sel], t_full["sigma"][sel_full][idx])
        # and the flagged pixels are the ones beyond it
        ys, xs = np.nonzero(cut.flags[p] & np.uint8(MaskBit.RESOLUTION))
        pick = rng.choice(len(xs), min(500, len(xs)), replace=False)
        assert (_d_of_pixels(s.experiment, p, xs[pick], ys[pick]) < d_min * (1 + 1e-6)).all()
