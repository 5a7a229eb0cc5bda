"""Configuration models for the differentiable nanoBragg-physics simulator.

The models are plain dataclasses whose numeric fields may be Python numbers *or* torch tensors,
so a refinement can pass ``torch.tensor(..., requires_grad=True)`` for any continuous parameter
(cell, misset, phi, mosaic spread, distance, beam centre, wavelength, N, fluence) and gradients
flow through :func:`diff_sim_refiner.core.simulator.simulate`.

Units follow nanoBragg's command line: Angstrom for cell lengths and wavelength, degrees for
angles, millimetres for detector lengths, photons/m^2 for fluence.  Defaults are nanoBragg's.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Optional, Sequence, Union

Number = Union[float, int, Any]  # Any: a torch.Tensor (kept untyped so this module does not import torch)
Vec3 = Optional[Sequence[Number]]

#: nanoBragg's default fluence (photons/m^2)
DEFAULT_FLUENCE = 125932015286227086360700780544.0
#: classical electron radius squared, m^2 (nanoBragg's r_e_sqr)
R_E_SQR = 7.94079248018965e-30


class DetectorConvention(str, Enum):
    """nanoBragg's beam-centre / axis conventions."""

    MOSFLM = "MOSFLM"
    XDS = "XDS"
    DIALS = "DIALS"
    ADXV = "ADXV"
    DENZO = "DENZO"
    CUSTOM = "CUSTOM"


class DetectorPivot(str, Enum):
    """What stays fixed when the detector is rotated: the direct-beam spot or the sample-closest point."""

    BEAM = "BEAM"
    SAMPLE = "SAMPLE"


class CrystalShape(str, Enum):
    """Lattice transform: SQUARE (sincg, parallelepiped), ROUND (sinc3), GAUSS, TOPHAT."""

    SQUARE = "SQUARE"
    ROUND = "ROUND"
    GAUSS = "GAUSS"
    TOPHAT = "TOPHAT"


def fval(x) -> float:
    """Plain float of a number or (possibly requires-grad) tensor."""
    return float(x.detach()) if hasattr(x, "detach") else float(x)


def _triple(v, name: str):
    if v is None:
        return None
    if hasattr(v, "shape") and getattr(v, "ndim", 0) == 1 and v.shape[0] == 3:
        return v
    vals = tuple(v)
    if len(vals) != 3:
        raise ValueError(f"{name} needs 3 components, got {len(vals)}")
    return vals


@dataclass
class CrystalConfig:
    """Crystal: unit cell or MOSFLM orientation, misset, spindle rotation, mosaicity, size and shape.

    - ``cell_*``: Angstrom / degrees (ignored when a MOSFLM orientation is given).
    - ``mosflm_a_star`` ...: reciprocal vectors in 1/Angstrom (already divided by the wavelength,
      as returned by :func:`read_mosflm_matrix`), or ``mosflm_matrix``: the raw 3x3 ``A.mat``
      (columns a*, b*, c* times lambda) divided by the *current* wavelength at simulation time,
      so wavelength gradients see it exactly as nanoBragg does.
    - ``misset_deg``: rotations about x, y, z (applied in that order) to the reciprocal vectors.
    - ``phi_start_deg``, ``osc_range_deg``, ``phi_steps``: spindle sweep; step = osc/steps unless
      ``phi_step_deg`` is given.  ``spindle_axis`` None = the detector convention's.
    - ``mosaic_spread_deg``, ``mosaic_domains``, ``mosaic_seed``: nanoBragg's random domains
      (domain 0 is the unrotated crystal; the seed gives the same domains as ``-mosaic_seed``).
    - ``N_cells``: unit cells along a, b, c.  ``shape``/``fudge``: lattice transform.
    - ``default_F``: structure factor for hkl not in the table.  ``interpolate`` None = auto
      (tricubic when any N <= 2, as nanoBragg).
    """

    cell_a: Number = 100.0
    cell_b: Number = 100.0
    cell_c: Number = 100.0
    cell_alpha: Number = 90.0
    cell_beta: Number = 90.0
    cell_gamma: Number = 90.0
    N_cells: Sequence[Number] = (1, 1, 1)
    misset_deg: Sequence[Number] = (0.0, 0.0, 0.0)
    misset_random: bool = False
    misset_seed: int = 0
    phi_start_deg: Number = 0.0
    osc_range_deg: Number = 0.0
    phi_steps: int = 1
    phi_step_deg: Optional[Number] = None
    spindle_axis: Vec3 = None
    mosaic_spread_deg: Number = 0.0
    mosaic_domains: int = 1
    mosaic_seed: int = 12345678
    shape: CrystalShape = CrystalShape.SQUARE
    fudge: Number = 1.0
    default_F: Number = 0.0
    interpolate: Optional[bool] = None
    mosflm_a_star: Vec3 = None
    mosflm_b_star: Vec3 = None
    mosflm_c_star: Vec3 = None
    mosflm_matrix: Optional[Any] = None
    #: reproduce nanoBragg.c's handling of a phi step whose angle is exactly 0: it skips the rotation and
    #: so re-uses the previous step's orientation (the last step's, for step 0).  Off = true phi = 0.
    nanobragg_phi_quirk: bool = False
    #: CLI compatibility: when both a MOSFLM matrix and -cell are given, nanoBragg keeps the matrix
    #: directions and rescales the direct-cell lengths/volume to the -cell values.
    rescale_to_cell: bool = False

    def __post_init__(self):
        if isinstance(self.shape, str):
            self.shape = CrystalShape(self.shape.upper())
        n = tuple(self.N_cells) if not hasattr(self.N_cells, "shape") else self.N_cells
        if hasattr(n, "__len__") and len(n) != 3:
            raise ValueError(f"N_cells needs 3 values (Na, Nb, Nc), got {len(n)}")
        self.N_cells = n
        self.misset_deg = _triple(self.misset_deg, "misset_deg")
        self.spindle_axis = _triple(self.spindle_axis, "spindle_axis")
        for name in ("mosflm_a_star", "mosflm_b_star", "mosflm_c_star"):
            setattr(self, name, _triple(getattr(self, name), name))
        if int(self.phi_steps) < 1:
            self.phi_steps = 1
        if sum(getattr(self, n) is not None for n in ("mosflm_a_star", "mosflm_b_star", "mosflm_c_star")) not in (0, 3):
            raise ValueError("give all three of mosflm_a_star, mosflm_b_star, mosflm_c_star, or none")

    @property
    def has_mosflm(self) -> bool:
        return self.mosflm_a_star is not None or self.mosflm_matrix is not None

    def effective_mosaic_domains(self) -> int:
        """nanoBragg's rule: zero spread -> 1 domain; spread but no domain count -> 10."""
        spread = fval(self.mosaic_spread_deg)
        if spread <= 0.0:
            return 1
        return int(self.mosaic_domains) if int(self.mosaic_domains) > 0 else 10

    def replace(self, **kw) -> "CrystalConfig":
        return replace(self, **kw)


@dataclass
class DetectorConfig:
    """Flat (or curved) pixel-array detector.

    ``beam_center_f`` / ``beam_center_s`` (mm) are the beam centre in the convention's own
    terms, mapped to the fast/slow axes: MOSFLM/DENZO ``Ybeam``/``Xbeam`` (MOSFLM adds half a
    pixel, as nanoBragg), ADXV ``Xbeam``/``Ybeam`` (origin at the image's lower-left), XDS/DIALS
    the sample's closest point (``(ORGX-0.5)*pixel``), CUSTOM ``Xbeam``/``Ybeam``.  None = the
    convention's default (the detector centre, as nanoBragg).

    Pivot None = the convention's (BEAM for MOSFLM/DENZO/ADXV/CUSTOM, SAMPLE for XDS/DIALS).
    ``pix0_override_m``: vector from the sample to the outer corner of pixel (0,0), metres,
    used as given (CUSTOM geometry).  ``roi``: inclusive (fmin, fmax, smin, smax) pixels to render.
    """

    distance_mm: Number = 100.0
    pixel_size_mm: Number = 0.1
    fpixels: int = 1024
    spixels: int = 1024
    beam_center_f: Optional[Number] = None
    beam_center_s: Optional[Number] = None
    close_distance_mm: Optional[Number] = None
    detector_convention: DetectorConvention = DetectorConvention.MOSFLM
    detector_pivot: Optional[DetectorPivot] = None
    detector_rotx_deg: Number = 0.0
    detector_roty_deg: Number = 0.0
    detector_rotz_deg: Number = 0.0
    detector_twotheta_deg: Number = 0.0
    twotheta_axis: Vec3 = None
    custom_fdet_vector: Vec3 = None
    custom_sdet_vector: Vec3 = None
    custom_odet_vector: Vec3 = None
    custom_beam_vector: Vec3 = None
    custom_polar_vector: Vec3 = None
    custom_spindle_vector: Vec3 = None
    pix0_override_m: Vec3 = None
    oversample: Optional[int] = 1
    oversample_omega: bool = False
    oversample_polar: bool = False
    point_pixel: bool = False
    curved_detector: bool = False
    roi: Optional[Sequence[int]] = None

    def __post_init__(self):
        if isinstance(self.detector_convention, str):
            self.detector_convention = DetectorConvention(self.detector_convention.upper())
        if isinstance(self.detector_pivot, str):
            self.detector_pivot = DetectorPivot(self.detector_pivot.upper())
        for name in ("twotheta_axis", "custom_fdet_vector", "custom_sdet_vector", "custom_odet_vector",
                     "custom_beam_vector", "custom_polar_vector", "custom_spindle_vector", "pix0_override_m"):
            setattr(self, name, _triple(getattr(self, name), name))
        if self.detector_convention != DetectorConvention.CUSTOM:
            given = [n for n in ("custom_fdet_vector", "custom_sdet_vector", "custom_odet_vector",
                                 "custom_beam_vector", "pix0_override_m") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} need detector_convention=CUSTOM "
                                 f"(got {self.detector_convention.value})")
        if int(self.fpixels) < 1 or int(self.spixels) < 1:
            raise ValueError(f"detector needs at least 1x1 pixels, got {self.fpixels}x{self.spixels}")
        if self.roi is not None:
            r = [int(x) for x in self.roi]
            if len(r) != 4:
                raise ValueError("roi needs 4 integers: fmin fmax smin smax")
            self.roi = tuple(r)

    @property
    def pivot(self) -> DetectorPivot:
        if self.detector_pivot is not None:
            return self.detector_pivot
        if self.detector_convention in (DetectorConvention.XDS, DetectorConvention.DIALS):
            return DetectorPivot.SAMPLE
        return DetectorPivot.BEAM

    def roi_bounds(self) -> tuple[int, int, int, int]:
        """Inclusive (fmin, fmax, smin, smax) clipped to the detector."""
        if self.roi is None:
            return 0, self.fpixels - 1, 0, self.spixels - 1
        fmin, fmax, smin, smax = self.roi
        fmin, smin = max(fmin, 0), max(smin, 0)
        fmax, smax = min(fmax, self.fpixels - 1), min(smax, self.spixels - 1)
        if fmin > fmax or smin > smax:
            raise ValueError(f"roi {self.roi} selects no pixel of a {self.fpixels}x{self.spixels} detector")
        return fmin, fmax, smin, smax

    def replace(self, **kw) -> "DetectorConfig":
        return replace(self, **kw)


@dataclass
class BeamConfig:
    """X-ray beam: wavelength, fluence (or flux * exposure / beamsize^2), polarisation, sources.

    - ``polarization_factor``: Kahn factor (0 = unpolarised, nanoBragg's default); ``nopolar``
      disables the correction.  ``polarization_axis`` None = the convention's E-vector.
    - divergence (mrad) and dispersion (percent) build nanoBragg's grid of source points.
    - ``dmin_A``: skip scattering beyond this resolution (0 = off).
    """

    wavelength_A: Number = 1.0
    fluence: Optional[Number] = None
    flux: Number = 0.0
    exposure: Number = 1.0
    beamsize_mm: Number = 0.1
    polarization_factor: Number = 0.0
    nopolar: bool = False
    polarization_axis: Vec3 = None
    dispersion_pct: float = 0.0
    dispersion_steps: int = 1
    hdiv_range_mrad: float = 0.0
    vdiv_range_mrad: float = 0.0
    hdiv_steps: int = 1
    vdiv_steps: int = 1
    hdiv_step_mrad: Optional[float] = None
    vdiv_step_mrad: Optional[float] = None
    dispersion_step_pct: Optional[float] = None
    round_div: bool = True
    dmin_A: float = 0.0

    def __post_init__(self):
        self.polarization_axis = _triple(self.polarization_axis, "polarization_axis")

    def effective_fluence(self):
        """photons/m^2: flux*exposure/beamsize^2 when a flux is given (nanoBragg's rule)."""
        flux = self.flux
        if fval(flux) != 0.0 and fval(self.exposure) > 0.0 and fval(self.beamsize_mm) >= 0:
            bs = self.beamsize_mm * 1e-3
            return flux * self.exposure / (bs * bs)
        return DEFAULT_FLUENCE if self.fluence is None else self.fluence

    def replace(self, **kw) -> "BeamConfig":
        return replace(self, **kw)


__all__ = [
    "CrystalConfig", "DetectorConfig", "BeamConfig", "DetectorConvention", "DetectorPivot",
    "CrystalShape", "DEFAULT_FLUENCE", "R_E_SQR",
]


def resolve_steps(range_: float, step: float, steps: int) -> tuple[float, float, int]:
    """nanoBragg's auto-selection of (range, step, steps) for divergence / dispersion (-1 = unset)."""
    if steps <= 0:
        if range_ < 0.0:
            if step <= 0.0:
                return 0.0, 0.0, 1
            return step, step, 2
        if step <= 0.0:
            return range_, range_, 2
        return range_, step, int(math.ceil(range_ / step))
    if range_ < 0.0:
        if step <= 0.0:
            return 1.0, 1.0 / steps, steps
        return step, step, 2
    if step <= 0.0:
        if steps <= 1:
            steps = 2
        return range_, range_ / (steps - 1), steps
    return range_, step, steps
