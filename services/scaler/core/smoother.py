"""Vectorised 1-D Gaussian smoother identical in definition to DIALS' ``GaussianSmoother``.

DIALS (``dials/algorithms/refinement/gaussian_smoother.h``) evaluates, for a coordinate x, the
normalised coordinate z = (x - x0)/spacing, takes up to ``naverage`` (3) parameter positions around z
and returns value = sum_i w_i v_i / sum_i w_i with w_i = exp(-((z - p_i)/sigma)^2), sigma = 0.65 + 0.05
(naverage - 2). The C++ version builds a sparse matrix row per point; here the same numbers are computed
with numpy on whole arrays (and checked against DIALS in the tests) so 1e8 observations stay cheap.
"""
from __future__ import annotations

import numpy as np


def nparam_to_num_intervals(n_params: int) -> int:
    """DIALS' mapping from the number of smoother parameters to the number of intervals."""
    if n_params < 2:
        raise ValueError(f"a Gaussian smoother needs >= 2 control points, got {n_params}")
    return n_params - 1 if n_params in (2, 3) else n_params - 2


def _iround(x: np.ndarray) -> np.ndarray:
    """boost::math::iround: round half away from zero."""
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


class GaussianSmoother1D:
    """1-D Gaussian smoother over [x_min, x_max] with ``n_params`` control values (DIALS layout)."""

    def __init__(self, x_range: tuple[float, float], n_params: int):
        x0, x1 = float(x_range[0]), float(x_range[1])
        if not x1 > x0:
            raise ValueError(f"smoother range must have x_min < x_max, got {x_range}")
        self.x0, self.x1 = x0, x1
        self.n_intervals = nparam_to_num_intervals(n_params)
        # DIALS: 2 or 3 values on the interval ends; >= 5 values with positions offset by -0.5.
        # DIALS never builds 4 values (2 intervals give 3); we extend its offset layout to 4.
        self.n_values = int(n_params)
        self.spacing = (x1 - x0) / self.n_intervals
        offset = 0.0 if self.n_values < 4 else -0.5
        self.positions = np.arange(self.n_values, dtype=float) + offset
        self.naverage = min(3, self.n_values)
        self.sigma = 0.65 + 0.05 * (self.naverage - 2)

    def control_q(self) -> np.ndarray:
        """Control-point positions in the original coordinate (e.g. |q|, 1/Å)."""
        return self.x0 + self.positions * self.spacing

    def weights(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window start column (n,) and normalised weights (n, naverage): dv/dp_{start+m} = W[:, m].

        Slots outside the DIALS window carry weight 0. Rows sum to 1.
        """
        z = (np.asarray(x, dtype=float) - self.x0) / self.spacing
        na, nv = self.naverage, self.n_values
        if nv <= 3:
            i1 = np.zeros(z.shape, dtype=np.int64)
            i2 = np.full(z.shape, nv, dtype=np.int64)
        else:
            i1 = _iround(z - na / 2.0) + 1
            i2 = i1 + na
            low = i1 < 0
            i1 = np.where(low, 0, i1)
            i2 = np.where(low, np.maximum(2, i2), i2)
            high = i2 > nv
            i2 = np.where(high, nv, i2)
            i1 = np.where(high, np.minimum(i1, nv - 2), i1)
        start = np.minimum(i1, nv - na)  # array columns start..start+na-1 always valid
        w = np.zeros(z.shape + (na,), dtype=float)
        for m in range(na):
            col = start + m
            inside = (col >= i1) & (col < i2)
            ds = (z - self.positions[col]) / self.sigma
            w[..., m] = np.where(inside, np.exp(-ds * ds), 0.0)
        w /= w.sum(axis=-1, keepdims=True)
        return start, w

    def value(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Smoothed value at x for control values ``params``."""
        start, w = self.weights(x)
        p = np.asarray(params, dtype=float)
        cols = start[..., None] + np.arange(self.naverage)
        return (w * p[cols]).sum(axis=-1)

    def dense_derivatives(self, x: np.ndarray) -> np.ndarray:
        """d value / d params as a dense (n, n_values) array (small inputs only)."""
        start, w = self.weights(x)
        out = np.zeros(np.shape(x) + (self.n_values,))
        rows = np.arange(len(start))
        for m in range(self.naverage):
            out[rows, start + m] += w[:, m]
        return out
