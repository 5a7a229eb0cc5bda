"""Bragg references from the stills-processor's integrated reflections (seed 003; issue 16 item 3).

Per still, DIALS' summation intensities are put in the units of the diffuse map so that the relative
scaling (one scale per still for both kinds of observation) and the absolute sum rule (diffuse + Bragg)
can use them:

1. Corrections as DIALS applies them: ``I_corr = I_sum * lp / qe`` (``dials.algorithms.integration.
   Corrections``: polarisation for stills, no Lorentz; detector efficiency), the same factors the
   diffuse-extractor applies to diffuse pixels.
2. Partiality. DIALS 3.12's stills integration writes a ``partiality`` column that is 1.0 for every
   reflection (checked on the thaumatin stills), so it carries no information. We use a Gaussian
   rocking curve in the excitation error instead: ``eps = |s0 + A h| - |s0|`` (1/Å, the distance of the
   reciprocal-lattice point from the Ewald sphere, from the refined A matrix) and
   ``P = exp(-eps^2 / (2 sigma_eps^2))``. A column with information (values not all 1) is used as given.
   ``sigma_eps`` (the reciprocal-lattice-point radius normal to the sphere, 1/Å) is a parameter or is
   estimated per still by the method of moments: with E[I_k] = Ibar_shell * P(eps_k) the shell-normalised
   intensity-weighted mean of eps^2 equals the P-weighted mean of eps^2 over the same predictions
   (:func:`fit_rlp_sigma`). When the rocking curve is wider than DIALS' prediction window (as on the
   thaumatin stills: within a resolution shell the intensity does not fall with |eps|), P = 1 for every
   prediction and the window's rms eps stands in for sigma_eps in the units below (recorded per still).
3. Units. A still cuts the Gaussian lattice point of integrated weight |F|^2 / V_cell on the Ewald
   sphere, where solid angle d(Omega) = lambda^2 d^2s, so the spot holds
   ``C lambda^2 |F|^2 P / (V_cell sqrt(2 pi) sigma_eps)`` photons, while a diffuse pixel corrected to the
   reference solid angle Omega_ref (diffuse-extractor convention) holds ``C D(s) Omega_ref``.
   Multiplying the corrected Bragg intensity by ``V_cell sqrt(2 pi) sigma_eps Omega_ref / lambda^2``
   (:func:`map_unit_factor`) puts the full Bragg intensity on the map's scale as |F|^2, the quantity the
   Krogh-Moe / Norman sum adds to the diffuse shell mean.
4. Still ids as the voxel-merger names them: ``<image file name>#<image index>`` (``.<experiment index>``
   appended for experiments after the first), Miller indices mapped to the asymmetric unit (cctbx).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from cctbx import crystal, miller, sgtbx
from cctbx.array_family import flex as cflex
from dials.algorithms.integration import Corrections
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentListFactory
from scipy.optimize import brentq

SQRT_2PI = math.sqrt(2.0 * math.pi)


def excitation_error(A: np.ndarray, s0: np.ndarray, hkl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eps, |s|): distance of each reciprocal-lattice point from the Ewald sphere and 1/d, both 1/Å."""
    q = np.asarray(hkl, dtype=float) @ np.asarray(A, dtype=float).reshape(3, 3).T
    s0 = np.asarray(s0, dtype=float)
    return np.linalg.norm(s0 + q, axis=1) - np.linalg.norm(s0), np.linalg.norm(q, axis=1)


def gaussian_partiality(eps: np.ndarray, sigma_eps: float) -> np.ndarray:
    """P = exp(-eps^2 / (2 sigma_eps^2)): fraction of a Gaussian lattice point's peak density on the sphere."""
    return np.exp(-0.5 * (np.asarray(eps, dtype=float) / float(sigma_eps)) ** 2)


def map_unit_factor(cell_volume: float, sigma_eps: float, wavelength: float, omega_ref: float) -> float:
    """V_cell sqrt(2 pi) sigma_eps Omega_ref / lambda^2: full Bragg intensity -> |F|^2 in diffuse-map units."""
    return float(cell_volume) * SQRT_2PI * float(sigma_eps) * float(omega_ref) / float(wavelength) ** 2


def fit_rlp_sigma(eps: np.ndarray, intensity: np.ndarray, s: Optional[np.ndarray] = None,
                  n_shells: int = 6, min_reflections: int = 30) -> Optional[float]:
    """Method-of-moments sigma_eps (1/Å) of a still's Gaussian rocking curve, or None when not determined.

    Solves sum_k P(eps_k) eps_k^2 / sum_k P(eps_k) = sum_k z_k eps_k^2 / sum_k z_k with z_k the intensity
    divided by its resolution shell's mean (shells of equal counts in |s|), over all predicted reflections.
    """
    eps = np.asarray(eps, dtype=float)
    inten = np.asarray(intensity, dtype=float)
    ok = np.isfinite(eps) & np.isfinite(inten)
    eps, inten = eps[ok], inten[ok]
    if eps.size < min_reflections:
        return None
    z = inten.copy()
    if s is not None:
        s = np.asarray(s, dtype=float)[ok]
        edges = np.quantile(s, np.linspace(0, 1, n_shells + 1))
        shell = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, n_shells - 1)
        for k in range(n_shells):
            m = shell == k
            mean = inten[m].mean() if m.any() else 0.0
            if not mean > 0:
                return None
            z[m] = inten[m] / mean
    if not z.sum() > 0:
        return None
    target = float(np.sum(z * eps ** 2) / np.sum(z))
    e2 = eps ** 2

    def moment(log_sigma):
        p = gaussian_partiality(eps, math.exp(log_sigma))
        return float(np.sum(p * e2) / max(np.sum(p), 1e-300)) - target

    emax = float(np.max(np.abs(eps)))
    lo, hi = math.log(emax * 1e-3), math.log(emax * 1e3)
    if not (moment(lo) < 0 < moment(hi)):
        return None
    return math.exp(brentq(moment, lo, hi, xtol=1e-6))


def still_name(experiments, index: int, fallback: str = "still") -> str:
    """The voxel-merger's still id of experiment ``index``: ``<image file name>#<image index>[.<index>]``."""
    n = len(experiments)
    expt = experiments[index]
    iset = expt.imageset
    j = 0
    if iset is not None and len(iset) > 1:
        if n == 1:
            j = index
        else:
            sharing = [i for i in range(n) if experiments[i].imageset == iset]
            j = sharing.index(index)
    try:
        path = str(iset.get_path(j)) if iset is not None else ""
    except Exception:  # noqa: BLE001 - an imageset without paths
        path = ""
    name = f"{Path(path).name if path else fallback}#{j}"
    return name + (f".{index}" if index else "")


@dataclass
class BraggTable:
    """Corrected Bragg observations in diffuse-map units, one row per reflection (before P_min)."""

    still_name: np.ndarray  # str
    hkl: np.ndarray  # (n, 3) asymmetric-unit indices
    q_magnitude: np.ndarray  # 1/d, 1/Å
    intensity: np.ndarray  # partial intensity, map units (divide by partiality for the full one)
    sigma: np.ndarray
    partiality: np.ndarray
    per_still: dict = field(default_factory=dict)  # name -> {sigma_eps, map_unit_factor, n, source}

    def __len__(self) -> int:
        return int(len(self.intensity))

    def for_model(self, still_index: dict[str, int]) -> tuple[dict[str, np.ndarray], int]:
        """The columns ``flatten_bragg`` takes, still names mapped to the observation table's integer ids;
        rows of stills absent from the table are dropped (their count is returned)."""
        idx = np.array([still_index.get(str(n), -1) for n in self.still_name], dtype=np.int64)
        keep = idx >= 0
        return ({"still_id": idx[keep], "miller_index_asu": self.hkl[keep], "q_magnitude": self.q_magnitude[keep],
                 "intensity": self.intensity[keep], "sigma": self.sigma[keep],
                 "partiality": self.partiality[keep]}, int((~keep).sum()))


def _asu(hkl: np.ndarray, unit_cell, space_group) -> np.ndarray:
    sym = crystal.symmetry(unit_cell=unit_cell, space_group=space_group)
    ms = miller.set(sym, cflex.miller_index([tuple(int(v) for v in h) for h in hkl]), anomalous_flag=False)
    return np.array(ms.map_to_asu().indices(), dtype=np.int64).reshape(-1, 3)


def read_still_reflections(refl_path: str | Path, expt_path: str | Path | None = None, *,
                           space_group: Optional[str] = None, rlp_sigma: Optional[float] = None,
                           error=ValueError) -> BraggTable:
    """One stills-processor unit (``<name>.refl`` + ``<name>.expt``; the .expt defaults to the sibling file)."""
    refl_path = Path(refl_path)
    expt_path = Path(expt_path) if expt_path is not None else refl_path.with_suffix(".expt")
    for p, what in ((refl_path, "reflection file"), (expt_path, "experiment list")):
        if not p.is_file():
            raise error(f"{p}: {what} not found")
    try:
        table = flex.reflection_table.from_file(str(refl_path))
    except Exception as exc:  # noqa: BLE001
        raise error(f"{refl_path}: not a DIALS reflection table ({exc})") from exc
    try:
        experiments = ExperimentListFactory.from_json_file(str(expt_path), check_format=False)
    except Exception as exc:  # noqa: BLE001
        raise error(f"{expt_path}: not a DIALS experiment list ({exc})") from exc
    for col in ("miller_index", "intensity.sum.value", "intensity.sum.variance", "id", "s1", "panel"):
        if col not in table:
            raise error(f"{refl_path}: reflection table has no {col!r} column")
    sel = table.get_flags(table.flags.integrated_sum) if "flags" in table else flex.bool(len(table), True)
    table = table.select(sel)
    ids = np.asarray(table["id"])
    hkl_all = np.array(table["miller_index"].as_vec3_double(), dtype=float).reshape(-1, 3)
    inten_all = table["intensity.sum.value"].as_numpy_array()
    var_all = table["intensity.sum.variance"].as_numpy_array()
    s1_all = np.array(table["s1"], dtype=float).reshape(-1, 3)
    panel_all = np.asarray(table["panel"])
    part_col = table["partiality"].as_numpy_array() if "partiality" in table else None
    out = {k: [] for k in ("name", "hkl", "q", "I", "sig", "P")}
    per_still = {}
    for i in sorted(set(ids[ids >= 0].tolist())):
        if i >= len(experiments):
            raise error(f"{refl_path}: reflection id {i} but {expt_path} has {len(experiments)} experiments")
        e = experiments[i]
        if e.crystal is None:
            continue
        m = (ids == i) & np.all(hkl_all != 0, axis=1) & (var_all > 0) & np.isfinite(inten_all)
        if not m.any():
            continue
        corr = Corrections(e.beam, e.detector)
        lp = np.array([corr.lp(tuple(v)) for v in s1_all[m]])
        qe = np.array([corr.qe(tuple(v), int(p)) for v, p in zip(s1_all[m], panel_all[m])])
        # a sensor of unknown (zero) thickness has no efficiency model: DIALS gives 0, the diffuse-extractor 1
        qe = np.where((qe > 0) & np.isfinite(qe), qe, 1.0)
        f = lp / qe
        inten, sig = inten_all[m] * f, np.sqrt(var_all[m]) * f
        A = np.array(e.crystal.get_A(), dtype=float).reshape(3, 3)
        eps, s = excitation_error(A, e.beam.get_s0(), hkl_all[m])
        given = part_col is not None and np.any(np.abs(part_col[m] - 1.0) > 1e-9)
        name = still_name(experiments, i, fallback=refl_path.stem)
        if given:
            sigma_eps, source = rlp_sigma, "partiality column"
            P = part_col[m]
        else:
            sigma_eps = rlp_sigma if rlp_sigma is not None else fit_rlp_sigma(eps, inten, s)
            source = "given" if rlp_sigma is not None else "fitted"
            if sigma_eps is None:
                # the rocking curve is wider than DIALS' prediction window (no fall-off of the shell-normalised
                # intensity with eps): every prediction is taken as full, and the window's rms eps stands in
                # for sigma_eps in the map units (an estimate; the per-still record says so)
                sigma_eps, source = float(np.sqrt(np.mean(eps ** 2))), "window (rocking curve not resolved)"
                P = np.ones_like(eps)
            else:
                P = gaussian_partiality(eps, sigma_eps)
        lam = float(e.beam.get_wavelength())
        p0 = e.detector[0]
        psx, psy = p0.get_pixel_size()
        omega_ref = psx * psy / float(p0.get_distance()) ** 2
        uc = e.crystal.get_unit_cell()
        # with a partiality column of unknown normalisation the map units need sigma_eps: without it, 1
        k = map_unit_factor(uc.volume(), sigma_eps, lam, omega_ref) if sigma_eps else 1.0
        sg = e.crystal.get_space_group() if space_group is None else _space_group(space_group)
        out["name"] += [name] * int(m.sum())
        out["hkl"].append(_asu(hkl_all[m], uc, sg))
        out["q"].append(s)
        out["I"].append(inten * k)
        out["sig"].append(sig * k)
        out["P"].append(P)
        per_still[name] = {"sigma_eps": None if sigma_eps is None else float(sigma_eps), "map_unit_factor": k,
                           "n": int(m.sum()), "source": source, "wavelength": lam, "omega_ref": omega_ref,
                           "cell_volume": float(uc.volume())}
    if not out["hkl"]:
        return BraggTable(np.array([], dtype=object), np.zeros((0, 3), dtype=np.int64), *(np.zeros(0),) * 4,
                          per_still)
    return BraggTable(np.array(out["name"], dtype=object), np.concatenate(out["hkl"]), np.concatenate(out["q"]),
                      np.concatenate(out["I"]), np.concatenate(out["sig"]), np.concatenate(out["P"]), per_still)


def _space_group(symbol: str):
    return sgtbx.space_group_info(symbol).group()


def read_reflections(pairs: Sequence[tuple[str | Path, Optional[str | Path]]], **kw) -> BraggTable:
    """Many stills-processor units (``(refl, expt or None)`` pairs) in one table."""
    tables = [read_still_reflections(r, e, **kw) for r, e in pairs]
    per_still = {}
    for t in tables:
        per_still.update(t.per_still)
    tables = [t for t in tables if len(t)]
    if not tables:
        return BraggTable(np.array([], dtype=object), np.zeros((0, 3), dtype=np.int64), *(np.zeros(0),) * 4,
                          per_still)
    return BraggTable(np.concatenate([t.still_name for t in tables]), np.concatenate([t.hkl for t in tables]),
                      *(np.concatenate([getattr(t, a) for t in tables])
                        for a in ("q_magnitude", "intensity", "sigma", "partiality")), per_still)
