"""Absolute scaling (seed 002, phase 4): Krogh-Moe / Norman sum rule and Compton subtraction.

Units and conventions
- |s| = 1/d (1/Å), sin(theta)/lambda = |s|/2, as in the rest of diffractflow.
- Intensities "per unit cell" in electron units (e.u.): a Bragg reflection contributes |F_h|^2 and a
  diffuse map value is the scattering per unit cell at that |s|, so that for independent atoms the
  shell mean of (Bragg + diffuse) equals sum_j f_j^2(s) (+ Compton).
- Sum rule (Krogh-Moe 1956, Acta Cryst. 9, 951; Norman 1957, Acta Cryst. 10, 370), written for the
  3-D reciprocal-space integral over the sphere |s| < S:

      K * int_{|s|<S} I_obs d^3s  =  int_{|s|<S} [sum_j f_j^2(s) + I_inc(s)] d^3s  -  F(000)^2 / V_cell

  F(000) = sum_j Z_j (the forward Bragg peak that no experiment measures), V_cell in Å^3. The observed
  integral is the sum of shell means times shell volumes over the measured shells; the unmeasured
  inner sphere (beamstop) is taken as empty apart from the excluded origin.
- Atomic scattering factors f0: cctbx ``eltbx.xray_scattering.wk1995`` (Waasmaier & Kirfel 1995);
  anomalous f', f'' (optional, given a wavelength): cctbx ``eltbx.henke``.
- Incoherent (Compton) scattering: the tabulated incoherent scattering functions S(x, Z) of Hubbell et al.
  (J. Phys. Chem. Ref. Data 4, 471, 1975) as served by xraylib (``SF_Compt``, x = sin(theta)/lambda =
  |s|/2), summed over the composition, optionally times the Breit-Dirac recoil factor
  [1 + (lambda_C/lambda)(1 - cos 2theta)]^-2 with lambda_C = 0.024263 Å. (cctbx has no incoherent table;
  the former Z - f0^2/Z approximation, exact only for H, differs from the tables by 10-20 % at
  intermediate s for second-row atoms and is kept as :func:`waller_hartree_approx` for cross-checks.)
- Bragg term: mean |F|^2 per shell on the diffuse map's scale (the relative scaler's merged Bragg
  references, ``bragg_merged.h5``, whose intensities are already in map units, see ``core.bragg``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import xraylib
from cctbx.eltbx import henke, tiny_pse, xray_scattering

from .params import ABSOLUTE_DEFAULTS

COMPTON_WAVELENGTH = 0.0242631  # Å

# In-chain amino-acid residue compositions (amino acid minus H2O); one H2O per chain is added for termini.
RESIDUE_FORMULAS = {
    "A": "C3H5NO", "R": "C6H12N4O", "N": "C4H6N2O2", "D": "C4H5NO3", "C": "C3H5NOS",
    "E": "C5H7NO3", "Q": "C5H8N2O2", "G": "C2H3NO", "H": "C6H7N3O", "I": "C6H11NO",
    "L": "C6H11NO", "K": "C6H12N2O", "M": "C5H9NOS", "F": "C9H9NO", "P": "C5H7NO",
    "S": "C3H5NO2", "T": "C4H7NO2", "W": "C11H10N2O", "Y": "C9H9NO2", "V": "C5H9NO",
    "U": "C3H5NOSe",
}
THREE_TO_ONE = {"ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLU": "E", "GLN": "Q",
                "GLY": "G", "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F",
                "PRO": "P", "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "SEC": "U",
                "MSE": "M"}


# ----------------------------------------------------------------------------- composition
def _element(label: str) -> str:
    m = re.match(r"\s*([A-Za-z]{1,2})", label)
    if not m:
        raise ValueError(f"cannot read an element from {label!r}")
    sym = m.group(1)
    return sym[0].upper() + sym[1:].lower()


def parse_formula(formula: str, multiplier: float = 1.0) -> dict[str, float]:
    """Element counts of a formula such as ``C2H5OH``, ``Ca(OH)2`` or ``C100 H160 N28 O30 S2 (H2O)200``."""
    text = formula.replace(" ", "")
    if not text:
        raise ValueError("empty formula")
    pos = 0

    def parse_group() -> Counter:
        nonlocal pos
        out = Counter()
        while pos < len(text):
            ch = text[pos]
            if ch == "(":
                pos += 1
                inner = parse_group()
                if pos >= len(text) or text[pos] != ")":
                    raise ValueError(f"unbalanced parentheses in formula {formula!r}")
                pos += 1
                n = read_number()
                for k, v in inner.items():
                    out[k] += v * n
            elif ch == ")":
                return out
            else:
                m = re.match(r"([A-Z][a-z]?)", text[pos:])
                if not m:
                    raise ValueError(f"bad formula {formula!r} at {text[pos:]!r}")
                pos += len(m.group(1))
                out[m.group(1)] += read_number()
        return out

    def read_number() -> float:
        nonlocal pos
        m = re.match(r"(\d+(\.\d*)?|\.\d+)", text[pos:])
        if not m:
            return 1.0
        pos += len(m.group(1))
        return float(m.group(1))

    counts = parse_group()
    if pos != len(text):
        raise ValueError(f"bad formula {formula!r}: unexpected {text[pos:]!r}")
    for el in counts:
        atomic_number(el)  # validates the symbol
    return {k: v * multiplier for k, v in counts.items()}


def composition_from_sequence(sequence: str, copies: float = ABSOLUTE_DEFAULTS.copies) -> dict[str, float]:
    """Atoms of ``copies`` protein chains (one-letter sequence, FASTA header lines ignored), with H."""
    lines = [ln.strip() for ln in sequence.strip().splitlines() if not ln.startswith(">")]
    seq = re.sub(r"[\s\d*]", "", "".join(lines)).upper()
    if not seq:
        raise ValueError("empty sequence")
    bad = sorted(set(seq) - set(RESIDUE_FORMULAS))
    if bad:
        raise ValueError(f"unknown residue letters in sequence: {bad}")
    total = Counter()
    for aa, n in Counter(seq).items():
        for el, c in parse_formula(RESIDUE_FORMULAS[aa]).items():
            total[el] += c * n
    total["H"] += 2
    total["O"] += 1
    return {k: v * copies for k, v in total.items()}


def composition_from_pdb(path: str | Path, add_missing_hydrogens: bool = True) -> tuple[dict[str, float], float]:
    """Unit-cell composition and cell volume (Å^3) from a PDB/mmCIF model (iotbx.pdb).

    Atom counts are weighted by occupancy and multiplied by the space-group order (symmetry copies per
    cell). If the model has no hydrogens, standard amino-acid residues get their hydrogens from the
    residue formulas.
    """
    import iotbx.pdb  # heavy (the whole PDB hierarchy), and only for the optional PDB/mmCIF input

    pdb_inp = iotbx.pdb.input(file_name=str(path))
    symm = pdb_inp.crystal_symmetry()
    if symm is None or symm.unit_cell() is None or symm.space_group_info() is None:
        raise ValueError(f"{path}: no crystal symmetry (CRYST1 / _cell) in the model")
    hierarchy = pdb_inp.construct_hierarchy()
    counts = Counter()
    has_h = False
    n_h_from_residues = 0.0
    for chain in hierarchy.chains():
        for rg in chain.residue_groups():
            ag = rg.atom_groups()[0]
            for atom in ag.atoms():
                el = atom.element.strip() or atom.name.strip()[:1]
                el = _element(el)
                if el in ("H", "D"):
                    has_h = True
                    el = "H"
                counts[el] += float(atom.occ)
            aa = THREE_TO_ONE.get(ag.resname.strip().upper())
            if aa is not None:
                n_h_from_residues += parse_formula(RESIDUE_FORMULAS[aa]).get("H", 0.0)
    if add_missing_hydrogens and not has_h:
        counts["H"] += n_h_from_residues
    order = symm.space_group().order_z()
    return {k: v * order for k, v in counts.items()}, float(symm.unit_cell().volume())


def merge_compositions(*parts: Mapping[str, float]) -> dict[str, float]:
    out = Counter()
    for p in parts:
        for k, v in p.items():
            out[k] += v
    return dict(out)


# ----------------------------------------------------------------------------- scattering factors
@lru_cache(maxsize=None)
def atomic_number(element: str) -> int:
    try:
        return int(tiny_pse.table(element).atomic_number())
    except RuntimeError as exc:
        raise ValueError(f"unknown element {element!r}") from exc


@lru_cache(maxsize=None)
def _wk1995(element: str):
    g = xray_scattering.wk1995(element, True).fetch()
    return np.array(g.array_of_a()), np.array(g.array_of_b()), float(g.c())


def f0(element: str, s: np.ndarray) -> np.ndarray:
    """Waasmaier-Kirfel f0 (e) at |s| = 1/d (1/Å), vectorised (cctbx coefficients)."""
    a, b, c = _wk1995(element)
    stol2 = (np.asarray(s, dtype=float) / 2.0) ** 2
    return np.exp(-np.multiply.outer(stol2, b)) @ a + c


def anomalous(element: str, wavelength: float) -> tuple[float, float]:
    """(f', f'') from cctbx's Henke table at ``wavelength`` (Å)."""
    f = henke.table(element).at_angstrom(float(wavelength))
    return float(f.fp()), float(f.fdp())


def coherent_sum_f2(s: np.ndarray, composition: Mapping[str, float], wavelength: Optional[float] = None) -> np.ndarray:
    """Independent-atom coherent scattering sum_j |f_j(s)|^2 per unit cell (e.u.)."""
    s = np.asarray(s, dtype=float)
    out = np.zeros_like(s)
    for el, n in composition.items():
        f = f0(el, s)
        if wavelength is not None:
            fp, fdp = anomalous(el, wavelength)
            out += n * ((f + fp) ** 2 + fdp ** 2)
        else:
            out += n * f * f
    return out


def breit_dirac(s: np.ndarray, wavelength: float) -> np.ndarray:
    """Breit-Dirac recoil factor [1 + (lambda_C/lambda)(1 - cos 2theta)]^-2 = (lambda/lambda')^2 at |s| = 1/d.

    Exponent 2 for a photon-counting detector (the low-energy limit of Klein-Nishina / Thomson); an
    energy-integrating detector would see the cube. ``wavelength`` in Å; tested against CODATA constants.
    """
    sin_t = np.clip(np.asarray(s, dtype=float) * wavelength / 2.0, 0.0, 1.0)
    one_minus_cos2t = 2.0 * sin_t ** 2
    return (1.0 + (COMPTON_WAVELENGTH / wavelength) * one_minus_cos2t) ** -2


@lru_cache(maxsize=None)
def _sf_compt_table(z: int, s_max: float, n: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    """S(x, Z) of xraylib on |s| in [0, s_max] (x = sin(theta)/lambda = |s|/2), S(0) = 0, S ~ x^2 below x = 0.005."""
    s = np.linspace(0.0, s_max, n)
    x = s / 2.0
    # the tables start at x = 0.005 1/Å; below it S grows as x^2 from S(0) = 0
    x0 = 0.005
    s0 = xraylib.SF_Compt(int(z), x0)
    vals = np.array([s0 * (v / x0) ** 2 if v < x0 else xraylib.SF_Compt(int(z), float(v)) for v in x])
    return s, vals


def incoherent_function(element: str, s: np.ndarray) -> np.ndarray:
    """Incoherent scattering function S(x, Z) (electrons) at |s| = 1/d (1/Å), x = |s|/2.

    From xraylib's ``SF_Compt`` (Hubbell et al. 1975 tabulation), interpolated on a 4097-point grid
    (the function is smooth; grid step < 1e-3 1/Å for |s| up to 4 1/Å).
    """
    s = np.asarray(s, dtype=float)
    z = atomic_number(element)
    top = float(np.nanmax(s)) if s.size else 0.0
    s_max = max(4.0, 2.0 ** math.ceil(math.log2(max(top, 1e-9))))
    grid, vals = _sf_compt_table(z, s_max)
    return np.interp(s, grid, vals)


def incoherent_scattering(s: np.ndarray, composition: Mapping[str, float], wavelength: Optional[float] = None) -> np.ndarray:
    """Compton scattering per unit cell (e.u.): sum_j n_j S_j(|s|/2) [x Breit-Dirac if wavelength].

    S from xraylib (Hubbell et al. 1975 tables), see :func:`incoherent_function`.
    """
    s = np.asarray(s, dtype=float)
    out = np.zeros_like(s)
    for el, n in composition.items():
        out += n * incoherent_function(el, s)
    if wavelength is not None:
        out *= breit_dirac(s, wavelength)
    return out


def waller_hartree_approx(s: np.ndarray, element: str) -> np.ndarray:
    """Z - f0^2/Z: the one-electron-factor approximation of the incoherent function (exact for H; kept
    only as a cross-check of the tabulated S)."""
    z = atomic_number(element)
    f = f0(element, s)
    return np.clip(z - f * f / z, 0.0, None)


def total_electrons(composition: Mapping[str, float]) -> float:
    return float(sum(n * atomic_number(el) for el, n in composition.items()))


# ----------------------------------------------------------------------------- sum rule
def shell_edges(s_max: float, n_shells: int, s_min: float = 0.0) -> np.ndarray:
    """Shell edges equally spaced in |s|^3 (equal reciprocal volume per shell)."""
    return np.cbrt(np.linspace(s_min ** 3, s_max ** 3, n_shells + 1))


def shell_profile(edges: np.ndarray, diffuse_s: Optional[np.ndarray] = None, diffuse_I: Optional[np.ndarray] = None,
                  bragg_s: Optional[np.ndarray] = None, bragg_I: Optional[np.ndarray] = None):
    """Mean total scattering per shell: mean diffuse map value + mean Bragg intensity (per unit cell).

    With one reciprocal-lattice point per 1/V_cell of reciprocal volume, the Bragg density averaged over
    a shell is the mean |F|^2 of the shell's reflections, so incomplete shells are handled by averaging
    what was measured. Returns (mean, n_diffuse, n_bragg); shells with no data get NaN.
    """
    edges = np.asarray(edges, dtype=float)
    nb = len(edges) - 1
    total = np.zeros(nb)
    seen = np.zeros(nb, dtype=bool)
    counts = []
    for s, v in ((diffuse_s, diffuse_I), (bragg_s, bragg_I)):
        if s is None:
            counts.append(np.zeros(nb, dtype=int))
            continue
        s = np.asarray(s, dtype=float)
        v = np.asarray(v, dtype=float)
        ok = np.isfinite(v) & (s >= edges[0]) & (s < edges[-1])
        idx = np.searchsorted(edges, s[ok], side="right") - 1
        n = np.bincount(idx, minlength=nb)
        sm = np.bincount(idx, v[ok], minlength=nb)
        with np.errstate(invalid="ignore", divide="ignore"):
            total += np.where(n > 0, sm / np.maximum(n, 1), 0.0)
        seen |= n > 0
        counts.append(n)
    return np.where(seen, total, np.nan), counts[0], counts[1]


def krogh_moe_scale(edges: np.ndarray, shell_mean: np.ndarray, composition: Mapping[str, float],
                    cell_volume: float, wavelength: Optional[float] = None, forward_term: bool = True,
                    n_grid: int = 4000) -> dict:
    """Scale K putting observed intensities on e.u. per unit cell via the Krogh-Moe / Norman sum rule.

    ``edges`` (1/Å) and ``shell_mean`` describe the observed total (Bragg + diffuse) scattering; the
    theoretical side is integrated from 0 to ``edges[-1]``. Returns K and the terms of the balance.
    """
    edges = np.asarray(edges, dtype=float)
    shell_mean = np.asarray(shell_mean, dtype=float)
    if cell_volume <= 0:
        raise ValueError("cell volume must be > 0")
    vol = 4.0 * np.pi / 3.0 * (edges[1:] ** 3 - edges[:-1] ** 3)
    ok = np.isfinite(shell_mean)
    if not ok.any():
        raise ValueError("no observed shells")
    observed = float(np.sum(shell_mean[ok] * vol[ok]))
    s_max = float(edges[-1])
    s = np.linspace(0.0, s_max, n_grid + 1)
    integrand = 4.0 * np.pi * s ** 2 * (coherent_sum_f2(s, composition, wavelength)
                                        + incoherent_scattering(s, composition, wavelength))
    theory = float(np.trapz(integrand, s))
    f000 = total_electrons(composition)
    fwd = f000 ** 2 / cell_volume if forward_term else 0.0
    if observed <= 0:
        raise ValueError("observed integral is not positive")
    k = (theory - fwd) / observed
    return {"scale": k, "theory_integral": theory, "forward_term": fwd, "observed_integral": observed,
            "s_max": s_max, "F000": f000, "cell_volume": float(cell_volume),
            "shells_used": int(ok.sum()), "unmeasured_shells": int((~ok).sum())}


def absolute_diffuse(values: np.ndarray, s: np.ndarray, scale: float, composition: Mapping[str, float],
                     wavelength: Optional[float] = None) -> np.ndarray:
    """Diffuse map on e.u. per unit cell with the theoretical Compton scattering removed: K I - I_inc(s)."""
    return scale * np.asarray(values, dtype=float) - incoherent_scattering(s, composition, wavelength)


def composition_from_spec(formula: Optional[str] = None, sequence: Optional[str] = None,
                          pdb: Optional[str | Path] = None, copies: float = ABSOLUTE_DEFAULTS.copies,
                          extra_formula: Optional[str] = None) -> tuple[dict[str, float], Optional[float]]:
    """Unit-cell composition from exactly one of formula / sequence (x copies per cell) / PDB model.

    ``extra_formula`` (e.g. ``(H2O)1500`` for ordered + bulk solvent per cell) is added to it.
    Returns (composition, cell volume from the PDB or None).
    """
    given = [x is not None for x in (formula, sequence, pdb)]
    if sum(given) != 1:
        raise ValueError("give exactly one of formula, sequence or pdb for the unit-cell composition")
    vol = None
    if formula is not None:
        comp = parse_formula(formula, copies)
    elif sequence is not None:
        try:
            is_file = len(str(sequence)) < 4096 and Path(str(sequence)).is_file()
        except OSError:
            is_file = False
        text = Path(sequence).read_text() if is_file else str(sequence)
        comp = composition_from_sequence(text, copies)
    else:
        comp, vol = composition_from_pdb(pdb)
    if extra_formula:
        comp = merge_compositions(comp, parse_formula(extra_formula))
    return comp, vol
