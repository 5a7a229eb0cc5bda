"""Global reciprocal-space grid: average crystal model and fractional-hkl voxelisation.

Every still's pixels arrive as fractional Miller indices computed through that still's
own orientation matrix, so all stills already share one reciprocal lattice basis once
they are in a common setting.  The grid subdivides each unit of h, k and l into
``ndiv`` (odd) sub-voxels so integer reflections sit at voxel centres (as in mdx2).
The average cell only sets the metric (|s| of a voxel, resolution shells, bounds)
and the symmetry used for merging.

Conventions: ``s = A h`` with A the DIALS reciprocal orientation matrix (1/Å), and
|s| = 1/d (Å⁻¹).
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from cctbx import crystal, sgtbx, uctbx

from .params import DEFAULTS

__all__ = [
    "CrystalModel",
    "GlobalGrid",
    "average_crystal_model",
    "build_grid",
    "grid_from_spec",
    "reindex_to_reference",
    "s_max_of_hkl",
]


@dataclass(frozen=True)
class CrystalModel:
    """One still's crystal model: unit cell (Å, degrees), space group symbol, optional A matrix (1/Å)."""

    unit_cell: tuple[float, float, float, float, float, float]
    space_group: str = "P 1"
    A_matrix: tuple[tuple[float, ...], ...] | None = None

    @staticmethod
    def from_A(A: np.ndarray, space_group: str = "P 1") -> "CrystalModel":
        """Build from a reciprocal orientation matrix A = U B (columns a*, b*, c* in 1/Å)."""
        A = np.asarray(A, dtype=float).reshape(3, 3)
        # reciprocal metric G* = A^T A; the direct cell follows from its inverse
        gstar = A.T @ A
        uc = uctbx.unit_cell(metrical_matrix=_sym6(np.linalg.inv(gstar)))
        return CrystalModel(tuple(float(x) for x in uc.parameters()), space_group,
                            tuple(tuple(float(x) for x in row) for row in A))


def _sym6(g: np.ndarray) -> tuple[float, ...]:
    """3x3 symmetric matrix -> cctbx metrical-matrix order (g11, g22, g33, g12, g13, g23)."""
    return (float(g[0, 0]), float(g[1, 1]), float(g[2, 2]),
            float(g[0, 1]), float(g[0, 2]), float(g[1, 2]))


def reindex_to_reference(model: CrystalModel):
    """Change-of-basis operator (cctbx) taking this still's setting to the reference setting of its space group."""
    crystal.symmetry(unit_cell=model.unit_cell, space_group_symbol=model.space_group)  # checks the cell fits
    return _cb_op_to_reference(model.space_group)


@functools.lru_cache(maxsize=64)
def _cb_op_to_reference(space_group: str):
    """The space group's change of basis to its reference setting (cctbx; its type look-up is ~1 ms, so a
    worker does it once per symbol, not once per still)."""
    return sgtbx.space_group_info(space_group).type().cb_op()


@functools.lru_cache(maxsize=64)
def _group_and_symbol(space_group: str, to_reference_setting: bool):
    """(cctbx space group, its symbol) of ``space_group``, in its reference setting if asked."""
    sgi = sgtbx.space_group_info(space_group)
    if to_reference_setting:
        sgi = sgi.reference_setting()
    return sgi.group(), str(sgi)


def hkl_change_of_basis_matrix(cb_op) -> np.ndarray:
    """3x3 matrix M with h_new = h_old @ M for row vectors of (fractional) Miller indices.

    cctbx applies a change of basis to Miller indices as h' = h · c_inv.r (row vector).
    """
    return np.array(cb_op.c_inv().r().as_double(), dtype=float).reshape(3, 3)


def average_crystal_model(models: Sequence[CrystalModel], space_group: str | None = None,
                          to_reference_setting: bool = True) -> tuple[CrystalModel, list]:
    """Average unit cell of many stills, symmetrised by the space group (cctbx).

    Each cell is first taken to the reference setting of its space group; the average is
    the cell of the mean metrical matrix (so it is well defined for triclinic cells) and is
    then symmetrised with ``space_group.average_unit_cell``.  Returns the average model and
    the per-still change-of-basis operators (identity when already in reference setting).
    """
    if not models:
        raise ValueError("average_crystal_model needs at least one crystal model")
    sg_symbol = space_group or models[0].space_group
    ops, gs = [], []
    for m in models:
        cs = crystal.symmetry(unit_cell=m.unit_cell, space_group_symbol=space_group or m.space_group)
        cb = _cb_op_to_reference(space_group or m.space_group) if to_reference_setting else sgtbx.change_of_basis_op()
        ops.append(cb)
        gs.append(np.array(cs.change_basis(cb).unit_cell().metrical_matrix()))
    # correctly rounded sums (math.fsum): the average does not depend on the order of the stills
    gmean = [math.fsum(g[i] for g in gs) / len(gs) for i in range(6)]
    uc = uctbx.unit_cell(metrical_matrix=tuple(float(x) for x in gmean))
    group, symbol = _group_and_symbol(sg_symbol, to_reference_setting)
    uc = group.average_unit_cell(uc)
    return CrystalModel(tuple(float(x) for x in uc.parameters()), symbol), ops


def s_max_of_hkl(unit_cell: Sequence[float], h: np.ndarray, k: np.ndarray, l: np.ndarray) -> float:
    """Largest |s| = 1/d (Å⁻¹) of fractional indices under the cell's reciprocal metric."""
    g = np.array(uctbx.unit_cell(tuple(unit_cell)).reciprocal_metrical_matrix())
    if len(h) == 0:
        return 0.0
    s2 = (g[0] * h * h + g[1] * k * k + g[2] * l * l
          + 2.0 * (g[3] * h * k + g[4] * h * l + g[5] * k * l))
    return float(np.sqrt(max(float(s2.max()), 0.0)))


@dataclass(frozen=True)
class GlobalGrid:
    """A regular grid in fractional (h, k, l) with ``ndiv`` sub-voxels per reciprocal cell unit.

    Voxel (i, j, m) is centred at h = (h_lo*ndiv + i)/ndiv etc. (so integer hkl sit at
    voxel centres when ``ndiv`` is odd) and spans ±1/(2 ndiv) around it.  Flat voxel ids
    are C-order over (nh, nk, nl).  ``lo`` holds the voxel-centre lower bounds in units of
    1/ndiv (integers), ``shape`` the number of voxels per axis.
    """

    ndiv: int
    lo: tuple[int, int, int]
    shape: tuple[int, int, int]
    unit_cell: tuple[float, float, float, float, float, float]
    space_group: str = "P 1"

    def __post_init__(self):
        if self.ndiv < 1:
            raise ValueError(f"subdivisions must be >= 1, got {self.ndiv}")
        if any(n < 1 for n in self.shape):
            raise ValueError(f"grid shape must be positive, got {self.shape}")

    # ----------------------------------------------------------------- basics
    @property
    def n_voxels(self) -> int:
        return int(self.shape[0]) * int(self.shape[1]) * int(self.shape[2])

    def axis(self, i: int) -> np.ndarray:
        """Voxel-centre fractional Miller index along axis i (0=h, 1=k, 2=l)."""
        return (self.lo[i] + np.arange(self.shape[i])) / self.ndiv

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lo"], d["shape"], d["unit_cell"] = list(self.lo), list(self.shape), list(self.unit_cell)
        return d

    @staticmethod
    def from_dict(d: dict) -> "GlobalGrid":
        return GlobalGrid(int(d["ndiv"]), tuple(int(x) for x in d["lo"]), tuple(int(x) for x in d["shape"]),
                          tuple(float(x) for x in d["unit_cell"]), str(d.get("space_group", "P 1")))

    # ------------------------------------------------------------ voxelising
    def voxel_ids(self, h: np.ndarray, k: np.ndarray, l: np.ndarray) -> np.ndarray:
        """Flat voxel id (int64) of each observation; -1 outside the grid. Vectorised, few passes."""
        h = np.asarray(h, dtype=np.float64)
        k = np.asarray(k, dtype=np.float64)
        l = np.asarray(l, dtype=np.float64)
        nd = float(self.ndiv)
        idx = []
        for x, lo in ((h, self.lo[0]), (k, self.lo[1]), (l, self.lo[2])):
            t = x * nd
            t += 0.5 - lo
            np.floor(t, out=t)
            idx.append(t)
        fh, fk, fl = idx
        nh, nk, nl = self.shape
        # bounds: cheap reductions first, a mask only when something falls outside
        bad = None
        for t, n in ((fh, nh), (fk, nk), (fl, nl)):
            if t.size and not (t.min() >= 0 and t.max() < n):  # also catches NaN
                b = ~((t >= 0) & (t < n))
                bad = b if bad is None else (bad | b)
        if bad is not None:
            for t in (fh, fk, fl):
                t[bad] = 0.0
        fh *= nk
        fh += fk
        fh *= nl
        fh += fl
        ids = fh.astype(np.int64)
        if bad is not None:
            ids[bad] = -1
        return ids

    def voxel_index(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat ids -> (i, j, m) integer voxel indices."""
        return np.unravel_index(np.asarray(ids, dtype=np.int64), self.shape)

    def voxel_hkl_scaled(self, ids: np.ndarray) -> np.ndarray:
        """Voxel-centre indices multiplied by ndiv (exact integers), shape (n, 3)."""
        i, j, m = self.voxel_index(ids)
        return np.stack([i + self.lo[0], j + self.lo[1], m + self.lo[2]], axis=1).astype(np.int64)

    def ids_from_scaled_hkl(self, H: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`voxel_hkl_scaled`; -1 for indices outside the grid."""
        H = np.asarray(H, dtype=np.int64)
        i = H[:, 0] - self.lo[0]
        j = H[:, 1] - self.lo[1]
        m = H[:, 2] - self.lo[2]
        nh, nk, nl = self.shape
        ok = (i >= 0) & (i < nh) & (j >= 0) & (j < nk) & (m >= 0) & (m < nl)
        ids = (i * nk + j) * nl + m
        return np.where(ok, ids, -1)

    def voxel_hkl(self, ids: np.ndarray) -> np.ndarray:
        """Voxel-centre fractional hkl, shape (n, 3)."""
        return self.voxel_hkl_scaled(ids) / float(self.ndiv)

    def s_of_hkl(self, hkl: np.ndarray) -> np.ndarray:
        """|s| = 1/d (Å⁻¹) of fractional indices (n, 3) in the grid's average cell."""
        g = np.array(uctbx.unit_cell(tuple(self.unit_cell)).reciprocal_metrical_matrix())
        h, k, l = hkl[:, 0], hkl[:, 1], hkl[:, 2]
        s2 = (g[0] * h * h + g[1] * k * k + g[2] * l * l
              + 2.0 * (g[3] * h * k + g[4] * h * l + g[5] * k * l))
        return np.sqrt(np.maximum(s2, 0.0))

    def s_of_voxels(self, ids: np.ndarray) -> np.ndarray:
        """|s| (Å⁻¹) at voxel centres."""
        return self.s_of_hkl(self.voxel_hkl(ids))


def build_grid(model: CrystalModel, ndiv: int = DEFAULTS.subdivisions, s_max: float | None = None,
               d_min: float | None = None, hkl_max: Sequence[float] | None = None) -> GlobalGrid:
    """Grid covering the resolution sphere |s| <= s_max (= 1/d_min, Å⁻¹), or an explicit |h|,|k|,|l| box.

    For a sphere of radius s_max the largest |h| is s_max·|a| (a the direct cell edge),
    so the box is symmetric and holds every symmetry equivalent of any point inside the
    sphere (needed for merging onto the asymmetric unit).
    """
    if ndiv % 2 == 0:
        raise ValueError(f"subdivisions must be odd so integer hkl sit at voxel centres, got {ndiv}")
    if hkl_max is None:
        if s_max is None:
            if d_min is None:
                raise ValueError("build_grid needs s_max, d_min or hkl_max")
            s_max = 1.0 / d_min
        a, b, c = model.unit_cell[:3]
        hkl_max = (s_max * a, s_max * b, s_max * c)
    # voxel-centre half-width in units of 1/ndiv, covering |h| <= hmax plus the edge voxel
    half = [int(np.ceil(float(x) * ndiv + 0.5)) for x in hkl_max]
    lo = tuple(-n for n in half)
    shape = tuple(2 * n + 1 for n in half)
    return GlobalGrid(int(ndiv), lo, shape, tuple(float(x) for x in model.unit_cell), model.space_group)


def grid_from_spec(spec: dict) -> GlobalGrid:
    """Grid from ``{unit_cell, space_group, d_min, subdivisions}`` (Å, degrees; Å; odd integer).

    The cell is taken to the reference setting of its space group (as the stills are when
    accumulated) and the box holds the resolution sphere |s| <= 1/d_min.
    """
    try:
        uc = tuple(float(x) for x in spec["unit_cell"])
        sg = str(spec.get("space_group") or "P 1")
        d_min = float(spec["d_min"])
        ndiv = int(spec.get("subdivisions", DEFAULTS.subdivisions))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"grid_spec needs unit_cell (6 numbers), d_min (Å) and optionally space_group and "
                         f"subdivisions: {exc}") from exc
    if len(uc) != 6:
        raise ValueError(f"grid_spec unit_cell has {len(uc)} numbers, expected 6")
    if not d_min > 0:
        raise ValueError(f"grid_spec d_min must be positive, got {d_min}")
    model, _ = average_crystal_model([CrystalModel(uc, sg)])
    return build_grid(model, ndiv, d_min=d_min)
