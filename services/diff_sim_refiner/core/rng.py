"""nanoBragg's random-number generator and mosaic-domain sampling, reproduced bit for bit.

nanoBragg draws mosaic domains with the Park-Miller minimal-standard generator with a
Bays-Durham shuffle table (the "ran1" of Numerical Recipes), returning single-precision floats.
Each domain takes three uniform deviates r1, r2, r3 in [-1, 1]: a rotation axis on the unit
sphere (from r1, r2) and an angle ``spread * (1 - r3^2)^(1/3)`` (uniform in a ball of
rotations).  Domain 0 is forced to the identity after its deviates are drawn, so a given
``-mosaic_seed`` gives the same domains here as in the C program.

The deviates are returned as constants; the rotation angles stay proportional to the
(differentiable) mosaic spread, so gradients with respect to the spread are exact.
"""
from __future__ import annotations

import math

import numpy as np

_IA = 16807
_IM = 2147483647
_AM = 1.0 / _IM
_IQ = 127773
_IR = 2836
_NTAB = 32
_NDIV = 1 + (_IM - 1) // _NTAB
_RNMX = 1.0 - 1.2e-7


def _c_div(a: int, b: int) -> int:
    """C integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


class Ran1:
    """Minimal-standard generator with shuffle table; ``idum`` as in nanoBragg (negative re-seeds).

    nanoBragg turns ``-mosaic_seed S`` into ``idum = -S``; pass that ``idum`` here (or use
    :meth:`from_seed`).
    """

    def __init__(self, idum: int):
        self.idum = int(idum)
        self.iy = 0
        self.iv = [0] * _NTAB

    @classmethod
    def from_seed(cls, seed: int) -> "Ran1":
        return cls(-int(seed))

    def _step(self) -> None:
        k = _c_div(self.idum, _IQ)
        self.idum = _IA * (self.idum - k * _IQ) - _IR * k
        if self.idum < 0:
            self.idum += _IM

    def __call__(self) -> float:
        if self.idum <= 0 or not self.iy:
            self.idum = 1 if -self.idum < 1 else -self.idum
            for j in range(_NTAB + 7, -1, -1):
                self._step()
                if j < _NTAB:
                    self.iv[j] = self.idum
            self.iy = self.iv[0]
        self._step()
        j = self.iy // _NDIV
        self.iy = self.iv[j]
        self.iv[j] = self.idum
        temp = float(np.float32(_AM * self.iy))  # the C code stores the deviate in a float
        if temp > _RNMX:
            return float(np.float32(_RNMX))
        return temp


def mosaic_deviates(rng: Ran1) -> tuple[np.ndarray, float]:
    """One domain's draw: unit rotation axis (3,) and angle factor g, angle = spread * g."""
    r1 = 2.0 * rng() - 1.0
    r2 = 2.0 * rng() - 1.0
    r3 = 2.0 * rng() - 1.0
    xyrad = math.sqrt(1.0 - r2 * r2)
    # nanoBragg: rot = (float)mosaicity * powf(1 - r3^2, 1/3); keep the single-precision factor
    g = float(np.float32(np.float32(1.0 - r3 * r3) ** np.float32(1.0 / 3.0)))
    axis = np.array([xyrad * math.sin(math.pi * r1), xyrad * math.cos(math.pi * r1), r2], dtype=np.float64)
    return axis, g


def mosaic_domain_axes(n_domains: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Axes (n, 3) and angle factors (n,) of nanoBragg's mosaic domains for ``-mosaic_seed seed``.

    Domain 0 is the identity (factor 0), exactly as nanoBragg overwrites its first matrix.
    """
    rng = Ran1.from_seed(seed)
    axes = np.zeros((n_domains, 3))
    factors = np.zeros(n_domains)
    for i in range(n_domains):
        axis, g = mosaic_deviates(rng)
        if i == 0:
            axes[i] = (0.0, 0.0, 1.0)
            factors[i] = 0.0
        else:
            axes[i] = axis
            factors[i] = g
    return axes, factors


def axis_angle_matrix_np(axis: np.ndarray, angle: float) -> np.ndarray:
    """Right-handed rotation matrix about a unit axis (numpy, for constants)."""
    x, y, z = axis
    c, s = math.cos(angle), math.sin(angle)
    t = 1.0 - c
    return np.array([
        [c + t * x * x, t * x * y - s * z, t * x * z + s * y],
        [t * x * y + s * z, c + t * y * y, t * y * z - s * x],
        [t * x * z - s * y, t * y * z + s * x, c + t * z * z],
    ])


def umat_to_misset(u: np.ndarray) -> tuple[float, float, float]:
    """Rotation matrix -> (rotx, roty, rotz) radians such that R = Rz Ry Rx (nanoBragg's umat2misset)."""
    u = np.asarray(u, dtype=np.float64)
    if u[2, 0] * u[2, 0] < 1.0:
        rotx = math.atan2(u[2, 1], u[2, 2])
        roty = math.atan2(-u[2, 0], math.sqrt(u[2, 1] ** 2 + u[2, 2] ** 2))
        rotz = math.atan2(u[1, 0], u[0, 0])
    else:
        rotx = math.pi
        roty = math.pi / 2
        rotz = math.atan2(u[0, 1], -u[1, 1])
    return rotx, roty, rotz


def random_misset_deg(seed: int) -> tuple[float, float, float]:
    """nanoBragg's ``-misset random`` orientation for ``-misset_seed seed`` (degrees).

    nanoBragg calls its cap sampler with ``90.0`` (interpreted as radians), reproduced as is.
    """
    rng = Ran1.from_seed(seed)
    axis, g = mosaic_deviates(rng)
    rot = float(np.float32(np.float32(90.0) * np.float32(g)))
    u = axis_angle_matrix_np(axis, rot)
    return tuple(math.degrees(a) for a in umat_to_misset(u))


__all__ = ["Ran1", "mosaic_domain_axes", "mosaic_deviates", "random_misset_deg", "umat_to_misset",
           "axis_angle_matrix_np"]
