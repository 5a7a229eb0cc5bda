"""Interactive calibration driven by synthetic mouse events on the Agg backend."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from stem_polar.core import interactive as it  # noqa: E402


def test_pick_center_click(scan):
    mean = scan["data"].reshape(-1, 32, 32).mean(axis=0)
    y, x = it.pick_center(mean, (15.5, 16.0), driver=it.click_driver([(14.25, 17.75)]))
    assert y == pytest.approx(14.25, abs=0.02) and x == pytest.approx(17.75, abs=0.02)


def test_pick_kspace_two_pairs_anisotropic():
    img = np.zeros((128, 128))
    pts = [(64, 39), (64, 89), (44, 64), (84, 64)]  # dx = 50 px, dy = 40 px for g = 0.5 1/Å (d = 2 Å)
    res = it.pick_kspace(img, (64, 64), known_spacing=2.0, n_pairs=2, driver=it.click_driver(pts))
    assert res["pixel_size_kx"] == pytest.approx(1.0 / 50, rel=2e-3)
    assert res["pixel_size_ky"] == pytest.approx(1.0 / 40, rel=2e-3)
    assert len(res["pairs"]) == 2


def test_clicks_outside_axes_are_ignored_and_too_few_clicks_error():
    from matplotlib.backend_bases import MouseEvent

    def driver(fig, ax):
        fig.canvas.draw()
        ev = MouseEvent("button_press_event", fig.canvas, 1, 1, button=1)  # figure corner, outside the image
        fig.canvas.callbacks.process("button_press_event", ev)

    with pytest.raises(RuntimeError, match="0 of 1 clicks"):
        it.pick_center(np.ones((16, 16)), (8, 8), driver=driver)


def test_no_gui_backend_without_driver_is_a_clear_error():
    with pytest.raises(RuntimeError, match="GUI matplotlib backend"):
        it.pick_center(np.ones((16, 16)), (8, 8))


def test_kspace_calibration_updates_config_unless_explicit(scan):
    from stem_polar.cli import apply_kspace_calibration
    from stem_polar.core.config import PolarConfig
    from stem_polar.core.pipeline import PolarPipeline
    from stem_polar.core.source import ArraySource

    clicks = [(15.0, 5.0), (15.0, 27.0)]  # 22 px apart -> radius 11 px
    pipe = PolarPipeline(ArraySource(scan["data"]), scan["labels"])
    pipe.prepare()
    res = apply_kspace_calibration(pipe, None, 1, driver=it.click_driver(clicks))
    assert res["applied"] and pipe.cfg.calibration.kx == pytest.approx(1 / 11, rel=1e-2)  # relative: r -> 1
    assert pipe.cfg.calibration.k_units == "relative"
    cfg = PolarConfig.model_validate({"calibration": {"pixel_size_kx": 0.5, "pixel_size_ky": 0.4}})
    pipe = PolarPipeline(ArraySource(scan["data"]), scan["labels"], cfg)
    pipe.prepare()
    res = apply_kspace_calibration(pipe, 2.0, 1, driver=it.click_driver(clicks))
    assert not res["applied"] and pipe.cfg.calibration.kx == 0.5 and pipe.cfg.calibration.ky == 0.4
    assert res["pixel_size_k"] == pytest.approx(2 * 0.5 / 22, rel=1e-2)  # still computed and logged
