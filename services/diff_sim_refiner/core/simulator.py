"""The simulator: a pure :func:`simulate` function plus seed-style ``Crystal``/``Detector``/``Simulator``.

Memory is bounded by rendering in chunks of pixels (each chunk holds pixels x sub-pixels x
orientations elements); with autograd on, each chunk is check-pointed so the backward pass
re-computes it instead of keeping its intermediates.

``spot_cutoff`` (optional, square crystals only) evaluates the lattice transform and structure
factor only where every fractional index lies within ``spot_cutoff / N`` of an integer (and only in
8x8-pixel tiles whose corner indices can reach such a point).  Error bound: every skipped term has
|F_latt|^2 <= max_i 1 / (N_i^2 sin^2(pi * cutoff / N_i)) of the peak value N_a^2 N_b^2 N_c^2 (about
1 / (pi cutoff)^2: 0.6 % of the local peak height for a cutoff of 4), and the skipped sincg tails hold
about 3 / (pi^2 cutoff) of all photons (7.6 % at 4, 3 % at 10); pixels near Bragg peaks are exact.

Without gradients, float32 renders of the fast kernel (square crystal, nearest F, flat detector) go through the
compiled kernel of :mod:`.native` (same terms, H in float64, one fixed summation order per pixel: within 1e-7
of the float64 image and independent of the thread count); ``Prepared.native = False`` or
``DIFF_SIM_REFINER_NATIVE=0`` selects the torch kernel.  Spot-local rendering (:func:`spot_local_mask` as
``pixel_mask`` of :func:`render` / :func:`render_loss`) evaluates every term, exactly, at the pixels near
predicted reflections only; :func:`spot_local_bound` states what it leaves out.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .config import R_E_SQR, BeamConfig, CrystalConfig, CrystalShape, DetectorConfig, fval
from .geometry import (
    DetectorGeometry,
    LatticeVectors,
    beam_sources,
    detector_geometry,
    lattice_vectors,
    orientation_matrices,
    t64,
)
from . import native
from .io import HKLTable
from .physics import (FTable, lattice_factor_sq, polarization_basis, polarization_factor,
                      polarization_factor_in_frame, rotate_about)

_TWO_PI = 2.0 * math.pi

#: elements (pixels x sub-pixels x orientations) per chunk
DEFAULT_CHUNK_ELEMENTS = 1 << 19


def auto_oversample(crystal: CrystalConfig, lattice: LatticeVectors, geom: DetectorGeometry, wavelength_A) -> int:
    """nanoBragg's recommended oversampling: ceil(3 * crystal size / (lambda * distance / pixel))."""
    lens = torch.linalg.vector_norm(lattice.real.detach(), dim=1)
    N = [max(fval(n), 1.0) for n in crystal.N_cells]
    size = max(fval(lens[i]) * N[i] for i in range(3))
    rps = fval(wavelength_A) * 1e-10 * fval(geom.distance) / fval(geom.pixel_size)
    return max(1, int(math.ceil(3.0 * size / rps)))


@dataclass
class Prepared:
    """Everything the per-chunk kernel needs, computed once per render (differentiable tensors)."""

    geom: DetectorGeometry
    lattice: LatticeVectors
    A: torch.Tensor              # (O, 3, 3) compute dtype, rows a, b, c in m
    src_dirs: torch.Tensor       # (S, 3)
    src_lams: torch.Tensor       # (S,) m
    N: torch.Tensor              # (3,)
    shape: CrystalShape
    fudge: object
    recip: torch.Tensor          # (3, 3) 1/A, for gauss/tophat
    ftable: FTable
    kahn: object
    nopolar: bool
    polar_axis: torch.Tensor
    scale: torch.Tensor          # r_e^2 * fluence / steps
    oversample: int
    oversample_omega: bool
    oversample_polar: bool
    point_pixel: bool
    curved: bool
    dmin_m: float
    # compute-dtype copies of the detector vectors
    pix0: torch.Tensor
    fdet: torch.Tensor
    sdet: torch.Tensor
    px: torch.Tensor
    close_distance: torch.Tensor
    distance: torch.Tensor
    beam: torch.Tensor
    dtype: torch.dtype
    spot_cutoff: Optional[float] = None
    force_general: bool = False
    #: under autograd, use the fused kernel with analytic derivatives (False: plain autograd, for tests)
    fused_backward: bool = True
    #: without gradients, render float32 fast-kernel images with the compiled kernel (core/native.c) when
    #: it builds (False: the torch kernel, for tests and comparisons)
    native: bool = True
    #: float64 orientation matrices and sources (for the compiled kernel, which forms H = A Q in float64)
    A64: Optional[torch.Tensor] = None
    src_dirs64: Optional[torch.Tensor] = None
    src_lams64: Optional[torch.Tensor] = None

    @property
    def n_orient(self) -> int:
        return int(self.A.shape[0])

    @property
    def steps(self) -> int:
        return int(self.A.shape[0]) * int(self.src_dirs.shape[0]) * self.oversample ** 2


def _as_table(hkl, crystal: CrystalConfig) -> Optional[HKLTable]:
    if hkl is None:
        return None
    if isinstance(hkl, HKLTable):
        return hkl
    if isinstance(hkl, tuple) and len(hkl) == 2:
        return HKLTable.from_grid(hkl[0], hkl[1], default_F=fval(crystal.default_F))
    raise TypeError(f"hkl must be an HKLTable or (grid, metadata), got {type(hkl).__name__}")


def prepare(crystal: CrystalConfig, detector: DetectorConfig, beam: BeamConfig, hkl=None, *,
            dtype=torch.float32, device=None, spot_cutoff: Optional[float] = None,
            hkl_tensor: Optional[torch.Tensor] = None) -> Prepared:
    """Geometry, orientations, sources and structure-factor table for one render."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    geom = detector_geometry(detector, beam, device)
    lam_A = beam.wavelength_A
    lattice = lattice_vectors(crystal, lam_A, device)
    spindle = t64(crystal.spindle_axis, device) if crystal.spindle_axis is not None else geom.spindle
    spindle = spindle / torch.linalg.vector_norm(spindle)
    A = orientation_matrices(crystal, lattice, spindle, device)
    dirs, lams = beam_sources(beam, geom, device)

    N = t64(crystal.N_cells, device)
    N = torch.where(N <= 1.0, torch.ones_like(N), N) if not N.requires_grad else N
    table = _as_table(hkl, crystal)
    default_F = crystal.default_F
    if isinstance(default_F, torch.Tensor):
        default_F = default_F.to(dtype=dtype, device=device)
    if table is not None and table.n_reflections > 0:
        Ft = hkl_tensor if hkl_tensor is not None else torch.as_tensor(table.F, device=device)
        Ft = Ft.to(dtype=dtype, device=device)
        if crystal.interpolate is None:
            interp = any(fval(n) <= 2 for n in crystal.N_cells)
        else:
            interp = bool(crystal.interpolate)
        ftable = FTable(Ft, (table.h_min, table.k_min, table.l_min), default_F, interp)
    else:
        ftable = FTable(None, (0, 0, 0), default_F, False)

    ov = detector.oversample
    if ov is None or int(ov) <= 0:
        ov = auto_oversample(crystal, lattice, geom, lam_A)
    ov = int(ov)
    fluence = beam.effective_fluence()
    steps = A.shape[0] * dirs.shape[0] * ov * ov
    scale = R_E_SQR * t64(fluence, device) / steps
    cd = dict(dtype=dtype, device=device)
    shape = crystal.shape
    if spot_cutoff is not None and shape != CrystalShape.SQUARE:
        spot_cutoff = None
    return Prepared(
        geom=geom, lattice=lattice, A=A.to(**cd), src_dirs=dirs.to(**cd), src_lams=lams.to(**cd), N=N.to(**cd),
        shape=shape, fudge=crystal.fudge, recip=lattice.recip.to(**cd), ftable=ftable,
        kahn=beam.polarization_factor if not isinstance(beam.polarization_factor, torch.Tensor)
        else beam.polarization_factor.to(**cd),
        nopolar=bool(beam.nopolar), polar_axis=geom.polar.to(**cd), scale=scale, oversample=ov,
        oversample_omega=bool(detector.oversample_omega), oversample_polar=bool(detector.oversample_polar),
        point_pixel=bool(detector.point_pixel), curved=bool(detector.curved_detector),
        dmin_m=float(beam.dmin_A) * 1e-10,
        pix0=geom.pix0.to(**cd), fdet=geom.fdet.to(**cd), sdet=geom.sdet.to(**cd), px=geom.pixel_size.to(**cd),
        close_distance=geom.close_distance.to(**cd), distance=geom.distance.to(**cd), beam=geom.beam.to(**cd),
        dtype=dtype, spot_cutoff=spot_cutoff, A64=A, src_dirs64=dirs, src_lams64=lams,
    )


def _subpixel_positions(p: Prepared, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(P, ov*ov, 3) lab positions (m) of sub-pixel centres; sub-pixel index = subS * ov + subF."""
    ov = p.oversample
    dt = p.dtype
    sub = p.px / ov
    o = torch.arange(ov, dtype=dt, device=f.device)
    subS = o.repeat_interleave(ov)      # slow sub-index (outer loop in nanoBragg)
    subF = o.repeat(ov)
    Fd = sub * (f.to(dt)[:, None] * ov + subF[None, :]) + sub / 2.0
    Sd = sub * (s.to(dt)[:, None] * ov + subS[None, :]) + sub / 2.0
    pos = p.pix0 + Fd[..., None] * p.fdet + Sd[..., None] * p.sdet
    if p.curved:
        # nanoBragg's curved detector: start on the beam at 'distance', swing by the flat y, z over distance
        d = p.distance
        v = (d * p.beam).expand_as(pos)
        v = rotate_about(v, p.sdet, pos[..., 1] / d)
        pos = rotate_about(v, p.fdet, pos[..., 2] / d)
    return pos


def pixel_positions_and_q(p: Prepared, f: torch.Tensor, s: torch.Tensor, source: int = 0):
    """Sub-pixel lab positions (P, ov^2, 3) in metres and scattering vectors (s_out - s_in)/lambda in 1/Angstrom."""
    pos = _subpixel_positions(p, f, s)
    diff = pos / torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
    q = (diff - p.src_dirs[source]) / (p.src_lams[source] * 1e10)
    return pos, q


def _chunk_general(p: Prepared, f: torch.Tensor, s: torch.Tensor, *tensors) -> torch.Tensor:
    """Photons for a chunk of pixels (f, s indices), every option; ``tensors`` only route autograd."""
    pos = _subpixel_positions(p, f, s)                   # (P, n, 3)
    air = torch.linalg.vector_norm(pos, dim=-1)          # (P, n)
    diff = pos / air[..., None]
    if p.point_pixel:
        omega_all = 1.0 / (air * air)
    else:
        omega_all = p.px * p.px / (air * air) * p.close_distance / air
    P, n = air.shape
    O = p.n_orient
    acc = torch.zeros(P, dtype=p.dtype, device=f.device)
    polar = None
    for si in range(p.src_dirs.shape[0]):
        inc = p.src_dirs[si]
        lam = p.src_lams[si]
        q = (diff - inc) / lam                           # (P, n, 3) 1/m
        if p.nopolar:
            pol_w = None
        elif p.oversample_polar:
            pol_w = polarization_factor(p.kahn, inc, diff, p.polar_axis)   # (P, n)
        else:
            pol_w = None
            if polar is None:
                polar = polarization_factor(p.kahn, inc, diff[:, 0], p.polar_axis)
        keep_q = None
        if p.dmin_m > 0.0:
            stol = 0.5 * torch.linalg.vector_norm(q, dim=-1)
            keep_q = ~((stol > 0) & (p.dmin_m > 0.5 / torch.clamp(stol, min=1e-30)))
        hkl = torch.einsum("pnj,oij->pnoi", q, p.A)      # (P, n, O, 3)
        h0 = torch.ceil(hkl - 0.5)
        weight = None
        if p.oversample_omega:
            weight = omega_all
        if pol_w is not None:
            weight = pol_w if weight is None else weight * pol_w
        if keep_q is not None:
            kq = keep_q.to(p.dtype)
            weight = kq if weight is None else weight * kq
        if p.spot_cutoff is not None:
            d = torch.abs(hkl - h0) * p.N
            sel = (d < p.spot_cutoff).all(-1)            # (P, n, O)
            idx = sel.nonzero(as_tuple=True)
            if idx[0].numel() == 0:
                continue
            hs, h0s = hkl[idx], h0[idx]
            terms = lattice_factor_sq(hs, h0s, p.N, p.shape, p.fudge, p.recip)
            if p.ftable.F is not None:
                Fc = p.ftable.lookup(hs, h0s)
                terms = terms * Fc * Fc
            else:
                terms = terms * (p.ftable.default_F * p.ftable.default_F)
            if weight is not None:
                terms = terms * weight[idx[0], idx[1]]
            acc = acc.index_add(0, idx[0], terms)
            continue
        terms = lattice_factor_sq(hkl, h0, p.N, p.shape, p.fudge, p.recip)   # (P, n, O)
        if p.ftable.F is not None:
            Fc = p.ftable.lookup(hkl, h0)
            terms = terms * (Fc * Fc)
        else:
            terms = terms * (p.ftable.default_F * p.ftable.default_F)
        if weight is not None:
            terms = terms * weight[..., None]
        acc = acc + terms.sum(dim=(1, 2))
    out = acc * p.scale.to(p.dtype)
    if not p.oversample_omega:
        out = out * omega_all[:, 0]
    if polar is not None:
        out = out * polar
    return out


def _fast_ok(p: Prepared) -> bool:
    return (p.shape == CrystalShape.SQUARE and not p.ftable.interpolate and not p.curved and not p.oversample_omega
            and not p.oversample_polar and p.dmin_m <= 0.0 and not p.force_general)


def _sincg_sq_cols(D: torch.Tensor, Ncol: torch.Tensor) -> torch.Tensor:
    """prod_i (sin(N_i pi d_i) / sin(pi d_i))^2 over axis 1 of D (O, 3, M); d = 0 gives N_i exactly.

    Without autograd a 1e-30 offset of the phase replaces the d = 0 test (|d| is 0 or > 1e-16 here, and
    sin(N e) / sin(e) = N to the last bit); with autograd an explicit branch keeps the gradient exact.
    """
    if torch.is_grad_enabled() and (D.requires_grad or Ncol.requires_grad):
        return _SincgSqProd.apply(D, Ncol)
    else:
        x = D * math.pi + 1e-30
        r = torch.sin(x * Ncol).div_(torch.sin(x))
    r = r * r
    return r[:, 0] * r[:, 1] * r[:, 2]


class _SincgSqProd(torch.autograd.Function):
    """prod_i r_i^2, r_i = sin(N_i x_i) / sin(x_i), x = pi d, with a hand-written backward.

    Saves only d and the three ratios; the derivative dr/dx = (N cos(N x) - r cos x) / sin x switches to
    its series -N (N^2 - 1) x / 3 + N (N^2 - 1)(3 N^2 - 7) x^3 / 90 for small |N x| (where the formula
    cancels: below 0.1 in float32, 1e-3 in float64), dr/dN = x cos(N x) / sin x (-> 1 at x = 0).
    Used under autograd where the fused kernel does not apply (spot cutoff, refined structure factors).
    """

    @staticmethod
    def forward(ctx, D, Ncol):
        x = D * math.pi
        sx = torch.sin(x)
        zero = sx == 0
        r = torch.sin(x * Ncol) / torch.where(zero, 1.0, sx)
        r = torch.where(zero, Ncol.expand_as(r), r)
        ctx.save_for_backward(D, Ncol, r)
        r2 = r * r
        return r2[:, 0] * r2[:, 1] * r2[:, 2]

    @staticmethod
    def backward(ctx, g):
        D, Ncol, r = ctx.saved_tensors
        x = D * math.pi
        sx = torch.sin(x)
        cx = torch.cos(x)
        Nx = Ncol * x
        cNx = torch.cos(Nx)
        small = torch.abs(Nx) < (1e-1 if x.dtype == torch.float32 else 1e-3)
        safe = torch.where(small, 1.0, sx)
        N2 = Ncol * Ncol
        series = x * (-Ncol * (N2 - 1.0) / 3.0 + Ncol * (N2 - 1.0) * (3.0 * N2 - 7.0) / 90.0 * (x * x))
        drdx = torch.where(small, series, (Ncol * cNx - r * cx) / safe)
        r2 = r * r
        others = torch.stack([r2[:, 1] * r2[:, 2], r2[:, 0] * r2[:, 2], r2[:, 0] * r2[:, 1]], 1)
        common = (2.0 * g)[:, None] * others * r                    # dL/dr_i
        gD = common * drdx * math.pi if ctx.needs_input_grad[0] else None
        gN = None
        if ctx.needs_input_grad[1]:
            drdN = torch.where(small, 1.0 - (3.0 * Ncol * Ncol - 1.0) * x * x / 6.0, x * cNx / safe)
            gN = (common * drdN).sum(dim=(0, 2), keepdim=True)
        return gD, gN


def _fast_geometry(ov: int, point_pixel: bool, f: torch.Tensor, s: torch.Tensor, pix0, fdet, sdet, px, cd):
    """Sub-pixel positions in a (3, M) layout (M = pixels * ov^2, sub-pixel index = subS * ov + subF):
    offsets Fd, Sd (M,) in m, airpath (M,), unit directions diff (3, M), first-sub-pixel airpath (P,) and
    the pixel's solid angle omega (P,) in sr."""
    dt = px.dtype
    sub = px / ov
    o = torch.arange(ov, dtype=dt, device=f.device)
    offF = (o.repeat(ov) + 0.5) * sub
    offS = (o.repeat_interleave(ov) + 0.5) * sub
    Fd = ((f.to(dt) * px)[:, None] + offF).reshape(-1)
    Sd = ((s.to(dt) * px)[:, None] + offS).reshape(-1)
    pos = pix0[:, None] + fdet[:, None] * Fd + sdet[:, None] * Sd          # (3, M)
    air = torch.sqrt((pos * pos).sum(0))
    diff = pos / air
    air0 = air.view(-1, ov * ov)[:, 0]
    omega = 1.0 / (air0 * air0) if point_pixel else px * px * cd / (air0 * air0 * air0)
    return Fd, Sd, air, diff, air0, omega


def _chunk_fast(p: Prepared, f: torch.Tensor, s: torch.Tensor, *tensors) -> torch.Tensor:
    """Square-crystal, nearest-F kernel in a (3, pixels*sub-pixels) layout: one GEMM gives h, k, l for all
    orientations; with ``spot_cutoff`` only near-Bragg terms get the lattice transform and F lookup."""
    ov = p.oversample
    n = ov * ov
    dt = p.dtype
    _, _, air, diff, _, omega = _fast_geometry(ov, p.point_pixel, f, s, p.pix0, p.fdet, p.sdet, p.px,
                                               p.close_distance)
    M = air.shape[0]
    O = p.n_orient
    A2 = p.A.reshape(O * 3, 3)
    Ncol = p.N.view(1, 3, 1)
    acc = torch.zeros(M, dtype=dt, device=f.device)
    polar = None
    for si in range(p.src_dirs.shape[0]):
        inc = p.src_dirs[si]
        Q = (diff - inc[:, None]) / p.src_lams[si]
        if polar is None and not p.nopolar:
            polar = polarization_factor(p.kahn, inc, diff.view(3, -1, n)[:, :, 0].T, p.polar_axis)
        H = torch.mm(A2, Q).view(O, 3, M)
        H0 = torch.ceil(H - 0.5)
        D = H - H0
        if p.spot_cutoff is not None:
            keep = ((D.abs() * Ncol) < p.spot_cutoff).all(1)                      # (O, M)
            oi, mi = keep.nonzero(as_tuple=True)
            if oi.numel() == 0:
                continue
            Dk = D[oi, :, mi].T.unsqueeze(0)                                       # (1, 3, K)
            terms = _sincg_sq_cols(Dk, Ncol)[0]
            if p.ftable.F is not None:
                Fc = p.ftable.nearest(H0[oi, :, mi])
                terms = terms * (Fc * Fc)
            else:
                terms = terms * (p.ftable.default_F * p.ftable.default_F)
            acc = acc.index_add(0, mi, terms)
            continue
        terms = _sincg_sq_cols(D, Ncol)                                           # (O, M)
        if p.ftable.F is not None:
            Fc = p.ftable.nearest_cols(H0)
            terms = terms * (Fc * Fc)
        else:
            terms = terms * (p.ftable.default_F * p.ftable.default_F)
        acc = acc + (terms.sum(0) if O > 1 else terms[0])
    out = acc.view(-1, n).sum(1) if n > 1 else acc
    out = out * (p.scale.to(dt) * omega)
    if polar is not None:
        out = out * polar
    return out


def _dr_dx_series(Ncol: torch.Tensor, dtype) -> tuple[float, torch.Tensor, torch.Tensor]:
    """|N x| below which dr/dx uses its series, and the series' coefficients (x, x^3) for N (1, 3, 1)."""
    N2 = Ncol * Ncol
    return (1e-1 if dtype == torch.float32 else 1e-3), -Ncol * (N2 - 1.0) / 3.0, \
        Ncol * (N2 - 1.0) * (3.0 * N2 - 7.0) / 90.0


def _dr_dx(x, Nx, r, sx, cNx, Ncol, c1, c3, thr) -> torch.Tensor:
    """d/dx of r = sin(N x) / sin(x) for x, N x, r, sin x, cos N x laid out (O, 3, M), N as (1, 3, 1):
    (N cos N x - r cos x) / sin x, and where |N x| < thr (the formula cancels there) the series
    x (c1 + c3 x^2), evaluated on those few terms only."""
    drdx = (Ncol * cNx).sub_(r * torch.cos(x)).div_(sx)
    idx = (Nx.abs() < thr).view(-1).nonzero().squeeze(1)
    if idx.numel():
        M = x.shape[-1]
        xs = x.reshape(-1)[idx]
        axis = torch.div(idx, M, rounding_mode="floor").remainder_(3)
        drdx.view(-1)[idx] = xs * (c1.reshape(3)[axis] + c3.reshape(3)[axis] * (xs * xs))
    return drdx


@dataclass(frozen=True)
class _FusedSpec:
    """Non-tensor settings of the fused kernel."""

    ov: int
    n_orient: int
    point_pixel: bool
    nopolar: bool
    kahn: object          # the Kahn factor when it is a plain number (tensor factors come as an input)
    ftable: FTable
    native: bool = False  # terms and their derivatives by native.c's nb_fused_source (float32, CPU)


class _FusedFastChunk(torch.autograd.Function):
    """The fast kernel (square crystal, nearest F, flat detector) with hand-written derivatives.

    The forward evaluates exactly the ops of :func:`_chunk_fast` and, for the inputs that need a gradient,
    the analytic per-term derivatives of the lattice factor (dr/dx = (N cos Nx - r cos x) / sin x, its
    series -N (N^2-1) x / 3 + N (N^2-1)(3N^2-7) x^3 / 90 where |N x| is small; dr/dN = x cos Nx / sin x),
    reduced as far as the loss-independent algebra allows: d terms / dH (O*3, M) only when the orientation
    matrices need a gradient, its projection on the scattering vector (3, M) for the geometry, and the
    per-axis N derivative summed over orientations (3, M).  The backward is then two small GEMMs and a
    few (3, M) passes through scattering vector -> unit direction -> pixel position -> detector vectors, the
    solid angle and the polarisation (whose frame vectors E_in, B_in come in as inputs so autograd carries
    them back to the beam and polarisation axis).  Saves no autograd graph of the per-term ops: forward +
    backward costs about twice the forward, against three times and more through autograd.
    """

    @staticmethod
    def forward(ctx, spec: _FusedSpec, f, s, A2, pix0, fdet, sdet, px, cd, scale, dirs, lams, N, kahn, E_in, B_in):
        ov, O = spec.ov, spec.n_orient
        n = ov * ov
        Fd, Sd, air, diff, air0, omega = _fast_geometry(ov, spec.point_pixel, f, s, pix0, fdet, sdet, px, cd)
        M = air.shape[0]
        dt = air.dtype
        Ncol = N.view(1, 3, 1)
        need_A = A2.requires_grad
        need_N = N.requires_grad
        need_Q = any(t.requires_grad for t in (pix0, fdet, sdet, px, dirs, lams))
        derive = need_A or need_N or need_Q
        if derive:
            thr, c1, c3 = _dr_dx_series(Ncol, dt)
        ft = spec.ftable
        acc = torch.zeros(M, dtype=dt, device=f.device)
        polar = None
        per_src = []
        nat = None
        if spec.native:
            nat = native.FusedSource(A2, N, dirs, lams, ft)
        for si in range(dirs.shape[0]):
            inc = dirs[si]
            Q = (diff - inc[:, None]) / lams[si]
            if polar is None and not spec.nopolar:
                polar = polarization_factor_in_frame(kahn if kahn is not None else spec.kahn, inc,
                                    diff.view(3, -1, n)[:, :, 0].T, E_in, B_in)
            if nat is not None:
                acc_s, G, Gq, GN = nat.source(diff, si, need_A, need_Q, need_N)
                acc = acc + acc_s
                per_src += [G, Q if (need_A or lams.requires_grad) else None, Gq, GN]
                continue
            H = torch.mm(A2, Q).view(O, 3, M)
            H0 = torch.ceil(H - 0.5)
            D = H - H0
            x = D * math.pi + 1e-30
            Nx = x * Ncol
            sx = torch.sin(x)
            r = torch.sin(Nx).div_(sx)
            q = r * r
            q01 = q[:, 0] * q[:, 1]
            terms = q01 * q[:, 2]
            if ft.F is not None:
                Fc = ft.nearest_cols(H0)
                F2 = Fc * Fc
            else:
                F2 = ft.default_F * ft.default_F
            terms = terms * F2
            acc = acc + (terms.sum(0) if O > 1 else terms[0])
            G = Gq = GN = None
            if derive:
                # pi r_i * prod_{j != i} r_j^2 times 2 F^2: d terms / d r_i, times dx/dH = pi
                rw = torch.stack([q[:, 1] * q[:, 2], q[:, 0] * q[:, 2], q01], 1).mul_(r)
                rw = rw.mul_(F2[:, None] * _TWO_PI) if isinstance(F2, torch.Tensor) else rw.mul_(_TWO_PI * F2)
                cNx = torch.cos(Nx)
                if need_N:
                    GN = (x * cNx).div_(sx).mul_(rw).sum(0).div_(math.pi)                # (3, M)
                if need_A or need_Q:
                    G = _dr_dx(x, Nx, r, sx, cNx, Ncol, c1, c3, thr).mul_(rw).view(O * 3, M)   # d terms / dH
                    if need_Q:
                        Gq = torch.mm(A2.T, G)                                          # (3, M)
                    if not need_A:
                        G = None
            per_src += [G, Q if (need_A or lams.requires_grad) else None, Gq, GN]
        Ipix = acc.view(-1, n).sum(1) if n > 1 else acc
        out = Ipix * (scale * omega)
        if polar is not None:
            out = out * polar
        ctx.spec = spec
        ctx.n_src = int(dirs.shape[0])
        ctx.save_for_backward(A2, pix0, fdet, sdet, px, cd, scale, dirs, lams, kahn, E_in, B_in,
                              Fd, Sd, air, diff, air0, omega, Ipix, polar, *per_src)
        return out

    @staticmethod
    def backward(ctx, g):
        (A2, pix0, fdet, sdet, px, cd, scale, dirs, lams, kahn, E_in, B_in,
         Fd, Sd, air, diff, air0, omega, Ipix, polar, *per_src) = ctx.saved_tensors
        spec = ctx.spec
        nig = ctx.needs_input_grad
        n = spec.ov * spec.ov
        P = Ipix.shape[0]
        M = P * n
        so = scale * omega
        gI = g * so
        if polar is not None:
            gI = gI * polar
        g_scale = None
        if nig[9]:
            t = g * Ipix * omega
            g_scale = (t * polar if polar is not None else t).sum()
        g_acc = gI.repeat_interleave(n) if n > 1 else gI
        need_pos = any(nig[4:9])
        need_diff = need_pos or nig[10] or nig[11]
        gA2 = torch.zeros_like(A2) if nig[3] else None
        g_dirs = torch.zeros_like(dirs) if nig[10] else None
        g_lams = torch.zeros_like(lams) if nig[11] else None
        g_N = torch.zeros(3, dtype=diff.dtype, device=diff.device) if nig[12] else None
        g_diff = torch.zeros_like(diff) if need_diff else None
        for si in range(ctx.n_src):
            G, Q, Gq, GN = per_src[4 * si: 4 * si + 4]
            lam = lams[si]
            if G is not None and gA2 is not None:
                gA2 += torch.mm(G, (Q * g_acc).T)
            if Gq is not None and need_diff:
                gd = (Gq * g_acc).div_(lam)                                         # dL/d diff from this source
                g_diff += gd
                if g_dirs is not None:
                    g_dirs[si] -= gd.sum(1)
                if g_lams is not None:
                    g_lams[si] -= (gd * Q).sum()
            if GN is not None and g_N is not None:
                g_N += (GN * g_acc).sum(1)
        g_kahn = g_E = g_B = None
        rows0 = diff.view(3, P, n)[:, :, 0]                                           # (3, P)
        if polar is not None and (need_diff or any(nig[13:16])):
            g_pol = g * Ipix * so
            inc0 = dirs[0]
            c = inc0 @ rows0
            dpdc = c
            g_rows = None
            if E_in is not None:
                K = kahn if kahn is not None else spec.kahn
                E = E_in @ rows0
                B = B_in @ rows0
                den = E * E + B * B
                ok = den > 0
                safe = torch.where(ok, den, torch.ones_like(den))
                cos2psi = torch.where(ok, (E * E - B * B) / safe, torch.ones_like(den))
                sin2 = 1.0 - c * c
                dpdc = c * (1.0 + K * cos2psi)
                w = torch.where(ok, g_pol * (-0.5 * K * sin2) * 4.0 / (safe * safe), torch.zeros_like(den))
                wE = w * E * B * B
                wB = -(w * B * E * E)
                if nig[13]:
                    g_kahn = -(g_pol * 0.5 * cos2psi * sin2).sum()
                if nig[14]:
                    g_E = rows0 @ wE
                if nig[15]:
                    g_B = rows0 @ wB
                g_rows = E_in[:, None] * wE + B_in[:, None] * wB
            wc = g_pol * dpdc
            if g_dirs is not None:
                g_dirs[0] += rows0 @ wc
            if need_diff:
                gr = inc0[:, None] * wc
                g_rows = gr if g_rows is None else g_rows + gr
                g_diff.view(3, P, n)[:, :, 0] += g_rows
        g_px = g_cd = None
        g_air0 = None
        if need_pos:
            g_om = g * Ipix * scale
            if polar is not None:
                g_om = g_om * polar
            t = g_om * omega
            if spec.point_pixel:
                g_air0 = t * (-2.0) / air0
            else:
                g_air0 = t * (-3.0) / air0
                if nig[7]:
                    g_px = t.sum() * 2.0 / px
                if nig[8]:
                    g_cd = t.sum() / cd
        g_pix0 = g_fdet = g_sdet = None
        if need_pos:
            g_pos = (g_diff - diff * (diff * g_diff).sum(0)).div_(air)
            g_pos.view(3, P, n)[:, :, 0] += g_air0 * rows0
            if nig[4]:
                g_pix0 = g_pos.sum(1)
            if nig[5]:
                g_fdet = g_pos @ Fd
            if nig[6]:
                g_sdet = g_pos @ Sd
            if nig[7]:
                t = ((fdet @ g_pos) * Fd + (sdet @ g_pos) * Sd).sum() / px
                g_px = t if g_px is None else g_px + t
        return (None, None, None, gA2, g_pix0, g_fdet, g_sdet, g_px, g_cd, g_scale, g_dirs, g_lams, g_N,
                g_kahn, g_E, g_B)


def _fused_ok(p: Prepared) -> bool:
    """The fused-gradient kernel applies: autograd on, no spot cutoff, structure factors not refined."""
    if not torch.is_grad_enabled() or p.spot_cutoff is not None or not p.fused_backward:
        return False
    for t in (p.ftable.F, p.ftable.default_F):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return False
    return True


def _chunk_fused(p: Prepared, f: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    O = p.n_orient
    dt = p.dtype
    kahn_t = p.kahn if isinstance(p.kahn, torch.Tensor) else None
    E_in = B_in = None
    if not p.nopolar and (kahn_t is not None or float(p.kahn) != 0.0):
        E_in, B_in = polarization_basis(p.polar_axis, p.src_dirs[0])
    use_native = False
    if p.native and dt == torch.float32 and p.pix0.device.type == "cpu":
        use_native = native.available()
    spec = _FusedSpec(ov=p.oversample, n_orient=O, point_pixel=p.point_pixel, nopolar=p.nopolar,
                      kahn=None if kahn_t is not None else float(p.kahn), ftable=p.ftable, native=use_native)
    return _FusedFastChunk.apply(spec, f, s, p.A.reshape(O * 3, 3), p.pix0, p.fdet, p.sdet, p.px, p.close_distance,
                                 p.scale.to(dt), p.src_dirs, p.src_lams, p.N, kahn_t, E_in, B_in)


def _chunk_intensity(p: Prepared, f: torch.Tensor, s: torch.Tensor, *tensors) -> torch.Tensor:
    """Photons for a chunk of pixels (f, s indices)."""
    if _fast_ok(p):
        if _fused_ok(p):
            return _chunk_fused(p, f, s)
        return _chunk_fast(p, f, s)
    return _chunk_general(p, f, s)


def spot_block_mask(p: Prepared, detector: DetectorConfig, cutoff: float, block: int = 8) -> torch.Tensor:
    """(spixels, fpixels) bool: pixels in ``block``-sized tiles whose corner Miller indices bracket, on every
    axis and for some source/orientation, a point within ``cutoff / N`` of an integer (plus a 0.02 margin for
    the curvature of the pixel -> hkl map).  Pixels outside are skipped by the spot-cutoff render."""
    fmin, fmax, smin, smax = detector.roi_bounds()
    fc = torch.arange(fmin, fmax + 2, block, dtype=torch.float64)
    if float(fc[-1]) != fmax + 1:
        fc = torch.cat([fc, torch.tensor([fmax + 1.0], dtype=torch.float64)])
    sc = torch.arange(smin, smax + 2, block, dtype=torch.float64)
    if float(sc[-1]) != smax + 1:
        sc = torch.cat([sc, torch.tensor([smax + 1.0], dtype=torch.float64)])
    g = p.geom
    with torch.no_grad():
        px = g.pixel_size.detach()
        pos = (g.pix0.detach() + (sc[:, None, None] * px) * g.sdet.detach()
               + (fc[None, :, None] * px) * g.fdet.detach())                     # (ns, nf, 3)
        diff = pos / torch.linalg.vector_norm(pos, dim=-1, keepdim=True)
        A = p.A.detach().to(torch.float64)
        N = p.N.detach().to(torch.float64)
        margin = cutoff / N + 0.02
        sel = torch.zeros(len(sc) - 1, len(fc) - 1, dtype=torch.bool)
        for si in range(p.src_dirs.shape[0]):
            q = (diff - p.src_dirs[si].detach().to(torch.float64)) / float(p.src_lams[si])
            H = torch.einsum("oij,sfj->osfi", A, q)                               # (O, ns, nf, 3)
            c = torch.stack([H[:, :-1, :-1], H[:, 1:, :-1], H[:, :-1, 1:], H[:, 1:, 1:]])
            lo = c.amin(0) - margin
            hi = c.amax(0) + margin
            has_int = (torch.floor(hi) >= torch.ceil(lo)).all(-1)                  # (O, nbs, nbf)
            sel |= has_int.any(0)
    tiles = sel.repeat_interleave(block, 0).repeat_interleave(block, 1)[:smax - smin + 1, :fmax - fmin + 1]
    mask = torch.zeros(detector.spixels, detector.fpixels, dtype=torch.bool)
    mask[smin:smax + 1, fmin:fmax + 1] = tiles
    return mask


def spot_local_bound(p: Prepared, cutoff: float) -> dict:
    """The error bound of spot-local rendering (:func:`spot_local_mask`) with ``cutoff`` K fringes.

    ``per_term``: every term of a skipped pixel has some axis i with |h_i - nearest integer| >= K / N_i, so its
    lattice factor is at most max_i 1 / (N_i^2 sin^2(pi K / N_i)) of its reflection's peak value (a hard bound).
    ``total``: the share of the image's photons in skipped pixels, 6 / (pi^2 K).  In 3-D the sincg^2 tail beyond K
    fringes on one axis holds about 1 / (pi^2 K) of a reflection's photons, 3 / (pi^2 K) over the three axes;
    the detector samples each reflection on the Ewald sphere, which can weight the tails more than that, so
    the stated bound is twice it (an empirical bound, asserted on nanoBragg C's golden images and random
    orientations; measured 27 % at K = 1.5 against 41 %, 3-4 % at K = 4 against 15 % on seed 004).  It
    is 1e-4 only at K ~ 6000 fringes, far beyond the unit cell: sincg's slow 1 / x^2 tails are why
    spot-local rendering is an option for losses near the spots and not the default image.  Square crystals
    only (other shapes: ``None``)."""
    if p.shape != CrystalShape.SQUARE:
        return {"per_term": None, "total": None}
    N = [max(float(n), 1.0) for n in p.N.detach().reshape(-1).tolist()]
    per = max(1.0 / (n * n * math.sin(math.pi * min(cutoff, n / 2.0) / n) ** 2) for n in N)
    return {"per_term": per, "total": 6.0 / (math.pi ** 2 * cutoff)}


def spot_local_mask(p: Prepared, detector: DetectorConfig, cutoff: float = 10.0, block: int = 8) -> torch.Tensor:
    """(spixels, fpixels) bool: the pixels near predicted reflections, i.e. every 8 x 8 tile in which some
    orientation and source puts a point within ``cutoff`` fringes (|h_i - nearest integer| < cutoff / N_i on
    every axis) of a reciprocal-lattice point.  Pass it as ``pixel_mask`` to :func:`render` or
    :func:`render_loss`: the kept pixels get every term (exactly the full render's values), the others are 0;
    :func:`spot_local_bound` states what is left out."""
    return spot_block_mask(p, detector, cutoff, block)


def _roi_pixels(detector: DetectorConfig, device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    fmin, fmax, smin, smax = detector.roi_bounds()
    fs = torch.arange(fmin, fmax + 1, device=device)
    ss = torch.arange(smin, smax + 1, device=device)
    S, F = torch.meshgrid(ss, fs, indexing="ij")
    return F.reshape(-1), S.reshape(-1), (fmin, fmax, smin, smax)


def native_ok(p: Prepared) -> bool:
    """The compiled forward kernel applies: fast kernel, float32 on the CPU, no spot cutoff, no gradient
    needed (autograd off, or no tensor of the render requires one), and the library builds and loads."""
    if not p.native or not _fast_ok(p) or p.spot_cutoff is not None or p.dtype != torch.float32:
        return False
    if p.pix0.device.type != "cpu" or p.A64 is None:
        return False
    if torch.is_grad_enabled():
        ts = [getattr(p, n) for n in _PREPARED_TENSORS] + [p.ftable.F, p.ftable.default_F]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts):
            return False

    return native.available()


def _render_native(p: Prepared, detector: DetectorConfig, crop: bool, pixel_mask: Optional[torch.Tensor],
                   progress) -> torch.Tensor:
    fmin, fmax, smin, smax = detector.roi_bounds()
    box = np.zeros((smax - smin + 1, fmax - fmin + 1), dtype=np.float32)
    mask = None
    if pixel_mask is not None:
        mask = pixel_mask[smin:smax + 1, fmin:fmax + 1].to(torch.bool).cpu().numpy()
    if mask is not None and mask.mean() < 0.25:
        # a sparse mask (spot-local pixels): the listed pixels only (rows would be rendered whole)
        ss, fs = np.nonzero(mask)
        box[ss, fs] = native.render_pixels_native(p, fs + fmin, ss + smin, threads=torch.get_num_threads())
    else:
        native.render_native(p, fmin, fmax, smin, smax, box, mask=mask, threads=torch.get_num_threads())
    if progress is not None:
        progress(box.size, box.size)
    t = torch.from_numpy(box)
    if crop or t.shape == (detector.spixels, detector.fpixels):
        return t
    img = torch.zeros(detector.spixels, detector.fpixels, dtype=torch.float32)
    img[smin:smax + 1, fmin:fmax + 1] = t
    return img


def render(p: Prepared, detector: DetectorConfig, *, pixel_batch_size: Optional[int] = None,
           chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, checkpoint: Optional[bool] = None,
           progress: Optional[Callable[[int, int], None]] = None, crop: bool = False,
           pixel_mask: Optional[torch.Tensor] = None, checkpoint_budget_bytes: float = 2e9) -> torch.Tensor:
    """Render the (spixels, fpixels) image (zeros outside the ROI), or the ROI only with ``crop``.

    ``pixel_mask`` (spixels, fpixels) bool: only those pixels are rendered (the others are 0), e.g. the
    spot-local set of :func:`spot_local_mask`.  Without gradients, float32 fast-kernel renders use the
    compiled kernel (:mod:`.native`) when available."""
    device = p.pix0.device
    if p.spot_cutoff is not None and pixel_mask is None and not p.curved:
        pixel_mask = spot_block_mask(p, detector, p.spot_cutoff)
    if native_ok(p):
        return _render_native(p, detector, crop, pixel_mask, progress)
    f_all, s_all, (fmin, fmax, smin, smax) = _roi_pixels(detector, device)
    if pixel_mask is not None:
        m = pixel_mask[s_all, f_all].to(torch.bool)
        f_all, s_all = f_all[m], s_all[m]
    npx = f_all.numel()
    per_pixel = p.oversample ** 2 * p.n_orient * int(p.src_dirs.shape[0])
    if p.ftable.interpolate:
        per_pixel *= 24
    batch = pixel_batch_size or max(1, chunk_elements // per_pixel)
    grad = torch.is_grad_enabled()
    if checkpoint is None:
        # keep the saved tensors while they fit in ~2 GB (about 48 values per term through plain autograd;
        # the fused kernel keeps 3 per term and source plus about 9 per sub-pixel and source and 8 per
        # sub-pixel); beyond that re-compute each chunk in the backward pass so memory stays bounded by the
        # chunk size
        itemsize = torch.finfo(p.dtype).bits // 8
        if grad and _fast_ok(p) and _fused_ok(p):
            n_src = int(p.src_dirs.shape[0])
            saved = npx * p.oversample ** 2 * (n_src * (3 * p.n_orient + 9) + 8)
        else:
            saved = npx * per_pixel * 48
        checkpoint = grad and npx > batch and saved * itemsize > checkpoint_budget_bytes
    diff_tensors = [t for t in (p.A, p.pix0, p.fdet, p.sdet, p.px, p.close_distance, p.N, p.scale,
                                p.src_dirs, p.src_lams, p.ftable.F, p.recip, p.distance, p.beam)
                    if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = []
    # without autograd, chunks are written into one pre-allocated vector (no small blocks left between
    # the chunks' large temporaries, which keeps the allocator from fragmenting on long renders)
    vals = None if grad else torch.empty(npx, dtype=p.dtype, device=device)
    for start in range(0, npx, batch):
        f = f_all[start:start + batch]
        s = s_all[start:start + batch]
        if checkpoint and diff_tensors:
            out = _checkpoint(_chunk_intensity, p, f, s, *diff_tensors, use_reentrant=False)
        else:
            out = _chunk_intensity(p, f, s)
        if vals is None:
            outs.append(out)
        else:
            vals[start:start + out.shape[0]] = out
        del out
        if progress is not None:
            progress(min(start + batch, npx), npx)
    if vals is None:
        vals = torch.cat(outs) if outs else torch.zeros(0, dtype=p.dtype, device=device)
    if crop and pixel_mask is None:
        return vals.reshape(smax - smin + 1, fmax - fmin + 1)
    if pixel_mask is None:
        # the ROI is a rectangle in slow-major order: a reshape (full detector) or one slice copy, no scatter
        box = vals.reshape(smax - smin + 1, fmax - fmin + 1)
        if box.shape == (detector.spixels, detector.fpixels):
            return box
        img = torch.zeros(detector.spixels, detector.fpixels, dtype=p.dtype, device=device)
        img[smin:smax + 1, fmin:fmax + 1] = box
        return img
    img = torch.zeros(detector.spixels * detector.fpixels, dtype=p.dtype, device=device)
    img = img.index_put((s_all * detector.fpixels + f_all,), vals)
    img = img.reshape(detector.spixels, detector.fpixels)
    if crop:
        return img[smin:smax + 1, fmin:fmax + 1]
    return img


#: Prepared fields that may carry gradients into the per-chunk kernels
_PREPARED_TENSORS = ("A", "src_dirs", "src_lams", "N", "fudge", "recip", "kahn", "polar_axis", "scale", "pix0",
                     "fdet", "sdet", "px", "close_distance", "distance", "beam")


#: Prepared fields the fast kernel does not read (their gradients, if any, stay zero on every route)
_UNUSED_BY_FAST = ("fudge", "recip", "distance", "beam")


def _graph_leaves(t: torch.Tensor) -> list:
    """The leaf tensors (requiring grad) that ``t`` depends on, in a fixed order."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    out, seen, todo = [], set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and all(v is not var for v in out):
            out.append(var)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return out


def _jacobian_columns(y: torch.Tensor, leaves: list) -> torch.Tensor:
    """(y.numel(), K) float64 Jacobian of the 1-d tensor ``y`` with respect to the leaves' K elements, one column
    per element by the double-backward trick (a vector-Jacobian product with a requires-grad cotangent u,
    then its gradient with respect to u), so K small backward passes instead of one per element of ``y``."""
    u = torch.zeros_like(y, requires_grad=True)
    try:
        vj = torch.autograd.grad(y, leaves, grad_outputs=u, retain_graph=True, create_graph=True, allow_unused=True)
        cols = []
        for v, g in zip(leaves, vj):
            for j in range(v.numel()):
                if g is None or not g.requires_grad:
                    cols.append(torch.zeros_like(y))
                else:
                    c = torch.autograd.grad(g.reshape(-1)[j], u, retain_graph=True, allow_unused=True)[0]
                    cols.append(torch.zeros_like(y) if c is None else c)
        return torch.stack(cols, 1).to(torch.float64)
    except RuntimeError:  # an op without double backward: one row per element of y
        rows = []
        for i in range(y.numel()):
            gs = torch.autograd.grad(y[i], leaves, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(v)).reshape(-1)
                                   for g, v in zip(gs, leaves)]))
        return torch.stack(rows).to(torch.float64)


def _native_grad_plan(p: Prepared, max_params: int = 64):
    """For :func:`render_loss`: ``(leaves, D, need_N, need_scale)`` when the compiled forward + derivatives
    kernel (:func:`.native.grad_pixels`) covers every gradient the render needs (fast kernel in float32 on the
    CPU, no spot cutoff, gradients only through the orientation matrices, N and the fluence scale, at most
    ``max_params`` parameter elements behind the orientation matrices), else None (the torch kernel then runs).
    ``D`` (n_orient, K, 3, 3) = d A_o / d theta_k for the leaves' K elements, from ``prepare``'s float64 graph."""
    if not p.native or not _fast_ok(p) or p.spot_cutoff is not None or p.dtype != torch.float32:
        return None
    if p.pix0.device.type != "cpu" or p.A64 is None or not p.fused_backward:
        return None
    for t in (p.ftable.F, p.ftable.default_F):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return None
    needs = {n for n in _PREPARED_TENSORS if isinstance(getattr(p, n), torch.Tensor) and getattr(p, n).requires_grad}
    if needs - {"A", "N", "scale", *_UNUSED_BY_FAST}:
        return None

    if not native.available():
        return None
    O = p.n_orient
    leaves, D = [], None
    if "A" in needs:
        src = p.A64 if p.A64.requires_grad else p.A
        leaves = _graph_leaves(src)
        K = sum(v.numel() for v in leaves)
        if K == 0 or K > max_params:
            return None
        flat = src.reshape(-1)
        Jac = _jacobian_columns(flat, leaves)
        D = Jac.reshape(O, 3, 3, K).permute(0, 3, 1, 2).contiguous().cpu().numpy()
    return leaves, D, "N" in needs, "scale" in needs


def _loss_pixels(detector: DetectorConfig, device, pixel_mask: Optional[torch.Tensor], pixels) -> tuple:
    """(f, s) int64 index vectors of the pixels a loss covers: ``pixels`` as given, else the ROI's pixels where
    ``pixel_mask`` is set (slow-major), else the whole ROI."""
    if pixels is not None:
        f, s = (torch.as_tensor(x, device=device).reshape(-1).to(torch.int64) for x in pixels)
        if f.shape != s.shape:
            raise ValueError(f"render_loss: pixels (f, s) must have one length, got {tuple(f.shape)}, {tuple(s.shape)}")
        if f.numel() and (int(f.min()) < 0 or int(f.max()) >= detector.fpixels or int(s.min()) < 0
                          or int(s.max()) >= detector.spixels):
            raise ValueError("render_loss: pixel indices outside the detector "
                             f"({detector.fpixels} x {detector.spixels})")
        return f, s
    if pixel_mask is None:
        f, s, _ = _roi_pixels(detector, device)
        return f, s
    fmin, fmax, smin, smax = detector.roi_bounds()
    ss, fs = torch.nonzero(pixel_mask[smin:smax + 1, fmin:fmax + 1], as_tuple=True)
    return fs + fmin, ss + smin


def render_loss(p: Prepared, detector: DetectorConfig, loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                torch.Tensor], *, pixel_mask: Optional[torch.Tensor] = None, pixel_batch_size: Optional[int] = None,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                progress: Optional[Callable[[int, int], None]] = None, pixels=None) -> torch.Tensor:
    """A loss that is a sum over pixels, and its backward pass, evaluated chunk by chunk.

    ``loss_fn(pred, f, s)`` gets the photons ``pred`` (K,) of one chunk's pixels at fast / slow indices
    ``f``, ``s`` (K,) and returns that chunk's share of the loss (e.g. ``((pred - target[s, f]) ** 2).sum()``).
    Each chunk is rendered, its loss evaluated and back-propagated at once into detached stand-ins of the
    render's parameter tensors, so no chunk's saved tensors outlive it: memory stays bounded by the chunk
    size for any number of pixels, orientations and sources, with no re-computation (check-pointing
    renders every chunk twice).  One final backward then carries the summed gradients through
    ``prepare``'s small graph, so the leaves' ``.grad`` accumulate exactly as after ``loss.backward()``.
    Returns the total loss (float64, detached).  ROI, ``pixel_mask`` and ``spot_cutoff`` as :func:`render`;
    ``pixels = (f, s)`` (integer index vectors) gives the pixels explicitly instead (no per-detector set-up).

    When the gradient flows only through the orientation matrices (phi, mosaic spread, misset, cell, A.mat),
    N and the fluence, float32 on the CPU, each chunk's photons and their derivatives with respect to those
    parameters come from one pass of the compiled kernel (:func:`.native.grad_pixels`, float64 accumulation,
    the same photons as the forward render); the chunk's loss gradient is then contracted with them in pixel
    order, so the result does not depend on the thread count.  Other cases use the fused torch kernel.
    """
    device = p.pix0.device
    names = [n for n in _PREPARED_TENSORS if isinstance(getattr(p, n), torch.Tensor) and getattr(p, n).requires_grad]
    stand_in = {n: getattr(p, n).detach().requires_grad_() for n in names}
    ft = p.ftable
    ft_orig = [t if isinstance(t, torch.Tensor) and t.requires_grad else None for t in (ft.F, ft.default_F)]
    ft_new = [t.detach().requires_grad_() if t is not None else None for t in ft_orig]
    q = dataclasses.replace(p, **stand_in)
    if any(t is not None for t in ft_new):
        q.ftable = FTable(ft_new[0] if ft_new[0] is not None else ft.F, ft.mins,
                          ft_new[1] if ft_new[1] is not None else ft.default_F, ft.interpolate)
    if p.spot_cutoff is not None and pixel_mask is None and pixels is None and not p.curved:
        pixel_mask = spot_block_mask(p, detector, p.spot_cutoff)
    plan = _native_grad_plan(p)
    if plan is not None:
        return _render_loss_native(p, plan, loss_fn, detector, pixel_mask, pixels, pixel_batch_size or (1 << 18),
                                   progress)
    f_all, s_all = _loss_pixels(detector, device, pixel_mask, pixels)
    npx = f_all.numel()
    per_pixel = p.oversample ** 2 * p.n_orient * int(p.src_dirs.shape[0]) * (24 if p.ftable.interpolate else 1)
    batch = pixel_batch_size or max(1, chunk_elements // per_pixel)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with torch.enable_grad():
        for start in range(0, npx, batch):
            f = f_all[start:start + batch]
            s = s_all[start:start + batch]
            loss = loss_fn(_chunk_intensity(q, f, s), f, s)
            if loss.requires_grad:
                loss.backward()
            total += loss.detach().to(torch.float64)
            del loss
            if progress is not None:
                progress(min(start + batch, npx), npx)
        outs, grads = [], []
        for orig, new in [(getattr(p, n), stand_in[n]) for n in names] + list(zip(ft_orig, ft_new)):
            if new is not None and new.grad is not None:
                outs.append(orig)
                grads.append(new.grad)
        if outs:
            torch.autograd.backward(outs, grads)
    return total


def _render_loss_native(p: Prepared, plan, loss_fn, detector: DetectorConfig, pixel_mask, pixels, batch: int,
                        progress) -> torch.Tensor:
    """:func:`render_loss` through the compiled forward + derivatives kernel (see :func:`_native_grad_plan`).
    A whole ROI's pixel indices are made chunk by chunk (no detector-sized index vectors)."""
    if pixel_mask is None and pixels is None:
        fmin, fmax, smin, smax = detector.roi_bounds()
        W = fmax - fmin + 1
        npx = W * (smax - smin + 1)
        batch = max(1, batch // W) * W          # whole rows per chunk
        fs = torch.arange(fmin, fmax + 1)

        def chunk(start):
            r0 = smin + start // W
            r1 = min(smax + 1, r0 + batch // W)
            return fs.repeat(r1 - r0), torch.arange(r0, r1).repeat_interleave(W)
    else:
        f_all, s_all = _loss_pixels(detector, p.pix0.device, pixel_mask, pixels)
        npx = f_all.numel()

        def chunk(start):
            return f_all[start:start + batch], s_all[start:start + batch]
    spec = native.make_spec(p)

    leaves, D, need_N, need_scale = plan
    K = 0 if D is None else int(D.shape[1])
    threads = torch.get_num_threads()
    g_theta = np.zeros(K)
    g_N = np.zeros(3)
    g_scale = 0.0
    total = torch.zeros((), dtype=torch.float64)
    with torch.enable_grad():
        for start in range(0, npx, batch):
            f, s = chunk(start)
            out, J, JN = native.grad_pixels(p, f.numpy(), s.numpy(), D, need_N, threads=threads, spec=spec)
            pred = torch.from_numpy(out).requires_grad_()
            loss = loss_fn(pred, f, s)
            if loss.requires_grad:
                loss.backward()
            total += loss.detach().to(torch.float64)
            del loss
            if pred.grad is not None:
                gp = pred.grad.numpy().astype(np.float64)
                if K:
                    g_theta += native.grad_reduce(gp, J)
                if need_N:
                    g_N += native.grad_reduce(gp, JN)
                if need_scale:
                    g_scale += float(native.grad_reduce(gp, out.astype(np.float64).reshape(-1, 1))[0])
            if progress is not None:
                progress(min(start + batch, npx), npx)
        outs, grads = [], []
        off = 0
        for v in leaves:
            k = v.numel()
            outs.append(v)
            grads.append(torch.from_numpy(g_theta[off:off + k].copy()).reshape(v.shape).to(v.dtype))
            off += k
        if need_N:
            outs.append(p.N)
            grads.append(torch.from_numpy(g_N).to(p.N.dtype))
        if need_scale:
            outs.append(p.scale)
            grads.append(torch.tensor(g_scale / float(p.scale.detach()), dtype=p.scale.dtype))
        if outs:
            torch.autograd.backward(outs, grads)
    return total


class _NativePixels(torch.autograd.Function):
    """Photons at given pixels from the compiled forward + derivatives kernel, differentiable in the leaves behind
    the orientation matrices, N and the fluence scale: the forward keeps the (P, K) derivatives (float64), the
    backward contracts the incoming gradient with them in pixel order (see :func:`_native_grad_plan`)."""

    @staticmethod
    def forward(ctx, p, plan, f, s, threads, N, scale, *leaves):
        _, D, need_N, need_scale = plan
        out, J, JN = native.grad_pixels(p, f.cpu().numpy(), s.cpu().numpy(), D, need_N, threads=threads)
        ctx.save = (J, JN, out, float(scale.detach()), [v.shape for v in leaves])
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, g):
        J, JN, out, sc, shapes = ctx.save
        nig = ctx.needs_input_grad
        gp = g.detach().cpu().numpy().astype(np.float64)
        g_N = g_scale = None
        if nig[5] and JN is not None:
            g_N = torch.from_numpy(native.grad_reduce(gp, JN))
        if nig[6]:
            g_scale = torch.tensor(float(native.grad_reduce(gp, out.astype(np.float64).reshape(-1, 1))[0]) / sc,
                                   dtype=torch.float64)
        gl = native.grad_reduce(gp, J) if J.shape[1] else np.zeros(0)
        outs, off = [], 0
        for shp in shapes:
            k = int(np.prod(shp)) if len(shp) else 1
            outs.append(torch.from_numpy(gl[off:off + k].copy()).reshape(shp))
            off += k
        return (None, None, None, None, None, g_N, g_scale, *outs)



def native_pixels(p: Prepared, f: torch.Tensor, s: torch.Tensor) -> Optional[torch.Tensor]:
    """Photons at pixels (f, s) through the compiled forward + derivatives kernel when it covers every gradient
    the render needs (:func:`_native_grad_plan`; under autograd), else None.  Used by
    :func:`.spot_pixels.render_pixels`; values as :func:`render`'s, gradients as :func:`render_loss`'s."""
    if not torch.is_grad_enabled():
        return None
    plan = _native_grad_plan(p)
    if plan is None:
        return None
    leaves = plan[0]
    N = p.N if plan[2] else p.N.detach()
    scale = p.scale if plan[3] else p.scale.detach()
    return _NativePixels.apply(p, plan, f, s, torch.get_num_threads(), N, scale, *leaves)


def simulate(crystal: CrystalConfig, detector: DetectorConfig, beam: BeamConfig | None = None, hkl=None, *,
             dtype=torch.float32, device=None, pixel_batch_size: Optional[int] = None,
             spot_cutoff: Optional[float] = None, checkpoint: Optional[bool] = None,
             progress: Optional[Callable[[int, int], None]] = None, crop: bool = False,
             hkl_tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pure forward model: photons per pixel, shape (spixels, fpixels), differentiable in every tensor field.

    ``hkl``: an :class:`HKLTable` or a ``(grid, metadata)`` pair; None = ``default_F`` everywhere.
    ``hkl_tensor`` replaces the table's values by a (possibly requires-grad) tensor of the same shape.
    """
    beam = beam or BeamConfig()
    p = prepare(crystal, detector, beam, hkl, dtype=dtype, device=device, spot_cutoff=spot_cutoff,
                hkl_tensor=hkl_tensor)
    return render(p, detector, pixel_batch_size=pixel_batch_size, checkpoint=checkpoint, progress=progress,
                  crop=crop)


# ----------------------------------------------------------------------------- seed-style objects
class Crystal:
    """A crystal model: config plus structure factors (``hkl_data`` grid + ``hkl_metadata``, or ``hkl`` table)."""

    def __init__(self, config: CrystalConfig | None = None, beam_config: BeamConfig | None = None,
                 device=None, dtype=torch.float32, hkl: HKLTable | None = None):
        self.config = config or CrystalConfig()
        self.beam_config = beam_config or BeamConfig()
        self.device = device
        self.dtype = dtype
        self.hkl_data: Optional[torch.Tensor] = None
        self.hkl_metadata: Optional[dict] = None
        self.hkl = hkl

    def table(self) -> Optional[HKLTable]:
        if self.hkl is not None:
            return self.hkl
        if self.hkl_data is not None and self.hkl_metadata is not None:
            return HKLTable.from_grid(self.hkl_data, self.hkl_metadata, default_F=fval(self.config.default_F))
        return None

    def lattice(self) -> LatticeVectors:
        return lattice_vectors(self.config, self.beam_config.wavelength_A, self.device)

    @property
    def cell_parameters(self):
        return self.lattice().cell_parameters()


class Detector:
    """A detector model: config plus its lab-frame geometry."""

    def __init__(self, config: DetectorConfig | None = None, device=None, dtype=torch.float32,
                 beam_config: BeamConfig | None = None):
        self.config = config or DetectorConfig()
        self.device = device
        self.dtype = dtype
        self.beam_config = beam_config

    def geometry(self) -> DetectorGeometry:
        return detector_geometry(self.config, self.beam_config, self.device)

    def get_pixel_coords(self) -> torch.Tensor:
        """(spixels, fpixels, 3) lab positions of pixel centres in metres."""
        g = self.geometry()
        s, f = torch.meshgrid(torch.arange(g.spixels), torch.arange(g.fpixels), indexing="ij")
        return g.pixel_centres(f, s)


class Simulator:
    """Seed-style wrapper: ``Simulator(crystal=..., detector=..., beam_config=...).run()``."""

    def __init__(self, crystal: Crystal, detector: Detector, crystal_config: CrystalConfig | None = None,
                 beam_config: BeamConfig | None = None, device=None, dtype=None, spot_cutoff: Optional[float] = None):
        self.crystal = crystal
        self.detector = detector
        if crystal_config is not None:
            crystal.config = crystal_config
        self.beam_config = beam_config or crystal.beam_config or BeamConfig()
        self.device = device if device is not None else crystal.device
        self.dtype = dtype or crystal.dtype or torch.float32
        self.spot_cutoff = spot_cutoff

    def prepare(self) -> Prepared:
        return prepare(self.crystal.config, self.detector.config, self.beam_config, self.crystal.table(),
                       dtype=self.dtype, device=self.device, spot_cutoff=self.spot_cutoff,
                       hkl_tensor=self.crystal.hkl_data if self.crystal.hkl is None else None)

    def run(self, pixel_batch_size: Optional[int] = None, checkpoint: Optional[bool] = None,
            progress=None, crop: bool = False) -> torch.Tensor:
        """Photons per pixel, (spixels, fpixels)."""
        return render(self.prepare(), self.detector.config, pixel_batch_size=pixel_batch_size,
                      checkpoint=checkpoint, progress=progress, crop=crop)


__all__ = ["simulate", "prepare", "render", "render_loss", "pixel_positions_and_q", "spot_block_mask", "Prepared",
           "spot_local_mask", "spot_local_bound", "native_ok", "native_pixels",
           "Crystal", "Detector", "Simulator", "auto_oversample"]
