"""Rotation frames, one per job (issue 17): a one-image rotation experiment built by dxtbx from the frame's own
CBF header (its scan: the frame's oscillation) with the sweep's crystal. The extractor must give each pixel the
h, k, l of that frame (checked against the planted integer indices of the rendered spots, at the positions of
DIALS' own ``ScanStaticReflectionPredictor``), and mask Bragg spots at the frame's rotation predictions."""
from __future__ import annotations

import numpy as np
import pytest

from diffuse_extractor import ExtractionParams, extract_still
from diffuse_extractor.artifacts import read_image
from diffuse_extractor.core.masks import MaskBit

FRAMES = 4
OSC = 0.5
D_MIN = 2.0


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from stills_processor.synthetic import write_rotation_sequence

    import shutil

    tmp = tmp_path_factory.mktemp("sweep")
    seq = write_rotation_sequence(tmp, n_frames=FRAMES, osc_deg=OSC, size=512, distance_mm=120.0, d_min=D_MIN,
                                  background=5.0, seed=7)
    # as landed files under new names (dxtbx keeps the generator's first, header-only version of a path open)
    seq.paths = [shutil.copyfile(p, tmp / f"frame_{i + 1:04d}.cbf") for i, p in enumerate(seq.paths)]
    return seq


def _frame(sweep, f):
    """The frame's own one-image rotation experiment (dxtbx, from its header) with the planted crystal."""
    from dxtbx.model import Crystal
    from dxtbx.model.experiment_list import ExperimentListFactory

    e = ExperimentListFactory.from_filenames([str(sweep.paths[f])])[0]
    real = np.linalg.inv(sweep.A)
    e.crystal = Crystal(tuple(real[0]), tuple(real[1]), tuple(real[2]), space_group_symbol=sweep.space_group)
    assert len(e.imageset) == 1 and e.scan.get_oscillation() == pytest.approx((f * OSC, OSC))
    return e


def _predictions(e):
    """DIALS' rotation predictions for the frame (ScanStaticReflectionPredictor over its one-image scan)."""
    from dials.algorithms.spot_prediction import ScanStaticReflectionPredictor

    t = ScanStaticReflectionPredictor(e, dmin=D_MIN).for_ub(e.crystal.get_A())
    hkl = np.asarray(t["miller_index"].as_vec3_double()).reshape(-1, 3)
    x, y, z = (np.asarray(c) for c in t["xyzcal.px"].parts())
    keep = ~np.asarray(e.crystal.get_space_group().is_sys_absent(t["miller_index"]), dtype=bool)
    return hkl[keep], x[keep], y[keep], z[keep]


@pytest.mark.parametrize("f", [0, 3])
def test_rotation_frame_pixels_get_the_planted_hkl(sweep, f, tmp_path):
    """At the pixel under each DIALS-predicted spot centre whose rotation angle is near the frame's middle, the
    extractor's fractional h, k, l is the planted integer index (within the pixel's and half-frame's extent),
    and the brightest pixel of each such spot (the rendered peak) rounds to it."""
    e = _frame(sweep, f)
    data, fmask = read_image(e, 0)
    # a tiny Bragg disk and no outlier mask: the spot pixels stay in the table
    res = extract_still(e, data, None, params=ExtractionParams(beamstop="none", outlier_nsigma=None,
                                                               bragg_radius_px=0.01), format_mask=fmask)
    t = res.table
    ny, nx = data[0].shape
    row = np.full(ny * nx, -1)
    row[t["y"].astype(int) * nx + t["x"].astype(int)] = np.arange(len(res))
    hkl, x, y, z = _predictions(e)
    mid = (np.abs(z - (f + 0.5)) < 0.15) & (x > 3) & (x < nx - 3) & (y > 3) & (y < ny - 3)
    assert mid.sum() >= 8
    frac = np.stack([t["h"], t["k"], t["l"]], axis=1)
    checked = 0
    for (h, k, l), xx, yy in zip(hkl[mid], x[mid], y[mid]):
        r = row[int(yy) * nx + int(xx)]
        assert r >= 0
        np.testing.assert_allclose(frac[r], (h, k, l), atol=0.08)
        # the rendered peak: the brightest pixel of the 5 x 5 box around the prediction
        box = data[0][int(yy) - 2:int(yy) + 3, int(xx) - 2:int(xx) + 3]
        by, bx = np.unravel_index(np.argmax(box), box.shape)
        if box.max() > 60:  # well above the 5-count background
            rb = row[(int(yy) - 2 + by) * nx + int(xx) - 2 + bx]
            assert tuple(np.rint(frac[rb]).astype(int)) == (h, k, l)
            checked += 1
    assert checked >= 5
    assert res.setting_matrix is not None and "mid-angle" in res.info["rotation"]
    assert res.info["lorentz_applied"] is False  # Lorentz stays off by default
    assert np.all(np.asarray(t["lorentz"]) == 1.0)
    # the artifact records the frame's rotation angle (header: Start_angle f * OSC, Angle_increment OSC)
    import h5py

    from diffuse_extractor.artifacts import write_still

    path = write_still(tmp_path / "frame.h5", res, e, parameters={}, inputs={})
    with h5py.File(path, "r") as h5:
        assert h5["entry"].attrs["phi_deg"] == pytest.approx((f + 0.5) * OSC)
        np.testing.assert_allclose(h5["entry"].attrs["phi_range_deg"], [f * OSC, (f + 1) * OSC])


def test_rotation_frame_bragg_mask_follows_the_frames_predictions(sweep):
    """The Bragg mask of a frame covers its rendered spots (rotation prediction over the frame's oscillation),
    and every spot DIALS predicts in the frame; pixels far from all spots stay unmasked."""
    f = 3
    e = _frame(sweep, f)
    data, fmask = read_image(e, 0)
    res = extract_still(e, data, None, params=ExtractionParams(beamstop="none", outlier_nsigma=None),
                        format_mask=fmask)
    bragg = (res.flags[0] & MaskBit.BRAGG) != 0
    assert res.info["prediction"].startswith("rotation")
    strong = data[0] > 40  # > 15 sigma above the 5-count background: rendered spot pixels
    assert strong.sum() > 100
    assert bragg[strong].mean() > 0.98
    _, x, y, z = _predictions(e)
    inside = (z >= f) & (z < f + 1)
    assert inside.sum() > 20 and bragg[y[inside].astype(int), x[inside].astype(int)].all()
    assert bragg.mean() < 0.25  # disks at the frame's own spots (many on this small, close detector), not all
