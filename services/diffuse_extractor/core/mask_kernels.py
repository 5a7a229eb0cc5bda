"""Numba kernels of the Bragg mask (``masks.paint_disks``): the same float64 arithmetic as the numpy path.

``paint_disks_panel`` sets a bit on every pixel whose centre lies within ``radius`` px of a spot centre:
per spot the (2r + 3)^2 square of pixels around ``floor(centre)`` is tested with
``(px + 0.5 - cx)^2 + (py + 0.5 - cy)^2 <= radius^2``, operation by operation as the numpy path does it,
so the flags are identical (tests compare both). It writes into the panel's flags in place and makes no
temporaries (the numpy path builds spots x (2r + 3)^2 index arrays: ~15 ms for 5000 spots on a 6M panel,
this ~1 ms). Disabled together with the other kernels (``kernels.enabled()``).
"""
from __future__ import annotations

import numpy as np

from . import kernels

if kernels.available():
    from .kernels import _jit

    @_jit
    def paint_disks_panel(f, cx, cy, r, radius, bit):
        """OR ``bit`` into ``f`` (ny, nx uint8) within ``radius`` px of each (cx, cy); ``r = ceil(radius)``."""
        ny, nx = f.shape
        rr = radius * radius
        for i in range(cx.shape[0]):
            x0 = np.floor(cx[i])
            y0 = np.floor(cy[i])
            for oy in range(-r - 1, r + 2):
                py = y0 + oy
                if not (py >= 0 and py < ny):
                    continue
                dy = py + 0.5 - cy[i]
                for ox in range(-r - 1, r + 2):
                    px = x0 + ox
                    if not (px >= 0 and px < nx):
                        continue
                    dx = px + 0.5 - cx[i]
                    if dx * dx + dy * dy <= rr:
                        f[int(py), int(px)] |= bit


def enabled() -> bool:
    return kernels.enabled()


def warm_up() -> bool:
    """Load the kernels (disk cache, else compile) with the argument types ``masks.paint_disks`` uses."""
    if not enabled():
        return False
    paint_disks_panel(np.zeros((4, 4), np.uint8), np.ones(1), np.ones(1), 1, 1.0, np.uint8(1))
    return True
