"""Differentiable geometry: detector frame, crystal lattice vectors, spindle/mosaic rotations, sources.

Everything here is computed in float64 torch tensors from the (possibly tensor-valued) config
fields, following nanoBragg.c's order of operations: convention vectors, detector rotations about
x, y, z then the two-theta swing, pivot on the beam spot or on the sample, reciprocal cell from
the cell or a MOSFLM matrix, misset rotations, spindle rotation, then mosaic rotation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import resolve_steps  # noqa: F401  (torch-free; re-exported here)

from .config import (
    fval,
    BeamConfig,
    CrystalConfig,
    DetectorConfig,
    DetectorConvention,
    DetectorPivot,
)
from .rng import mosaic_domain_axes, random_misset_deg

F64 = torch.float64


def t64(x, device=None) -> torch.Tensor:
    """Number / sequence / tensor -> float64 tensor (keeps the autograd graph of tensors)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype=F64, device=device) if (x.dtype != F64 or (device is not None and x.device != torch.device(device))) else x
    if isinstance(x, (list, tuple)) and any(isinstance(e, torch.Tensor) for e in x):
        return torch.stack([t64(e, device) for e in x])
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=F64, device=device)


def deg(x, device=None) -> torch.Tensor:
    return t64(x, device) * (math.pi / 180.0)


def unitize(v: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(v)
    return v / n if fval(n) != 0.0 else v


def rot_x(a):
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([o, z, z]), torch.stack([z, c, -s]), torch.stack([z, s, c])])


def rot_y(a):
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, z, s]), torch.stack([z, o, z]), torch.stack([-s, z, c])])


def rot_z(a):
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, -s, z]), torch.stack([s, c, z]), torch.stack([z, z, o])])


def rot_xyz(rx, ry, rz) -> torch.Tensor:
    """nanoBragg's rotate(): about x, then y, then z (radians) -> matrix Rz @ Ry @ Rx."""
    return rot_z(rz) @ rot_y(ry) @ rot_x(rx)


def axis_angle_matrix(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Right-handed rotation by ``angle`` (radians, any batch shape) about unit ``axis`` (..., 3)."""
    angle = torch.as_tensor(angle, dtype=axis.dtype, device=axis.device)
    c, s = torch.cos(angle), torch.sin(angle)
    t = 1.0 - c
    x, y, z = axis[..., 0], axis[..., 1], axis[..., 2]
    rows = [
        torch.stack([c + t * x * x, t * x * y - s * z, t * x * z + s * y], -1),
        torch.stack([t * x * y + s * z, c + t * y * y, t * y * z - s * x], -1),
        torch.stack([t * x * z - s * y, t * y * z + s * x, c + t * z * z], -1),
    ]
    return torch.stack(rows, -2)


# (fdet, sdet, odet, beam, polar, spindle, twotheta_axis) per convention, as in nanoBragg.c
_CONVENTION_VECTORS = {
    DetectorConvention.ADXV: ((1, 0, 0), (0, -1, 0), (0, 0, 1), (0, 0, 1), (1, 0, 0), (1, 0, 0), (-1, 0, 0)),
    DetectorConvention.MOSFLM: ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, -1)),
    DetectorConvention.DENZO: ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 0, 1), (0, 0, 1), (0, 0, -1)),
    DetectorConvention.XDS: ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0)),
    DetectorConvention.DIALS: ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0)),
    # nanoBragg's compiled-in starting values, used for any CUSTOM vector not given
    DetectorConvention.CUSTOM: ((0, 0, 1), (0, -1, 0), (1, 0, 0), (1, 0, 0), (0, 0, 1), (0, 0, 1), (0, 1, 0)),
}


@dataclass
class DetectorGeometry:
    """Lab-frame detector and beam vectors (float64, metres) after rotations and pivoting."""

    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    pix0: torch.Tensor          # sample -> outer corner of pixel (0, 0), m
    beam: torch.Tensor          # unit vector along the beam propagation
    polar: torch.Tensor         # unit E-vector axis
    spindle: torch.Tensor       # unit spindle axis (convention's)
    pixel_size: torch.Tensor    # m
    close_distance: torch.Tensor  # m, sample to detector plane along odet
    distance: torch.Tensor      # m, along the beam
    Fbeam: torch.Tensor         # m, direct-beam spot on the fast axis
    Sbeam: torch.Tensor
    Fclose: torch.Tensor
    Sclose: torch.Tensor
    fpixels: int
    spixels: int
    twotheta_deg: float = 0.0

    @property
    def orgx(self) -> float:
        return fval(self.Fclose / self.pixel_size + 0.5)

    @property
    def orgy(self) -> float:
        return fval(self.Sclose / self.pixel_size + 0.5)

    def pixel_centres(self, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Lab positions (m) of pixel centres at fast/slow indices f, s (no oversampling)."""
        px = self.pixel_size
        F = (f.to(F64) + 0.5) * px
        S = (s.to(F64) + 0.5) * px
        return self.pix0 + F[..., None] * self.fdet + S[..., None] * self.sdet


def convention_beam_centre(cfg: DetectorConfig, px: torch.Tensor, device=None):
    """(Fbeam, Sbeam, Fclose, Sclose) in metres from the config's convention-native beam centre."""
    conv = cfg.detector_convention
    det_f = px * cfg.fpixels
    det_s = px * cfg.spixels
    bf = None if cfg.beam_center_f is None else t64(cfg.beam_center_f, device) * 1e-3
    bs = None if cfg.beam_center_s is None else t64(cfg.beam_center_s, device) * 1e-3
    if conv in (DetectorConvention.MOSFLM, DetectorConvention.DENZO):
        if bf is None:
            bf = (det_f + px) / 2.0
        if bs is None:
            bs = (det_s + px) / 2.0
        off = 0.5 * px if conv == DetectorConvention.MOSFLM else 0.0 * px
        Fb, Sb = bf + off, bs + off
        return Fb, Sb, Fb, Sb
    if conv == DetectorConvention.ADXV:
        if bf is None:
            bf = (det_f + px) / 2.0
        if bs is None:
            bs = (det_s - px) / 2.0
        Fb, Sb = bf, det_s - bs
        return Fb, Sb, Fb, Sb
    # XDS, DIALS, CUSTOM: detector centre by default; beam spot and closest point coincide
    if bf is None:
        bf = det_f / 2.0
    if bs is None:
        bs = det_s / 2.0
    return bf, bs, bf, bs


def detector_geometry(cfg: DetectorConfig, beam_cfg: BeamConfig | None = None, device=None) -> DetectorGeometry:
    """nanoBragg's detector set-up (conventions, rotations, two-theta, pivot), differentiable."""
    conv = cfg.detector_convention
    defaults = _CONVENTION_VECTORS[conv]
    if conv == DetectorConvention.CUSTOM:
        given = (cfg.custom_fdet_vector, cfg.custom_sdet_vector, cfg.custom_odet_vector,
                 cfg.custom_beam_vector, cfg.custom_polar_vector, cfg.custom_spindle_vector, cfg.twotheta_axis)
        vecs = [t64(g if g is not None else d, device) for g, d in zip(given, defaults)]
    else:
        vecs = [t64(d, device) for d in defaults]
        if cfg.twotheta_axis is not None:
            vecs[6] = t64(cfg.twotheta_axis, device)
    fdet, sdet, odet, beam, polar, spindle, tt_axis = vecs
    if beam_cfg is not None and beam_cfg.polarization_axis is not None:
        polar = t64(beam_cfg.polarization_axis, device)
    if cfg.custom_spindle_vector is not None and conv != DetectorConvention.CUSTOM:
        spindle = t64(cfg.custom_spindle_vector, device)

    beam = unitize(beam)
    fdet = unitize(fdet)
    sdet = unitize(sdet)
    onorm = torch.linalg.vector_norm(odet)
    if fval(onorm) != 1.0:
        # nanoBragg: a non-unit odet is replaced by fdet x sdet
        odet = unitize(torch.linalg.cross(fdet, sdet))
    polar = unitize(polar)
    spindle = unitize(spindle)
    tt_axis = unitize(tt_axis)

    px = t64(cfg.pixel_size_mm, device) * 1e-3
    Fbeam, Sbeam, Fclose, Sclose = convention_beam_centre(cfg, px, device)

    R = rot_xyz(deg(cfg.detector_rotx_deg, device), deg(cfg.detector_roty_deg, device), deg(cfg.detector_rotz_deg, device))
    twotheta = deg(cfg.detector_twotheta_deg, device)
    R2 = axis_angle_matrix(tt_axis, twotheta)

    ratio = torch.dot(beam, R @ odet)
    if fval(ratio) == 0.0:
        ratio = ratio + 2.2250738585072014e-308
    if cfg.close_distance_mm is not None:
        close_distance = t64(cfg.close_distance_mm, device) * 1e-3
    else:
        close_distance = torch.abs(ratio * t64(cfg.distance_mm, device) * 1e-3)
    distance = close_distance / ratio

    pivot = cfg.pivot
    if pivot == DetectorPivot.SAMPLE:
        pix0 = -Fclose * fdet - Sclose * sdet + close_distance * odet
        pix0 = R2 @ (R @ pix0)
    fdet = R2 @ (R @ fdet)
    sdet = R2 @ (R @ sdet)
    odet = R2 @ (R @ odet)
    if pivot == DetectorPivot.BEAM:
        pix0 = -Fbeam * fdet - Sbeam * sdet + distance * beam
    if cfg.pix0_override_m is not None:
        pix0 = t64(cfg.pix0_override_m, device)

    Fclose = -torch.dot(pix0, fdet)
    Sclose = -torch.dot(pix0, sdet)
    close_distance = torch.dot(pix0, odet)
    newv = close_distance / ratio * beam - pix0
    Fbeam = torch.dot(fdet, newv)
    Sbeam = torch.dot(sdet, newv)
    distance = close_distance / ratio
    return DetectorGeometry(
        fdet=fdet, sdet=sdet, odet=odet, pix0=pix0, beam=beam, polar=polar, spindle=spindle,
        pixel_size=px, close_distance=close_distance, distance=distance, Fbeam=Fbeam, Sbeam=Sbeam,
        Fclose=Fclose, Sclose=Sclose, fpixels=int(cfg.fpixels), spixels=int(cfg.spixels),
        twotheta_deg=fval(cfg.detector_twotheta_deg),
    )


@dataclass
class LatticeVectors:
    """Real-space rows a, b, c (metres) and reciprocal rows a*, b*, c* (1/Angstrom) at phi=0, no mosaic."""

    real: torch.Tensor        # (3, 3) metres
    recip: torch.Tensor       # (3, 3) 1/Angstrom
    volume_A3: torch.Tensor

    def cell_parameters(self) -> tuple[float, ...]:
        r = self.real.detach() * 1e10
        a, b, c = (torch.linalg.vector_norm(v).item() for v in r)
        al = math.degrees(math.acos(fval(torch.dot(r[1], r[2]) / (b * c))))
        be = math.degrees(math.acos(fval(torch.dot(r[0], r[2]) / (a * c))))
        ga = math.degrees(math.acos(fval(torch.dot(r[0], r[1]) / (a * b))))
        return a, b, c, al, be, ga


def reciprocal_from_cell(a, b, c, alpha, beta, gamma):
    """nanoBragg's default orientation of the reciprocal cell for a user cell (1/Angstrom rows)."""
    al, be, ga = alpha * (math.pi / 180), beta * (math.pi / 180), gamma * (math.pi / 180)
    aavg = (al + be + ga) / 2
    skew = torch.sin(aavg) * torch.sin(aavg - al) * torch.sin(aavg - be) * torch.sin(aavg - ga)
    V = 2.0 * a * b * c * torch.sqrt(torch.abs(skew))
    Vs = 1.0 / V
    as_ = b * c * torch.sin(al) * Vs
    bs_ = c * a * torch.sin(be) * Vs
    cs_ = a * b * torch.sin(ga) * Vs
    cos_als = (torch.cos(be) * torch.cos(ga) - torch.cos(al)) / (torch.sin(be) * torch.sin(ga))
    cos_bes = (torch.cos(ga) * torch.cos(al) - torch.cos(be)) / (torch.sin(ga) * torch.sin(al))
    cos_gas = (torch.cos(al) * torch.cos(be) - torch.cos(ga)) / (torch.sin(al) * torch.sin(be))
    sin_gas = c * Vs / (as_ * bs_)
    zero = torch.zeros_like(as_)
    astar = torch.stack([as_, zero, zero])
    bstar = torch.stack([bs_ * cos_gas, bs_ * sin_gas, zero])
    cstar = torch.stack([cs_ * cos_bes, cs_ * (cos_als - cos_bes * cos_gas) / sin_gas,
                         cs_ * V / (a * b * c * sin_gas)])
    return torch.stack([astar, bstar, cstar]), V


def lattice_vectors(cfg: CrystalConfig, wavelength_A, device=None) -> LatticeVectors:
    """Reciprocal and real lattice vectors after misset (nanoBragg's cell / A.mat logic)."""
    a = t64(cfg.cell_a, device)
    b = t64(cfg.cell_b, device)
    c = t64(cfg.cell_c, device)
    al, be, ga = t64(cfg.cell_alpha, device), t64(cfg.cell_beta, device), t64(cfg.cell_gamma, device)
    if cfg.mosflm_matrix is not None:
        m = t64(cfg.mosflm_matrix, device).reshape(3, 3)
        recip = m.T / t64(wavelength_A, device)  # columns are a*, b*, c* (times lambda)
    elif cfg.mosflm_a_star is not None:
        recip = torch.stack([t64(cfg.mosflm_a_star, device), t64(cfg.mosflm_b_star, device),
                             t64(cfg.mosflm_c_star, device)])
    else:
        recip, _ = reciprocal_from_cell(a, b, c, al, be, ga)

    misset = cfg.misset_deg
    if cfg.misset_random:
        misset = random_misset_deg(cfg.misset_seed)
    mis = deg(misset, device)
    if bool(torch.any(mis != 0)) or mis.requires_grad:
        R = rot_xyz(mis[0], mis[1], mis[2])
        recip = recip @ R.T
    a_s, b_s, c_s = recip[0], recip[1], recip[2]
    bxc = torch.linalg.cross(b_s, c_s)
    cxa = torch.linalg.cross(c_s, a_s)
    axb = torch.linalg.cross(a_s, b_s)
    Vstar = torch.dot(a_s, bxc)
    if (not cfg.has_mosflm) or cfg.rescale_to_cell:
        # nanoBragg forces |a| = cell_a etc. and V = the cell's volume for a user cell (its default
        # orientation is only approximately consistent for triclinic cells, so this matters)
        _, Vcell_user = reciprocal_from_cell(a, b, c, al, be, ga)
        bxc = bxc / torch.linalg.vector_norm(bxc) * (a / Vcell_user)
        cxa = cxa / torch.linalg.vector_norm(cxa) * (b / Vcell_user)
        axb = axb / torch.linalg.vector_norm(axb) * (c / Vcell_user)
        Vstar = 1.0 / Vcell_user
    Vcell = 1.0 / Vstar
    real = torch.stack([bxc, cxa, axb]) * Vcell  # Angstrom
    # regenerate the reciprocal vectors from the real ones, as nanoBragg does
    ra, rb, rc = real[0], real[1], real[2]
    recip = torch.stack([torch.linalg.cross(rb, rc), torch.linalg.cross(rc, ra), torch.linalg.cross(ra, rb)]) * Vstar
    return LatticeVectors(real=real * 1e-10, recip=recip, volume_A3=Vcell)


def phi_angles(cfg: CrystalConfig, device=None) -> torch.Tensor:
    """Spindle angles (radians) of the phi steps: phi0 + k * step."""
    n = int(cfg.phi_steps)
    phi0 = deg(cfg.phi_start_deg, device)
    if cfg.phi_step_deg is not None:
        step = deg(cfg.phi_step_deg, device)
    else:
        step = deg(cfg.osc_range_deg, device) / n
    phis = phi0 + step * torch.arange(n, dtype=F64, device=device)
    if cfg.nanobragg_phi_quirk and n > 1:
        vals = phis.detach().tolist()
        if any(v == 0.0 for v in vals) and not all(v == 0.0 for v in vals):
            src = list(range(n))
            for k in range(n):
                j = k
                while vals[j] == 0.0:
                    j = (j - 1) % n
                src[k] = j
            phis = phis[torch.tensor(src, device=phis.device)]
    return phis


def mosaic_matrices(cfg: CrystalConfig, device=None) -> torch.Tensor:
    """(n_domains, 3, 3) nanoBragg mosaic rotation matrices (domain 0 = identity)."""
    n = cfg.effective_mosaic_domains()
    if n == 1:
        return torch.eye(3, dtype=F64, device=device)[None]
    axes, factors = mosaic_domain_axes(n, int(cfg.mosaic_seed))
    spread = deg(cfg.mosaic_spread_deg, device)
    angles = spread * torch.as_tensor(factors, dtype=F64, device=device)
    return axis_angle_matrix(torch.as_tensor(axes, dtype=F64, device=device), angles)


def orientation_matrices(cfg: CrystalConfig, lattice: LatticeVectors, spindle: torch.Tensor, device=None) -> torch.Tensor:
    """(n_phi * n_mosaic, 3, 3): rows are the rotated real-space a, b, c (m); h = M @ s."""
    phis = phi_angles(cfg, device)
    Rphi = axis_angle_matrix(spindle.expand(phis.shape[0], 3), phis)      # (P, 3, 3)
    U = mosaic_matrices(cfg, device)                                       # (M, 3, 3)
    # a_rot = U @ Rphi @ a0 ; rows: A = B0 @ Rphi^T @ U^T
    A = torch.einsum("ij,pkj,mlk->pmil", lattice.real, Rphi, U)
    return A.reshape(-1, 3, 3)


def beam_sources(beam_cfg: BeamConfig, geom: DetectorGeometry, device=None):
    """nanoBragg's source grid: (S, 3) unit incident directions and (S,) wavelengths (m).

    Only the nominal wavelength stays a differentiable tensor; the divergence/dispersion offsets
    are applied around it.
    """
    lam0 = t64(beam_cfg.wavelength_A, device) * 1e-10

    def _res(rng_, step, steps):
        r = -1.0 if rng_ is None else float(rng_)
        s = -1.0 if step is None else float(step)
        n = int(steps) if steps is not None else -1
        if r == 0.0 and (step is None) and n <= 1:
            return 0.0, 0.0, 1
        r, s, n = resolve_steps(r, s, n)
        if r <= 0.0 or s <= 0.0 or n <= 0:
            return 0.0, 0.0, 1
        return r, s, n

    hr, hs, hn = _res(beam_cfg.hdiv_range_mrad * 1e-3 if beam_cfg.hdiv_range_mrad else 0.0,
                      None if beam_cfg.hdiv_step_mrad is None else beam_cfg.hdiv_step_mrad * 1e-3, beam_cfg.hdiv_steps)
    vr, vs, vn = _res(beam_cfg.vdiv_range_mrad * 1e-3 if beam_cfg.vdiv_range_mrad else 0.0,
                      None if beam_cfg.vdiv_step_mrad is None else beam_cfg.vdiv_step_mrad * 1e-3, beam_cfg.vdiv_steps)
    dr, ds, dn = _res(beam_cfg.dispersion_pct / 100.0 if beam_cfg.dispersion_pct else 0.0,
                      None if beam_cfg.dispersion_step_pct is None else beam_cfg.dispersion_step_pct / 100.0,
                      beam_cfg.dispersion_steps)
    beam = geom.beam
    polar = geom.polar
    vert = unitize(torch.linalg.cross(beam, polar))
    dirs, lams = [], []
    for hi in range(hn):
        for vi in range(vn):
            hdiv = hs * hi - hr / 2.0
            vdiv = vs * vi - vr / 2.0
            # nanoBragg's elliptical cut (its test is NaN, i.e. no cut, unless both ranges are set)
            if beam_cfg.round_div and hr > 0 and vr > 0:
                test = (hdiv * hdiv - hs * hs / 4.0 * (1 - hn % 2)) / hr / hr
                test += (vdiv * vdiv - vs * vs / 4.0 * (1 - vn % 2)) / vr / vr
                if test * 4.0 > 1.1:
                    continue
            v = -beam
            if vdiv != 0.0:
                v = axis_angle_matrix(polar, torch.tensor(vdiv, dtype=F64, device=device)) @ v
            if hdiv != 0.0:
                v = axis_angle_matrix(vert, torch.tensor(hdiv, dtype=F64, device=device)) @ v
            v = unitize(v)
            for di in range(dn):
                factor = 1.0 + ds * di - dr / 2.0
                dirs.append(-v)
                lams.append(lam0 * factor)
    return torch.stack(dirs), torch.stack(lams)


__all__ = [
    "DetectorGeometry", "LatticeVectors", "detector_geometry", "lattice_vectors", "orientation_matrices",
    "mosaic_matrices", "phi_angles", "beam_sources", "rot_xyz", "axis_angle_matrix", "resolve_steps",
    "reciprocal_from_cell", "convention_beam_centre", "t64",
]
