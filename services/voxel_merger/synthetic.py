"""Synthetic stills for tests, demos and benchmarks: a detector raster on the Ewald sphere.

Observations follow a planted intensity function f(h, k, l): I = b·(f + ε·σ₀), σ = b·σ₀,
with b the still's multiplicative scale (I_obs ≈ b·I_ref) and ε standard normal.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from cctbx import uctbx

from .core.grid import CrystalModel
from .core.sources import ArrayStill

__all__ = ["B_matrix", "random_rotation", "synthetic_still"]


def B_matrix(unit_cell) -> np.ndarray:
    """Reciprocal basis (columns a*, b*, c*, 1/Å) of a cell: the transposed cctbx fractionalization matrix."""
    F = np.array(uctbx.unit_cell(tuple(unit_cell)).fractionalization_matrix()).reshape(3, 3)
    return F.T


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a*a + b*b - c*c - d*d, 2*(b*c - a*d), 2*(b*d + a*c)],
                     [2*(b*c + a*d), a*a - b*b + c*c - d*d, 2*(c*d - a*b)],
                     [2*(b*d - a*c), 2*(c*d + a*b), a*a - b*b - c*c + d*d]])


def synthetic_still(still_id: str, unit_cell, func: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                    rng: np.random.Generator, space_group: str = "P 1", n_side: int = 200,
                    wavelength: float = 1.0, distance: float = 100.0, pixel: float = 0.5,
                    sigma0: float | Callable = 1.0, scale: float = 1.0, U: np.ndarray | None = None,
                    cell_jitter: float = 0.0) -> ArrayStill:
    """One still of n_side² pixels (flat detector normal to the beam, distance and pixel in mm)."""
    uc = np.array(unit_cell, dtype=float)
    if cell_jitter:
        uc[:3] *= 1.0 + cell_jitter * rng.normal(size=3)
    U = random_rotation(rng) if U is None else U
    A = U @ B_matrix(uc)
    y, x = np.mgrid[0:n_side, 0:n_side]
    X = (x.ravel() - n_side / 2 + 0.5) * pixel
    Y = (y.ravel() - n_side / 2 + 0.5) * pixel
    r = np.sqrt(X * X + Y * Y + distance * distance)
    s = np.stack([X / r, Y / r, distance / r - 1.0], axis=1) / wavelength  # s1 - s0, 1/Å
    hkl = s @ np.linalg.inv(A).T
    h, k, l = (np.ascontiguousarray(hkl[:, i]) for i in range(3))
    truth = func(h, k, l)
    sig0 = sigma0(truth) if callable(sigma0) else np.full(truth.shape, float(sigma0))
    I = scale * (truth + rng.normal(size=truth.shape) * sig0)
    crystal = CrystalModel(tuple(float(v) for v in uc), space_group, tuple(tuple(float(v) for v in row) for row in A))
    return ArrayStill(still_id, h, k, l, I, scale * sig0, np.linalg.norm(s, axis=1), crystal)
