"""Merging accumulated voxel sums: weighted means, symmetry, outliers, CC½, radial profile.

All functions stream over an accumulator's blocks (``iter_blocks`` / ``read_range``),
so they work the same for the in-memory and the HDF5-backed accumulator.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np
from cctbx import miller, sgtbx
from cctbx.array_family import flex

from .accumulate import N_FIELDS, observation_weights
from .grid import GlobalGrid
from .params import DEFAULTS

#: the voxel -> ASU voxel memo of the last grid and symmetry mapped in this process (see AsuMapper._memo_array);
#: concurrent jobs write the same values into it, so sharing needs no more than the lock around the lookup
_SHARED_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()

__all__ = [
    "merge_sums",
    "laue_group",
    "AsuMapper",
    "symmetry_merge",
    "expand_from_asu",
    "intrinsic_spread",
    "leave_one_out_terms",
    "leave_one_out_z",
    "leave_one_out_z_sums",
    "cc_half_by_shell",
    "symmetry_agreement",
    "radial_profile",
    "dense_map",
    "pearson_cc",
]


def merge_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, sigma, count) from sums (4, ...): mean = Σw·I/Σw, σ = √(Σw²σ²)/Σw; NaN where empty.

    σ is the propagated error of the weighted mean for fixed weights (= 1/√Σw when w = 1/σ²).
    """
    count, sw, swi, sw2v = sums[0], sums[1], sums[2], sums[3]
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = sw > 0
        safe = np.where(pos, sw, 1.0)
        mean = np.where(pos, swi / safe, np.nan)
        sigma = np.where(pos, np.sqrt(np.maximum(sw2v, 0.0)) / safe, np.nan)
    return mean, sigma, count.astype(np.int64)


# ------------------------------------------------------------------ symmetry
def laue_group(space_group: str):
    """cctbx space group of the Laue class (centrosymmetric point group + lattice) of ``space_group``."""
    return sgtbx.space_group_info(space_group).group().build_derived_laue_group()


class AsuMapper:
    """Map voxel ids onto the voxel of their asymmetric-unit equivalent (cctbx ``miller.map_to_asu``).

    Voxel centres are integer multiples of 1/ndiv, so ndiv·hkl are integers; the Laue
    group's rotations act linearly and cctbx's reciprocal-space ASU is a cone defined by
    homogeneous inequalities, so mapping ndiv·hkl with cctbx and dividing by ndiv gives the
    ASU equivalent of the fractional index.  Friedel mates are merged (centrosymmetric Laue
    group, ``anomalous_flag=False``).  Ids whose equivalent falls outside the grid map to -1.
    """

    def __init__(self, grid: GlobalGrid, space_group: str | None = None):
        self.grid = grid
        self.space_group = space_group or grid.space_group
        self.group = laue_group(self.space_group)
        self.sg_type = sgtbx.space_group_type(self.group)
        # rotation parts acting on row-vector Miller indices: h' = h · R (unique, inversion included)
        mats = {tuple(int(x) for x in op.r().num()) for op in self.group.all_ops()}
        self.rotations = np.array(sorted(mats), dtype=np.int64).reshape(-1, 3, 3)

    def equivalents_scaled(self, H: np.ndarray) -> np.ndarray:
        """All symmetry equivalents (n_ops, n, 3) of ndiv·hkl rows H (duplicates for special positions)."""
        H = np.asarray(H, dtype=np.int64)
        return np.einsum("ni,oij->onj", H, self.rotations)

    def map_scaled(self, H: np.ndarray) -> np.ndarray:
        """ndiv·hkl (n, 3) integers -> their ASU representatives (n, 3)."""
        H = np.ascontiguousarray(H, dtype=np.int64)
        out = np.empty_like(H)
        step = 1 << 20
        for a in range(0, len(H), step):
            part = H[a:a + step]
            mi = flex.miller_index(*[flex.int(np.ascontiguousarray(part[:, c], dtype=np.int32)) for c in range(3)])
            miller.map_to_asu(self.sg_type, False, mi)
            out[a:a + step] = np.rint(mi.as_vec3_double().as_double().as_numpy_array()).astype(np.int64).reshape(-1, 3)
        return out

    MEMO_MAX_BYTES = 256 * 2**20

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return ids.copy()
        memo = self._memo_array()
        if memo is None:
            return self._map_ids(ids)
        out = memo[ids]
        todo = out == -2
        if todo.any():
            out[todo] = memo[ids[todo]] = self._map_ids(ids[todo])
        return out

    def _map_ids(self, ids: np.ndarray) -> np.ndarray:
        return self.grid.ids_from_scaled_hkl(self.map_scaled(self.grid.voxel_hkl_scaled(ids)))

    def _memo_array(self):
        """Voxel -> ASU voxel memo (-2 = not yet mapped) when the grid is small enough (8 bytes per voxel).

        Shared by every mapper of the same grid and symmetry in the process (the most recent one is kept): a
        worker's merges of one run (the table-only merge, then the scaled merge's rejection, table and symmetry
        merge) map each voxel once instead of once per mapper."""
        if not hasattr(self, "_memo"):
            n = self.grid.n_voxels
            if n * 8 > self.MEMO_MAX_BYTES:
                self._memo = None
            else:
                key = (repr(sorted(self.grid.to_dict().items())), self.sg_type.lookup_symbol())
                with _MEMO_LOCK:
                    memo = _SHARED_MEMO.get(key)
                    if memo is None:
                        _SHARED_MEMO.clear()
                        memo = _SHARED_MEMO[key] = np.full(n, -2, dtype=np.int64)
                self._memo = memo
        return self._memo

    def map_observations(self, ids: np.ndarray) -> np.ndarray:
        """Like ``__call__`` for many (repeated) observation ids: maps each distinct voxel once."""
        ids = np.asarray(ids, dtype=np.int64)
        valid = ids >= 0
        out = np.full(ids.shape, -1, dtype=np.int64)
        if valid.any():
            u, inv = np.unique(ids[valid], return_inverse=True)
            out[valid] = self(u)[inv]
        return out


def symmetry_merge(src, dst, mapper: AsuMapper, progress: Callable[[], None] | None = None) -> int:
    """Add every voxel's sums of ``src`` into its ASU voxel in ``dst`` (same grid). Returns voxels lost off-grid."""
    lost = 0
    for start, s in src.iter_blocks():
        s = np.asarray(s)
        occupied = np.flatnonzero(s[0].sum(axis=0) > 0)
        if occupied.size == 0:
            continue
        asu = mapper(start + occupied)
        ok = asu >= 0
        lost += int((~ok).sum())
        for hh in range(src.n_halves):
            tgt = hh if dst.n_halves == src.n_halves else 0
            part = s[:, hh, occupied[ok]]
            keep = part[0] > 0
            if keep.any():
                dst.add_sums(asu[ok][keep], tgt, [part[f][keep] for f in range(N_FIELDS)])
        if progress:
            progress()
    dst.still_ids = list(src.still_ids)
    dst.n_obs, dst.n_dropped = src.n_obs, src.n_dropped
    return lost


def expand_from_asu(store, ids: np.ndarray, mapper: AsuMapper) -> np.ndarray:
    """Total sums (4, n) at every voxel id, read from its ASU equivalent in ``store``."""
    asu = mapper(ids)
    out = np.zeros((N_FIELDS, len(ids)))
    ok = asu >= 0
    if ok.any():
        out[:, ok] = store.gather(asu[ok])
    return out


# ------------------------------------------------------------------ outliers
#: median of a chi-square variable with one degree of freedom: the median of z² when counting explains the scatter
CHI2_1_MEDIAN = 0.454936


def leave_one_out_terms(own: np.ndarray, totals: np.ndarray, poisson_floor: bool = False):
    """(I − m_o, σ² + var_o, m_o) of one member (an observation, or one still's voxel sums) against the others in
    its voxel.

    ``own`` (4, n): the member's (count, w, w·I, w²σ²), scale already applied (w → b·w);
    ``totals`` (4, n): the voxel sums including the member.  With I = w·I/w, σ² = w²σ²/w² and
    the others' mean m_o = (Σw·I − w·I)/(Σw − w), var_o = (Σw²σ² − w²σ²)/(Σw − w)².  NaN where no other member
    exists.

    ``poisson_floor`` (weights are exposures, so w·I is in counts): σ² is at least m_o/w, the
    Poisson variance the member would have at the others' mean.  σ² from the member's own counts
    is 0 for a pixel (or still-voxel) that saw no photon; without the floor such members would be
    judged many σ low at weak signal and rejecting them would bias the mean up.
    """
    own = np.asarray(own, dtype=np.float64)
    totals = np.asarray(totals, dtype=np.float64)
    w, wi, w2v = own[1], own[2], own[3]
    sw_o = totals[1] - w
    swi_o = totals[2] - wi
    sw2v_o = np.maximum(totals[3] - w2v, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        has = (totals[0] - own[0] >= 1) & (sw_o > 1e-12 * np.maximum(totals[1], 1e-300))
        so = np.where(has, sw_o, 1.0)
        mean_o = np.where(has, swi_o / so, np.nan)
        own_var = w2v / (w * w)
        if poisson_floor:
            own_var = np.maximum(own_var, np.maximum(mean_o, 0.0) / w)
        return wi / w - mean_o, own_var + np.where(has, sw2v_o / (so * so), np.nan), mean_o


def leave_one_out_z_sums(own: np.ndarray, totals: np.ndarray, poisson_floor: bool = False,
                         intrinsic_rel: float = 0.0) -> np.ndarray:
    """Deviation of one member from the others in its voxel (:func:`leave_one_out_terms`) in units of its error:
    z = (I − m_o)/√(σ² + var_o + (κ·m_o)²), κ = ``intrinsic_rel`` the relative spread members show for real
    (:func:`intrinsic_spread`).  NaN where no other member exists."""
    dev, var, mean_o = leave_one_out_terms(own, totals, poisson_floor)
    with np.errstate(divide="ignore", invalid="ignore"):
        return dev / np.sqrt(var + (intrinsic_rel * np.maximum(mean_o, 0.0)) ** 2)


def intrinsic_spread(dev: np.ndarray, var: np.ndarray, mean: np.ndarray, max_rel: float = 4.0) -> float:
    """Relative spread κ that members of one voxel show beyond their counting errors, from many voxels' members
    (``dev``, ``var``, ``mean`` of :func:`leave_one_out_terms`): the κ for which the median of
    dev²/(var + κ²·mean²) is the χ²₁ median, 0 when counting errors explain the scatter.

    Why: each still (or rotation frame) samples its own slice of a voxel, and a diffuse halo can change 2x across
    a 1/3-cell voxel, so at high counts the members of a voxel differ by many counting σ for real. A rendered
    sweep's 5σ test on counting errors alone rejected 3.6 % of all pixels, mostly low members at low resolution,
    and lifted the map there by 1.7 % against its sampled truth. The median ignores the few real outliers
    (zingers, Bragg leaks, streaks) that the test is there to catch.
    """
    dev, var, mean = (np.asarray(a, dtype=np.float64) for a in (dev, var, mean))
    ok = np.isfinite(dev) & np.isfinite(var) & np.isfinite(mean) & (var > 0) & (mean > 0)
    if ok.sum() < 50:
        return 0.0
    d2, v, m2 = dev[ok] ** 2, var[ok], mean[ok] ** 2

    def median_z2(k2: float) -> float:
        return float(np.median(d2 / (v + k2 * m2)))

    if median_z2(0.0) <= CHI2_1_MEDIAN:
        return 0.0
    lo, hi = 0.0, max_rel ** 2
    if median_z2(hi) > CHI2_1_MEDIAN:
        return float(max_rel)
    for _ in range(40):  # the median falls monotonically with κ²; 40 halvings: κ² to 1e-11 of its range
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if median_z2(mid) > CHI2_1_MEDIAN else (lo, mid)
    return float(np.sqrt(0.5 * (lo + hi)))


def leave_one_out_z(intensity: np.ndarray, sigma: np.ndarray, totals: np.ndarray, scale=None,
                    weight=None) -> np.ndarray:
    """Normalised deviation of each observation from the weighted mean of the *other* observations in its voxel.

    Observations (I, σ, w) (w = ``weight`` or 1/σ²), divided by the still scale b; ``totals``
    are the voxel sums (4, n) at each observation's voxel, including it.  See
    :func:`leave_one_out_z_sums`; NaN where no other observation exists.
    """
    w, wi, w2v = observation_weights(intensity, sigma, scale, weight)
    return leave_one_out_z_sums(np.stack([np.ones_like(w), w, wi, w2v]), totals, poisson_floor=weight is not None)


# ------------------------------------------------------------------ statistics
def pearson_cc(n, sa, sb, saa, sbb, sab):
    """Pearson correlation from streamed sums (NaN when undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = sab - sa * sb / n
        va = saa - sa * sa / n
        vb = sbb - sb * sb / n
        return np.where((n > 1) & (va > 0) & (vb > 0), cov / np.sqrt(va * vb), np.nan)


def _s_range(store, grid: GlobalGrid, need_both_halves: bool):
    smin, smax = np.inf, 0.0
    for start, s in store.iter_blocks():
        c = np.asarray(s)[0]
        occ = (c > 0).all(axis=0) if need_both_halves else (c.sum(axis=0) > 0)
        idx = np.flatnonzero(occ)
        if idx.size:
            sv = grid.s_of_voxels(start + idx)
            smin, smax = min(smin, float(sv.min())), max(smax, float(sv.max()))
    return smin, smax


def shell_edges(s_min: float, s_max: float, n_shells: int) -> np.ndarray:
    """Shell edges in |s| (Å⁻¹) of equal reciprocal-space volume between s_min and s_max."""
    return np.cbrt(np.linspace(s_min ** 3, s_max ** 3, n_shells + 1))


def _add_pairs(acc: np.ndarray, edges: np.ndarray, s: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Add value pairs (a, b) at |s| to the per-shell Pearson sums ``acc`` (6, n_shells + 1; last column: all)."""
    n_shells = len(edges) - 1
    shell = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_shells - 1)
    for row, v in enumerate((np.ones_like(a), a, b, a * a, b * b, a * b)):
        acc[row, :n_shells] += np.bincount(shell, weights=v, minlength=n_shells)
        acc[row, n_shells] += v.sum()


def _shell_table(acc: np.ndarray, edges: np.ndarray, key: str) -> dict:
    """Per-shell and overall Pearson CC from the sums of :func:`_add_pairs`, as the statistics report them."""
    n_shells = len(edges) - 1
    cc = pearson_cc(*acc)
    return {
        "s_edges": edges.tolist(),
        "d_edges": [None if e <= 0 else float(1.0 / e) for e in edges],
        key: [None if not np.isfinite(x) else float(x) for x in cc[:n_shells]],
        "n_voxels": acc[0, :n_shells].astype(int).tolist(),
        "overall": float(cc[n_shells]) if np.isfinite(cc[n_shells]) else float("nan"),
        "n_voxels_total": int(acc[0, n_shells]),
    }


def cc_half_by_shell(store, grid: GlobalGrid, n_shells: int = DEFAULTS.n_shells, min_count: int = 1) -> dict:
    """CC½ (Pearson) between the two half-dataset voxel means, per resolution shell and overall.

    Only voxels measured in both halves (≥ ``min_count`` observations each) count.
    Shells have equal volume in reciprocal space. |s| = 1/d in Å⁻¹.
    """
    if store.n_halves != 2:
        raise ValueError("CC1/2 needs an accumulator with two half-datasets (n_halves=2)")
    s_lo, s_hi = _s_range(store, grid, True)
    if not np.isfinite(s_lo):
        return {"s_edges": [], "cc_half": [], "n_voxels": [], "overall": float("nan"), "n_voxels_total": 0}
    edges = shell_edges(s_lo, s_hi * (1 + 1e-12), n_shells)
    acc = np.zeros((6, n_shells + 1))  # last row: overall
    for start, s in store.iter_blocks():
        s = np.asarray(s)
        both = (s[0] >= min_count).all(axis=0)
        idx = np.flatnonzero(both)
        if idx.size == 0:
            continue
        a = s[2, 0, idx] / s[1, 0, idx]
        b = s[2, 1, idx] / s[1, 1, idx]
        _add_pairs(acc, edges, grid.s_of_voxels(start + idx), a, b)
    return _shell_table(acc, edges, "cc_half")


def symmetry_agreement(p1_store, asu_store, mapper: AsuMapper, grid: GlobalGrid, n_shells: int = DEFAULTS.n_shells) -> dict:
    """Agreement of symmetry-equivalent voxels before merging: per resolution shell and overall, the Pearson CC
    between each measured P1 voxel's mean and the mean of its symmetry mates (its ASU orbit without itself).

    A wrong space group, a mis-indexed still or an uncorrected anisotropic factor (polarisation, absorption)
    lowers it; noise alone lowers it the same way CC½ does. Only voxels with at least one measured mate count.
    """
    s_lo, s_hi = _s_range(p1_store, grid, False)
    if not np.isfinite(s_lo):
        return {"s_edges": [], "cc": [], "n_voxels": [], "overall": float("nan"), "n_voxels_total": 0}
    edges = shell_edges(s_lo, s_hi * (1 + 1e-12), n_shells)
    acc = np.zeros((6, n_shells + 1))
    for start, s in p1_store.iter_blocks():
        t = np.asarray(s).sum(axis=1)
        idx = np.flatnonzero(t[1] > 0)
        if idx.size == 0:
            continue
        ids = start + idx
        asu = mapper(ids)
        ok = asu >= 0
        if not ok.any():
            continue
        own = t[:, idx[ok]]
        orbit = asu_store.gather(asu[ok])
        w_o = orbit[1] - own[1]
        has = (orbit[0] - own[0] > 0) & (w_o > 1e-12 * np.maximum(orbit[1], 1e-300))
        if not has.any():
            continue
        a = own[2, has] / own[1, has]
        b = (orbit[2, has] - own[2, has]) / w_o[has]
        _add_pairs(acc, edges, grid.s_of_voxels(ids[ok][has]), a, b)
    return _shell_table(acc, edges, "cc")


def radial_profile(store, grid: GlobalGrid, n_bins: int = 50, mapper: AsuMapper | None = None) -> dict:
    """Mean merged voxel intensity versus |s| (Å⁻¹), equal-width bins; each measured voxel counts once."""
    s_lo, s_hi = _s_range(store, grid, False)
    if not np.isfinite(s_lo):
        return {"s_centres": [], "mean_intensity": [], "n_voxels": []}
    edges = np.linspace(0.0, s_hi * (1 + 1e-9), n_bins + 1)
    n = np.zeros(n_bins)
    tot = np.zeros(n_bins)
    for start, s in store.iter_blocks():
        t = np.asarray(s).sum(axis=1)
        idx = np.flatnonzero(t[1] > 0)
        if idx.size == 0:
            continue
        mean = t[2, idx] / t[1, idx]
        b = np.clip(np.searchsorted(edges, grid.s_of_voxels(start + idx), side="right") - 1, 0, n_bins - 1)
        n += np.bincount(b, minlength=n_bins)
        tot += np.bincount(b, weights=mean, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(n > 0, tot / np.maximum(n, 1), np.nan)
    return {"s_centres": (0.5 * (edges[1:] + edges[:-1])).tolist(),
            "mean_intensity": [None if not np.isfinite(x) else float(x) for x in prof],
            "n_voxels": n.astype(int).tolist()}


def expand_store(asu_store, dst, mapper: AsuMapper, progress: Callable[[], None] | None = None) -> None:
    """Copy each ASU voxel's total sums onto every symmetry equivalent in ``dst`` (one half), block by block.

    Bounded-memory counterpart of the expansion in :func:`dense_map`: equivalents of one
    ASU voxel are distinct voxels after de-duplication (special positions), and orbits of
    different ASU voxels are disjoint, so every target voxel receives exactly one copy.
    """
    grid = asu_store.grid
    for start, s in asu_store.iter_blocks():
        t = np.asarray(s).sum(axis=1)
        idx = np.flatnonzero(t[0] > 0)
        if idx.size == 0:
            continue
        eq = mapper.equivalents_scaled(grid.voxel_hkl_scaled(start + idx))  # (ops, n, 3)
        tgt = np.stack([grid.ids_from_scaled_hkl(e) for e in eq])  # (ops, n)
        src = np.broadcast_to(np.arange(idx.size), tgt.shape)
        ok = tgt >= 0
        tgt, src = tgt[ok], src[ok]
        tgt, first = np.unique(tgt, return_index=True)
        src = src[first]
        dst.add_sums(tgt, 0, [t[f, idx][src] for f in range(N_FIELDS)])
        if progress:
            progress()
    dst.still_ids = list(asu_store.still_ids)
    dst.n_obs, dst.n_dropped = asu_store.n_obs, asu_store.n_dropped


def map_slabs(store):
    """(h index, mean (nk, nl), sigma, count) per h-plane of a (P1 or expanded) store: bounded memory."""
    grid = store.grid
    nh, nk, nl = grid.shape
    slab = nk * nl
    for i in range(nh):
        mean, sigma, count = merge_sums(store.totals_range(i * slab, (i + 1) * slab))
        yield i, mean.reshape(nk, nl), sigma.reshape(nk, nl), count.reshape(nk, nl)


def store_planes(store) -> dict[int, np.ndarray]:
    """The h=0, k=0 and l=0 planes of the map of a (P1 or expanded) store, NaN where empty (axis -> 2-D array):
    the planes :func:`map_slabs` would write there, without the whole map."""
    grid = store.grid
    shape = grid.shape
    planes = {}
    for ax in range(3):
        i0 = -grid.lo[ax]
        if 0 <= i0 < shape[ax]:
            index = [np.arange(n) for n in shape]
            index[ax] = np.array([i0])
            ids = np.ravel_multi_index(np.ix_(*index), shape).ravel()
            mean, _sigma, _count = merge_sums(store.gather(ids))
            planes[ax] = mean.reshape([n for a, n in enumerate(shape) if a != ax])
    return planes


def dense_map(store, mapper: AsuMapper | None = None, progress: Callable[[], None] | None = None):
    """Merged map on the whole grid: (mean, sigma, count) arrays of shape grid.shape, NaN where empty.

    With a ``mapper`` the store holds ASU-merged sums and each ASU voxel's value is copied
    to all its symmetry equivalents (numpy, with cctbx's Laue-group rotations).  The map
    is dense in memory (20 bytes per voxel); the accumulation itself is not.
    """
    grid = store.grid
    n = grid.n_voxels
    mean = np.full(n, np.nan)
    sigma = np.full(n, np.nan)
    count = np.zeros(n, dtype=np.int64)
    for start, s in store.iter_blocks():
        t = np.asarray(s).sum(axis=1)
        idx = np.flatnonzero(t[0] > 0)
        if idx.size == 0:
            continue
        m, sg, c = merge_sums(t[:, idx])
        ids = start + idx
        if mapper is None:
            mean[ids], sigma[ids], count[ids] = m, sg, c
        else:
            eq = mapper.equivalents_scaled(grid.voxel_hkl_scaled(ids))
            for e in eq:
                tgt = grid.ids_from_scaled_hkl(e)
                ok = tgt >= 0
                mean[tgt[ok]], sigma[tgt[ok]], count[tgt[ok]] = m[ok], sg[ok], c[ok]
        if progress:
            progress()
    shp = grid.shape
    return mean.reshape(shp), sigma.reshape(shp), count.reshape(shp)
