"""Independent PILATUS-style stills with planted diffuse scattering, rendered with nanoBragg's physics.

Nothing here comes from the diffuse-extractor or the voxel-merger: every crystal term is rendered by this
project's differentiable simulator (:mod:`diff_sim_refiner.core`, which reproduces nanoBragg C images),
so the polarisation (Kahn factor), the pixel solid angle and the lattice transforms are nanoBragg's.

One still ``i`` holds Poisson counts of

    dose * { scale_i * [ Bragg + diffuse ] + background } * air

- **Bragg**: a large crystal (``bragg_cells`` unit cells, nanoBragg's ``-gauss_xtal`` lattice transform,
  ``mosaic_domains`` domains spread over ``mosaic_spread_deg``, ``bragg_oversample``^2 sub-pixels),
- **diffuse**: a small Gaussian-shaped crystal of ``diffuse_cells`` cells with the same structure factors
  (a broad halo around each reciprocal lattice point), one domain, no oversampling,
- **background**: an isotropic water ring plus a smooth air-scatter term and a flat floor, functions of
  |q| only, the same in every still and NOT multiplied by the per-still scale,

each carrying nanoBragg's polarisation and solid-angle factors; ``air`` is the sample-to-pixel air
transmission ``exp(-mu_air * air_path_fraction * L)``. There is no sensor absorption and no parallax (the
CBF has no sensor line, so dxtbx gives the panel zero thickness). Module gaps read -1, as PILATUS reports.
Background-only frames (same geometry and exposure, no crystal) are written beside the stills.

The truth (:class:`DiffuseTruth`, :func:`diffuse_truth`, :func:`truth_on_voxels`) is evaluated in reciprocal
space from the structure factors and the lattice transform, in the units of a corrected map; see
:meth:`DiffuseTruth.__call__` for the exact convention.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from diff_sim_refiner.core.config import R_E_SQR, BeamConfig, CrystalConfig, DetectorConfig
from diff_sim_refiner.core.io import HKLTable

from .cbf import CBFHeader, write_minicbf

PILATUS_MODULE = (487, 195)   # fast, slow pixels of one module
PILATUS_GAP = (7, 17)         # fast, slow gap pixels between modules
#: NIST "Air, Dry (near sea level)": mass fractions and density (g/cm^3)
AIR_MASS_FRACTIONS = {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827}
AIR_DENSITY_G_CM3 = 1.20479e-3
#: nanoBragg's gauss_xtal constant: F_latt = N exp(-|dq|^2 N^2 / 0.63), N = Na Nb Nc, dq in 1/Angstrom
GAUSS_XTAL_C = 0.63
#: the polarisation fraction dxtbx gives a PILATUS mini-CBF (its header's ``# Polarization`` is not read)
DXTBX_MINICBF_POLARIZATION = 0.999
STRUCTURE_FACTORS_FILE = "structure_factors.npz"


@dataclass
class SceneSpec:
    """The crystal, detector, background and photon levels every generator of this package renders (the stills
    here, the rotation sweep in :mod:`.sweep`). Lengths in mm, wavelength and cell in Angstrom, angles in degrees,
    |q| = 1/d in 1/Angstrom.

    Photon levels are "per reference pixel" (a pixel of solid angle ``pixel_mm^2 / distance_mm^2`` at
    normal incidence), for unit per-image scale, before polarisation, solid-angle and air factors, at dose 1;
    ``dose`` multiplies everything (crystal and background).
    """

    unit_cell: tuple[float, float, float, float, float, float] = (40.0, 40.0, 60.0, 90.0, 90.0, 90.0)
    space_group: str = "P 43 21 2"
    modules: tuple[int, int] = (2, 3)            # PILATUS modules along fast, slow
    pixel_mm: float = 0.172
    distance_mm: float = 150.0
    wavelength_A: float = 1.0
    #: direct-beam position as fractions of the array (fast, slow): off the array centre
    beam_centre_frac: tuple[float, float] = (0.431, 0.562)
    exposure_s: float = 0.1
    #: dxtbx's convention (Kahn factor K = 2 f - 1). Only 0.999 is allowed: dxtbx's mini-CBF reader ignores the
    #: header's ``# Polarization`` line and gives every PILATUS frame 0.999 (``BeamFactory.simple``), so frames
    #: rendered with another fraction would be corrected with 0.999 by DIALS and by the extractor (a 1-5 %
    #: azimuth- and resolution-dependent error at f = 0.8)
    polarization_fraction: float = DXTBX_MINICBF_POLARIZATION
    dose: float = 1.0
    seed: int = 2026                             # structure factors, orientations, scales
    noise_seed: int = 0                          # Poisson draws (dose_pair changes only this)
    wilson_B: float = 10.0                       # A^2: <|F|^2> = exp(-B |q|^2 / 2)
    # Bragg crystal
    bragg_cells: tuple[int, int, int] = (12, 12, 8)
    mosaic_spread_deg: float = 0.4
    mosaic_domains: int = 20
    bragg_oversample: int = 3
    #: photons at the exact Bragg condition (domain-averaged peak) of a reflection with |F|^2 = <|F|^2>(q=0)
    bragg_peak_photons: float = 10000.0
    # diffuse crystal
    diffuse_cells: tuple[int, int, int] = (4, 4, 4)
    #: diffuse photons averaged over reciprocal space at q -> 0 (the halo peak is this / mean halo profile)
    diffuse_mean_photons: float = 7.0
    # background (isotropic in |q|, same in every image)
    water_ring_photons: float = 4.0
    water_ring_q: float = 0.32
    water_ring_width: float = 0.05
    air_scatter_photons: float = 6.0             # at |q| = 0
    air_scatter_q0: float = 0.12                 # e-folding |q|
    flat_photons: float = 2.0
    air_path_fraction: float = 1.0               # sample-to-pixel path in air (0 = vacuum)

    def __post_init__(self):
        for name in ("unit_cell", "modules", "beam_centre_frac", "bragg_cells", "diffuse_cells"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.dose <= 0:
            raise ValueError(f"dose must be > 0, got {self.dose}")
        if abs(self.polarization_fraction - DXTBX_MINICBF_POLARIZATION) > 1e-9:
            raise ValueError(f"polarization_fraction {self.polarization_fraction}: dxtbx reads every mini-CBF as "
                             f"{DXTBX_MINICBF_POLARIZATION} whatever its header says, so frames rendered with another "
                             "fraction would be corrected with the wrong one")

    @property
    def image_size(self) -> tuple[int, int]:
        """(fast, slow) pixels including the gaps."""
        nf = self.modules[0] * PILATUS_MODULE[0] + (self.modules[0] - 1) * PILATUS_GAP[0]
        ns = self.modules[1] * PILATUS_MODULE[1] + (self.modules[1] - 1) * PILATUS_GAP[1]
        return nf, ns

    @property
    def beam_xy_px(self) -> tuple[float, float]:
        """Beam centre in pixels from the outer corner of pixel (0, 0), rounded as the CBF header writes it."""
        nf, ns = self.image_size
        return round(self.beam_centre_frac[0] * nf, 3), round(self.beam_centre_frac[1] * ns, 3)


@dataclass
class StillsSpec(SceneSpec):
    """What to render: ``n_stills`` randomly oriented stills with log-normal scales and ``n_background_frames``
    background-only frames of the scene (:class:`SceneSpec`: units, levels)."""

    n_stills: int = 20
    n_background_frames: int = 2
    #: exposure of the background-only frames (None: exposure_s); their counts scale with it, and their header says it
    background_exposure_s: Optional[float] = None
    scale_sigma: float = 0.2                     # log-normal sigma of the per-still scales

    def __post_init__(self):
        super().__post_init__()
        if self.n_stills < 0 or self.n_background_frames < 0:
            raise ValueError("n_stills and n_background_frames must be >= 0")


# ----------------------------------------------------------------------------- geometry (dxtbx's lab frame)
def gap_mask(spec: StillsSpec) -> np.ndarray:
    """True on inter-module gap pixels, shape (slow, fast)."""
    nf, ns = spec.image_size
    fx = np.arange(nf) % (PILATUS_MODULE[0] + PILATUS_GAP[0]) >= PILATUS_MODULE[0]
    sy = np.arange(ns) % (PILATUS_MODULE[1] + PILATUS_GAP[1]) >= PILATUS_MODULE[1]
    return sy[:, None] | fx[None, :]


def detector_frame(spec: StillsSpec) -> dict:
    """The flat detector as a PILATUS mini-CBF describes it (dxtbx's frame: beam along -z, fast +x, slow -y):
    origin = lab position (mm) of the outer corner of pixel (0, 0), unit fast/slow/normal axes, beam direction."""
    bx, by = spec.beam_xy_px
    fast, slow = np.array([1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0])
    beam = np.array([0.0, 0.0, -1.0])
    origin = spec.distance_mm * beam - bx * spec.pixel_mm * fast - by * spec.pixel_mm * slow
    return {"origin_mm": origin, "fast": fast, "slow": slow, "normal": beam, "beam": beam}


def pixel_q(spec: StillsSpec) -> tuple[np.ndarray, np.ndarray]:
    """Lab positions of pixel centres (slow, fast, 3) in mm and scattering vectors q = (s1 - s0) (slow, fast, 3)
    in 1/Angstrom (|q| = 1/d)."""
    g = detector_frame(spec)
    nf, ns = spec.image_size
    f = (np.arange(nf) + 0.5) * spec.pixel_mm
    s = (np.arange(ns) + 0.5) * spec.pixel_mm
    pos = g["origin_mm"] + s[:, None, None] * g["slow"] + f[None, :, None] * g["fast"]
    u = pos / np.linalg.norm(pos, axis=-1, keepdims=True)
    return pos, (u - g["beam"]) / spec.wavelength_A


def air_mu_per_mm(wavelength_A: float) -> float:
    """Linear attenuation coefficient (1/mm) of dry air from cctbx's NIST tables (Hubbell & Seltzer)."""
    # cctbx (about 1 s to import) in the functions that need it, so reading a truth back stays light
    from cctbx.eltbx import attenuation_coefficient

    mu_rho = sum(w * attenuation_coefficient.get_table(el).mu_rho_at_angstrom(wavelength_A)
                 for el, w in AIR_MASS_FRACTIONS.items())             # cm^2/g
    return mu_rho * AIR_DENSITY_G_CM3 / 10.0


def reciprocal_basis(unit_cell) -> np.ndarray:
    """B (3x3, 1/Angstrom): columns a*, b*, c* in the crystal's Cartesian frame (dxtbx/cctbx convention)."""
    from cctbx import uctbx  # DIALS/cctbx (1-3 s): only when a cell is built

    return np.asarray(uctbx.unit_cell(tuple(unit_cell)).fractionalization_matrix(), float).reshape(3, 3).T


def background_q(q: np.ndarray, spec: StillsSpec) -> np.ndarray:
    """Background photons per reference pixel at |q| (before polarisation, solid angle, air), dose 1."""
    return (spec.water_ring_photons * np.exp(-0.5 * ((q - spec.water_ring_q) / spec.water_ring_width) ** 2)
            + spec.air_scatter_photons * np.exp(-q / spec.air_scatter_q0) + spec.flat_photons)


# ----------------------------------------------------------------------------- structure factors
def make_structure_factors(spec: StillsSpec, d_min: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Random, reproducible |F| with the space group's symmetry on a dense (h, k, l) grid.

    |F|^2 of each unique reflection is exponential (acentric Wilson statistics) with mean exp(-B q^2 / 2)
    (so <|F|^2> -> 1 at q -> 0), expanded to P1 and Friedel mates by cctbx; systematic absences and F(000)
    are 0. Returns (grid F[h - hmin, k - kmin, l - lmin], (hmin, kmin, lmin)).
    """
    # DIALS/cctbx (1-3 s) only to build the structure factors: reading a truth back stays light
    from cctbx import crystal, miller
    from cctbx.array_family import flex

    cs = crystal.symmetry(unit_cell=spec.unit_cell, space_group_symbol=spec.space_group)
    ms = miller.build_set(cs, anomalous_flag=False, d_min=d_min).remove_systematic_absences()
    rng = np.random.default_rng([spec.seed, 1])
    f2 = rng.exponential(1.0, ms.size()) * np.exp(-0.5 * spec.wilson_B * ms.d_star_sq().data().as_numpy_array())
    arr = miller.array(ms, data=flex.double(np.sqrt(f2))).expand_to_p1().generate_bijvoet_mates()
    hkl = np.asarray(arr.indices(), dtype=np.int64).reshape(-1, 3)
    mins = hkl.min(0)
    grid = np.zeros(tuple(hkl.max(0) - mins + 1))
    grid[tuple((hkl - mins).T)] = arr.data().as_numpy_array()
    return grid, tuple(int(m) for m in mins)


def gauss_profile(d: np.ndarray, B: np.ndarray, cells) -> np.ndarray:
    """Peak-normalised |F_latt|^2 of nanoBragg's Gaussian crystal at fractional offsets d (..., 3) from a
    lattice point: exp(-2 |B d|^2 (Na Nb Nc)^2 / 0.63)."""
    n = float(np.prod(cells))
    dq = d @ B.T
    return np.exp(-2.0 * (dq * dq).sum(-1) * n * n / GAUSS_XTAL_C)


def mean_gauss_profile(B: np.ndarray, cells, n: int = 32) -> float:
    """Mean of :func:`gauss_profile` over one reciprocal cell with nanoBragg's nearest-lattice-point rule
    (offsets in [-1/2, 1/2)^3, midpoint rule on n^3 points)."""
    t = (np.arange(n) + 0.5) / n - 0.5
    d = np.stack(np.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3)
    return float(gauss_profile(d, B, cells).mean())


# ----------------------------------------------------------------------------- truth
class DiffuseTruth:
    """The diffuse map an ideal extraction measures, as a function of fractional Miller indices.

    ``T(h) = dose * diffuse_peak * |F(h0)|^2 * exp(-2 |B (h - h0)|^2 (Na Nb Nc)^2 / 0.63)``
    with ``h0`` the nearest integer triple (nanoBragg's ``ceil(h - 1/2)``: the simulator, like nanoBragg,
    evaluates the lattice transform of the nearest reciprocal lattice point only, so the "sum over nearby
    points" is that one term), ``B`` the reciprocal basis (1/Angstrom), ``diffuse_peak =
    diffuse_mean_photons / mean_gauss_profile`` and ``|F|`` the saved structure factors (0 outside the grid).

    Units: photons per reference pixel (solid angle ``pixel^2 / distance^2``, normal incidence), with
    polarisation and air absorption removed, at unit per-still scale, background subtracted, Bragg term
    excluded, at the dataset's dose. That is, the raw expected counts of a still are
    ``scale_i * (T(h) + Bragg) * P * (Omega / Omega_ref) * air + background``, and
    ``(raw - background) / (P * Omega / Omega_ref * air) / scale_i = T`` where the Bragg term vanishes.
    """

    def __init__(self, F: np.ndarray, mins, B: np.ndarray, cells, peak: float):
        self.F = np.asarray(F, float)
        self.mins = np.asarray(mins, np.int64)
        self.B = np.asarray(B, float)
        self.cells = tuple(int(c) for c in cells)
        self.peak = float(peak)

    @classmethod
    def load(cls, truth) -> "DiffuseTruth":
        """From a truth dict (as returned by :func:`generate_stills` or read from truth.json) or its directory."""
        if isinstance(truth, DiffuseTruth):
            return truth
        if isinstance(truth, (str, Path)):
            d = Path(truth)
            truth = json.loads((d / "truth.json").read_text())
            truth["out_dir"] = str(d)
        sf = np.load(Path(truth["out_dir"]) / truth["structure_factors_file"])
        t = truth["diffuse_truth"]
        return cls(sf["F"], sf["mins"], np.asarray(t["B"]), t["cells"], t["peak_photons"])

    def F_at(self, h0: np.ndarray) -> np.ndarray:
        """|F| at integer indices (..., 3); 0 outside the grid."""
        i = h0.astype(np.int64) - self.mins
        inside = np.all((i >= 0) & (i < np.asarray(self.F.shape)), axis=-1)
        i = np.where(inside[..., None], i, 0)
        return np.where(inside, self.F[i[..., 0], i[..., 1], i[..., 2]], 0.0)

    def __call__(self, h, k, l) -> np.ndarray:
        hkl = np.stack(np.broadcast_arrays(np.asarray(h, float), np.asarray(k, float), np.asarray(l, float)), -1)
        h0 = np.ceil(hkl - 0.5)
        F = self.F_at(h0)
        return self.peak * F * F * gauss_profile(hkl - h0, self.B, self.cells)

    def on_voxels(self, hkl_centres, ndiv, sub: int = 3) -> np.ndarray:
        """Mean of the truth over each voxel (``sub``^3 midpoint samples); voxels are 1/ndiv wide in h, k, l
        (``ndiv`` an int or 3 ints), centred on ``hkl_centres`` (n, 3)."""
        c = np.asarray(hkl_centres, float).reshape(-1, 3)
        nd = np.broadcast_to(np.asarray(ndiv, float), (3,))
        t = ((np.arange(sub) + 0.5) / sub - 0.5)
        off = np.stack(np.meshgrid(t, t, t, indexing="ij"), -1).reshape(-1, 3) / nd
        out = np.zeros(len(c))
        for o in off:
            p = c + o
            out += self(p[:, 0], p[:, 1], p[:, 2])
        return out / len(off)


def diffuse_truth(h, k, l, truth) -> np.ndarray:
    """The planted diffuse intensity at fractional (h, k, l); ``truth`` = the dict of :func:`generate_stills`,
    its directory or a :class:`DiffuseTruth`. Convention: :class:`DiffuseTruth`."""
    return DiffuseTruth.load(truth)(h, k, l)


def truth_on_voxels(hkl_centres, ndiv, truth, sub: int = 3) -> np.ndarray:
    """Voxel-averaged truth (``sub``^3 samples per voxel of width 1/ndiv): :meth:`DiffuseTruth.on_voxels`."""
    return DiffuseTruth.load(truth).on_voxels(hkl_centres, ndiv, sub)


# ----------------------------------------------------------------------------- rendering
class _Threads:
    """torch's intra-op thread count set for a block and restored after it."""

    def __init__(self, torch, n: int):
        self.torch, self.n = torch, n

    def __enter__(self):
        self.before = self.torch.get_num_threads()
        self.torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        self.torch.set_num_threads(self.before)


class StillsRenderer:
    """Noise-free expected photons per still (slow, fast), from the simulator; geometry set up once.

    ``threads``: torch threads for the renders (default 1: the many small per-domain renders run about 4x
    faster single-threaded on a busy 2-core machine, where OpenMP workers spin waiting for a core).
    """

    def __init__(self, spec: StillsSpec, threads: int = 1):
        # torch and the simulator only to render: reading a truth back (DiffuseTruth, pixel_q, the demo's checks)
        # stays light, and a caller that loaded DIALS first is the caller's import order to get right (tests/conftest)
        import torch

        from diff_sim_refiner.core.simulator import prepare, render

        self.spec = spec
        self._torch, self._prepare, self._render = torch, prepare, render
        self._threads = lambda: _Threads(torch, max(1, int(threads)))
        self._CrystalConfig = CrystalConfig
        g = detector_frame(spec)
        nf, ns = spec.image_size
        self.detector = DetectorConfig(
            distance_mm=spec.distance_mm, pixel_size_mm=spec.pixel_mm, fpixels=nf, spixels=ns,
            detector_convention="CUSTOM", custom_fdet_vector=tuple(g["fast"]), custom_sdet_vector=tuple(g["slow"]),
            custom_odet_vector=tuple(g["normal"]), custom_beam_vector=tuple(g["beam"]),
            custom_polar_vector=(1.0, 0.0, 0.0), pix0_override_m=tuple(g["origin_mm"] * 1e-3), oversample=1)
        # fluence 1/r_e^2: the simulator returns sum |F|^2 |F_latt|^2 * P * Omega / steps (Omega in sr)
        self.beam = BeamConfig(wavelength_A=spec.wavelength_A, fluence=1.0 / R_E_SQR,
                               polarization_factor=2.0 * spec.polarization_fraction - 1.0)
        self.omega_ref = (spec.pixel_mm / spec.distance_mm) ** 2
        self.pos_mm, self.q = pixel_q(spec)
        self.qmag = np.linalg.norm(self.q, axis=-1)
        self.air = np.exp(-air_mu_per_mm(spec.wavelength_A) * spec.air_path_fraction
                          * np.linalg.norm(self.pos_mm, axis=-1))
        self.gaps = gap_mask(spec)
        self.B = reciprocal_basis(spec.unit_cell)
        s_max = float(self.qmag.max())
        self.F, self.F_mins = make_structure_factors(spec, d_min=0.98 / s_max)
        self.table = HKLTable(F=self.F, h_min=self.F_mins[0], k_min=self.F_mins[1], l_min=self.F_mins[2],
                              default_F=0.0, n_reflections=int(np.count_nonzero(self.F)))
        self.diffuse_peak = spec.diffuse_mean_photons / mean_gauss_profile(self.B, spec.diffuse_cells)
        # polarisation x solid angle / Omega_ref from the simulator: a one-cell crystal with F = 1 everywhere
        unit = CrystalConfig(N_cells=(1, 1, 1), default_F=1.0, interpolate=False,
                             mosflm_a_star=tuple(self.B[:, 0]), mosflm_b_star=tuple(self.B[:, 1]),
                             mosflm_c_star=tuple(self.B[:, 2]))
        with torch.no_grad(), self._threads():
            p = prepare(unit, self.detector, self.beam, None, dtype=torch.float64)
            self.pol_omega = render(p, self.detector).numpy() / self.omega_ref
        self.background = background_q(self.qmag, spec) * self.pol_omega * self.air   # per unit dose

    def _crystal(self, A: np.ndarray, cells, shape: str, mosaic: bool):
        s = self.spec
        return self._CrystalConfig(
            N_cells=tuple(float(c) for c in cells), shape=shape, default_F=0.0, interpolate=False,
            mosflm_a_star=tuple(A[:, 0]), mosflm_b_star=tuple(A[:, 1]), mosflm_c_star=tuple(A[:, 2]),
            mosaic_spread_deg=s.mosaic_spread_deg if mosaic else 0.0,
            mosaic_domains=s.mosaic_domains if mosaic else 1, mosaic_seed=12345678)

    def diffuse(self, A: np.ndarray) -> np.ndarray:
        """Diffuse photons (unit scale, dose 1, with P, Omega, air) for orientation A = U B (columns a*, b*, c*)."""
        torch = self._torch
        cr = self._crystal(A, self.spec.diffuse_cells, "GAUSS", mosaic=False)
        with torch.no_grad(), self._threads():
            p = self._prepare(cr, self.detector, self.beam, self.table, dtype=torch.float32)
            img = self._render(p, self.detector).numpy().astype(np.float64)
        n = float(np.prod(self.spec.diffuse_cells))
        return img * (self.diffuse_peak / (n * n * self.omega_ref)) * self.air

    def bragg(self, A: np.ndarray) -> np.ndarray:
        """Bragg photons (unit scale, dose 1, with P, Omega, air), rendered only where a lattice point is near."""
        torch, s = self._torch, self.spec
        n = float(np.prod(s.bragg_cells))
        sigma_q = math.sqrt(GAUSS_XTAL_C) / (2.0 * n)
        det = self.detector.replace(oversample=s.bragg_oversample)
        reach = 5.0 * sigma_q + 0.9 * s.pixel_mm / s.distance_mm / s.wavelength_A
        q = self.q.reshape(-1, 3).astype(np.float32)
        img = np.zeros(self.q.shape[:2])
        with torch.no_grad(), self._threads():
            # nanoBragg's mosaic domains (the simulator's own rotations), then one single-domain render per domain
            # restricted to the pixels within 5 sigma (+ a pixel's reach) of one of its lattice points; elsewhere
            # the Gaussian lattice transform is below exp(-12.5) of its peak. The image is the domain mean, as
            # nanoBragg's (its steps count the domains).
            domains = self._prepare(self._crystal(A, s.bragg_cells, "GAUSS", mosaic=True), det, self.beam, None,
                                    dtype=torch.float64).A.numpy() * 1e10        # rows a, b, c (Angstrom)
            for M in domains:
                Minv = np.linalg.inv(M)                                         # columns a*, b*, c*
                dq = q - np.ceil(q @ M.T.astype(np.float32) - 0.5) @ Minv.T.astype(np.float32)
                near = np.einsum("ij,ij->i", dq, dq) < reach * reach
                if not near.any():
                    continue
                cr = self._crystal(Minv, s.bragg_cells, "GAUSS", mosaic=False)
                p = self._prepare(cr, det, self.beam, self.table, dtype=torch.float32)
                mask = torch.from_numpy(near.reshape(self.q.shape[:2]))
                img += self._render(p, det, pixel_mask=mask).numpy()
        img /= len(domains)
        return img * (s.bragg_peak_photons / (n * n * self.omega_ref)) * self.air


def _orientations(spec: StillsSpec) -> tuple[list[np.ndarray], np.ndarray]:
    """Uniformly random U (dxtbx convention, q = U B h) and log-normal scales (median 1); still i's draw depends
    on (seed, i) only, so a run's first stills are the same whatever n_stills."""
    from scipy.spatial.transform import Rotation  # scipy (0.2 s): only when orientations are drawn

    U, scales = [], []
    for i in range(spec.n_stills):
        rng = np.random.default_rng([spec.seed, 2, i])
        U.append(Rotation.random(random_state=rng).as_matrix())
        scales.append(math.exp(rng.normal(0.0, spec.scale_sigma)))
    return U, np.asarray(scales)


def start_truth(out: Path, generator: str, spec: SceneSpec, geometry: SceneSpec, r: StillsRenderer, *, units: str,
                conventions: str) -> dict:
    """Save the renderer's structure factors in ``out`` and return the truth keys every generator writes (what
    :class:`DiffuseTruth` loads): ``spec`` (the generator's, as a dict), crystal, detector (``geometry``: the
    renderer's), reference solid angle, air, the diffuse truth's constants and their ``units``, ``conventions``."""
    np.savez_compressed(out / STRUCTURE_FACTORS_FILE, F=r.F, mins=np.asarray(r.F_mins))
    nf, ns = spec.image_size
    return {
        "generator": generator,
        "spec": asdict(spec),
        "out_dir": str(out),
        "unit_cell": list(spec.unit_cell),
        "space_group": spec.space_group,
        "dose": spec.dose,
        "image_size_fast_slow": [nf, ns],
        "beam_xy_px": list(geometry.beam_xy_px),
        "detector_origin_mm": detector_frame(geometry)["origin_mm"].tolist(),
        "reference_solid_angle_sr": r.omega_ref,
        "air_mu_per_mm": air_mu_per_mm(spec.wavelength_A),
        "structure_factors_file": STRUCTURE_FACTORS_FILE,
        "diffuse_truth": {"B": r.B.tolist(), "cells": list(spec.diffuse_cells),
                          "peak_photons": r.diffuse_peak * spec.dose, "units": units},
        "conventions": conventions,
    }


def write_frame(path: Path, expected: np.ndarray, gaps: np.ndarray, rng: np.random.Generator, header: CBFHeader):
    """Poisson counts of ``expected`` photons as a mini-CBF, gap pixels -1."""
    counts = rng.poisson(np.maximum(expected, 0.0)).astype(np.int64)
    counts[gaps] = -1
    write_minicbf(path, counts, header)


def generate_stills(out_dir: str | Path, spec: Optional[StillsSpec] = None,
                    progress: Optional[Callable[[int, int], None]] = None,
                    renderer: Optional[StillsRenderer] = None) -> dict:
    """Write ``still_NNNN.cbf`` (n_stills), ``bkg_NNNN.cbf`` (n_background_frames), ``structure_factors.npz``
    and ``truth.json`` into ``out_dir``; return the truth dict (also what :func:`diffuse_truth` takes).

    ``progress(done, total)`` is called after each frame. Orientations and scales depend on ``seed`` only,
    the Poisson draws on (seed, noise_seed, dose), so the same spec gives identical files. ``renderer``: a
    :class:`StillsRenderer` already set up for a spec with the same geometry, structure factors and levels
    (saves its set-up; it does not depend on n_stills, n_background_frames, dose or noise_seed).
    """
    spec = spec or StillsSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = renderer if renderer is not None else StillsRenderer(spec)
    U, scales = _orientations(spec)
    noise = np.random.default_rng([spec.seed, 3, spec.noise_seed])
    header = CBFHeader(pixel_mm=spec.pixel_mm, distance_mm=spec.distance_mm, wavelength_A=spec.wavelength_A,
                       beam_xy_px=spec.beam_xy_px, exposure_s=spec.exposure_s,
                       polarization=spec.polarization_fraction)
    truth = start_truth(out, "diff_sim_refiner.datasets.stills", spec, spec, r,
                        units="photons per reference pixel (pixel^2/distance^2 sr), polarisation and air removed, "
                              "unit scale, background and Bragg excluded, at this dose",
                        conventions="dxtbx lab frame (beam along -z); A = U B maps h to q = s1 - s0 (1/Angstrom); "
                                    "columns of A are a*, b*, c*")
    truth.update(stills=[], background_frames=[])
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    total = spec.n_stills + spec.n_background_frames
    done = 0
    bkg = spec.dose * r.background
    for i in range(spec.n_stills):
        A = U[i] @ r.B
        expected = spec.dose * scales[i] * (r.diffuse(A) + r.bragg(A)) + bkg
        name = f"still_{i + 1:04d}.cbf"
        write_frame(out / name, expected, r.gaps, noise, header)
        truth["stills"].append({"file": name, "scale": float(scales[i]), "U": U[i].tolist(), "A": A.tolist()})
        done += 1
        if progress:
            progress(done, total)
    bkg_exposure = spec.background_exposure_s or spec.exposure_s
    bkg_header = replace(header, exposure_s=bkg_exposure)
    for j in range(spec.n_background_frames):
        name = f"bkg_{j + 1:04d}.cbf"
        write_frame(out / name, bkg * (bkg_exposure / spec.exposure_s), r.gaps, noise, bkg_header)
        truth["background_frames"].append(name)
        done += 1
        if progress:
            progress(done, total)
    (out / "truth.json").write_text(json.dumps(truth, indent=2))
    return truth


def dose_pair(out_dir: str | Path, spec: Optional[StillsSpec] = None, factor: float = 16.0,
              progress: Optional[Callable[[int, int], None]] = None) -> tuple[dict, dict]:
    """The same stills (orientations, scales, structure factors) at ``spec.dose`` in ``out_dir/high`` and at
    ``spec.dose / factor`` in ``out_dir/low``, with independent Poisson draws. Returns (high, low) truths.

    The low dose is a ``factor`` times shorter exposure (the stills' headers say so); its background-only frames keep
    the high-dose exposure, as a beamline takes them (long enough that their noise does not limit the subtraction;
    the extractor scales them to each still by the exposure ratio in the headers)."""
    spec = spec or StillsSpec()
    out = Path(out_dir)
    r = StillsRenderer(spec)
    high = generate_stills(out / "high", spec, progress, renderer=r)
    low = generate_stills(out / "low", replace(spec, dose=spec.dose / factor, noise_seed=spec.noise_seed + 1,
                                               exposure_s=spec.exposure_s / factor,
                                               background_exposure_s=spec.background_exposure_s or spec.exposure_s),
                          progress, renderer=r)
    return high, low


__all__ = ["StillsSpec", "StillsRenderer", "DiffuseTruth", "generate_stills", "dose_pair", "diffuse_truth",
           "truth_on_voxels", "gap_mask", "detector_frame", "pixel_q", "background_q", "air_mu_per_mm",
           "make_structure_factors", "gauss_profile", "mean_gauss_profile", "reciprocal_basis",
           "PILATUS_MODULE", "PILATUS_GAP"]
