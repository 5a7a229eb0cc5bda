"""Interactive calibration by clicking on the mean diffraction pattern (matplotlib).

``pick_center`` and ``pick_kspace`` open a figure, collect clicks through the canvas'
``button_press_event`` and close the figure when enough clicks were made. A ``driver(fig, ax)`` callable
replaces the blocking ``plt.show()``: tests pass one that feeds synthetic mouse events on the Agg backend.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .calibration import kspace_from_clicks


#: driver used when none is passed (None = blocking ``plt.show()``); embedding applications and tests may set it
DEFAULT_DRIVER: Optional[Callable] = None


class ClickCollector:
    """Show an image and collect ``n_clicks`` left clicks as (y, x) data coordinates."""

    def __init__(self, image: np.ndarray, title: str, n_clicks: int, center=None, circles=(), log: bool = False):
        # matplotlib (~0.5 s, and a GUI backend) only when a window is shown: the CLI imports this module
        import matplotlib.pyplot as plt
        from matplotlib.patches import Circle

        self.n_clicks = n_clicks
        self.points: list[tuple[float, float]] = []
        self.fig, self.ax = plt.subplots(figsize=(6, 6))
        img = np.log1p(np.maximum(image, 0)) if log else image
        self.ax.imshow(img, cmap="gray", origin="upper")
        if center is not None:
            cy, cx = center
            self.ax.axhline(cy, color="r", ls="--", lw=0.8)
            self.ax.axvline(cx, color="r", ls="--", lw=0.8)
            self.ax.plot([cx], [cy], "r+", ms=12)
            for r in circles:
                self.ax.add_patch(Circle((cx, cy), r, fill=False, color="c", ls=":", lw=0.8))
        self.ax.set_title(title, fontsize=9)
        self._plt = plt
        self._cid = self.fig.canvas.mpl_connect("button_press_event", self._on_click)

    def _on_click(self, event) -> None:
        if event.inaxes is not self.ax or event.xdata is None or event.button not in (1, None):
            return
        if len(self.points) >= self.n_clicks:
            return
        self.points.append((float(event.ydata), float(event.xdata)))
        self.ax.plot([event.xdata], [event.ydata], "yx", ms=10)
        if len(self.points) >= self.n_clicks:
            self.fig.canvas.mpl_disconnect(self._cid)
            self._plt.close(self.fig)
        else:
            self.fig.canvas.draw_idle()

    def collect(self, driver: Optional[Callable] = None) -> list[tuple[float, float]]:
        driver = driver if driver is not None else DEFAULT_DRIVER
        if driver is not None:
            driver(self.fig, self.ax)
        else:
            import matplotlib  # heavy: see ClickCollector

            backend = matplotlib.get_backend().lower()
            if backend in ("agg", "pdf", "svg", "ps", "cairo", "template") or "inline" in backend:
                self._plt.close(self.fig)
                raise RuntimeError(
                    f"interactive calibration needs a GUI matplotlib backend (current: {backend}); set "
                    "calibration.center_y/center_x or pixel_size_k* in the config instead")
            self._plt.show(block=True)
        self._plt.close(self.fig)
        if len(self.points) < self.n_clicks:
            raise RuntimeError(f"window closed after {len(self.points)} of {self.n_clicks} clicks")
        return self.points


def pick_center(mean_pattern: np.ndarray, auto_center: tuple[float, float], driver=None) -> tuple[float, float]:
    """Click once on the beam centre; the auto-detected centre is shown as red dashed crosshairs."""
    c = ClickCollector(mean_pattern, "click the beam centre (red: auto-detected)", 1, center=auto_center)
    (y, x), = c.collect(driver)
    return y, x


def pick_kspace(mean_pattern: np.ndarray, center: tuple[float, float], known_spacing: float | None = None,
                n_pairs: int = 1, driver=None) -> dict:
    """Click ``n_pairs`` pairs of opposite Bragg peaks (180 deg apart); returns ``kspace_from_clicks``."""
    shp = np.array(mean_pattern.shape)
    rmax = 0.5 * shp.min()
    circles = [rmax * f for f in (0.25, 0.5, 0.75)]
    c = ClickCollector(mean_pattern, f"click {n_pairs} pair(s) of opposite Bragg peaks (log scale)",
                       2 * n_pairs, center=center, circles=circles, log=True)
    pts = c.collect(driver)
    return kspace_from_clicks(pts, center[0], center[1], known_spacing)


def click_driver(points_yx: list[tuple[float, float]]):
    """A driver that clicks the given data points (y, x) through the canvas' event system (no GUI needed)."""
    from matplotlib.backend_bases import MouseEvent  # heavy: see ClickCollector

    def drive(fig, ax):
        fig.canvas.draw()
        for y, x in points_yx:
            if not fig.canvas.figure.axes:  # closed after the last needed click
                break
            px, py = ax.transData.transform((x, y))
            ev = MouseEvent("button_press_event", fig.canvas, px, py, button=1)
            fig.canvas.callbacks.process("button_press_event", ev)

    return drive
