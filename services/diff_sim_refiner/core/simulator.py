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
"""
from __future__ import annotations

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
from .io import HKLTable
from .physics import FTable, lattice_factor_sq, polarization_factor, rotate_about

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
        dtype=dtype, spot_cutoff=spot_cutoff,
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
    its series -N (N^2 - 1) x / 3 for |N x| < 1e-2 (where the formula cancels), dr/dN = x cos(N x) / sin x
    (-> 1 at x = 0).  Keeps forward + backward within about twice the forward.
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
        small = torch.abs(Nx) < 1e-2
        safe = torch.where(small, 1.0, sx)
        drdx = torch.where(small, -Ncol * (Ncol * Ncol - 1.0) * x / 3.0, (Ncol * cNx - r * cx) / safe)
        r2 = r * r
        others = torch.stack([r2[:, 1] * r2[:, 2], r2[:, 0] * r2[:, 2], r2[:, 0] * r2[:, 1]], 1)
        common = (2.0 * g)[:, None] * others * r                    # dL/dr_i
        gD = common * drdx * math.pi if ctx.needs_input_grad[0] else None
        gN = None
        if ctx.needs_input_grad[1]:
            drdN = torch.where(small, 1.0 - (3.0 * Ncol * Ncol - 1.0) * x * x / 6.0, x * cNx / safe)
            gN = (common * drdN).sum(dim=(0, 2), keepdim=True)
        return gD, gN


def _chunk_fast(p: Prepared, f: torch.Tensor, s: torch.Tensor, *tensors) -> torch.Tensor:
    """Square-crystal, nearest-F kernel in a (3, pixels*sub-pixels) layout: one GEMM gives h, k, l for all
    orientations; with ``spot_cutoff`` only near-Bragg terms get the lattice transform and F lookup."""
    ov = p.oversample
    n = ov * ov
    dt = p.dtype
    sub = p.px / ov
    o = torch.arange(ov, dtype=dt, device=f.device)
    offF = (o.repeat(ov) + 0.5) * sub
    offS = (o.repeat_interleave(ov) + 0.5) * sub
    Fd = ((f.to(dt) * p.px)[:, None] + offF).reshape(-1)
    Sd = ((s.to(dt) * p.px)[:, None] + offS).reshape(-1)
    pos = p.pix0[:, None] + p.fdet[:, None] * Fd + p.sdet[:, None] * Sd          # (3, M)
    air = torch.sqrt((pos * pos).sum(0))
    diff = pos / air
    air0 = air.view(-1, n)[:, 0]
    omega = 1.0 / (air0 * air0) if p.point_pixel else p.px * p.px * p.close_distance / (air0 * air0 * air0)
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


def _chunk_intensity(p: Prepared, f: torch.Tensor, s: torch.Tensor, *tensors) -> torch.Tensor:
    """Photons for a chunk of pixels (f, s indices)."""
    if _fast_ok(p):
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
    mask = torch.zeros(detector.spixels, detector.fpixels, dtype=torch.bool)
    tiles = sel.nonzero().tolist()
    for bi, bj in tiles:
        s0 = smin + bi * block
        f0 = fmin + bj * block
        mask[s0:min(s0 + block, smax + 1), f0:min(f0 + block, fmax + 1)] = True
    return mask


def _roi_pixels(detector: DetectorConfig, device) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    fmin, fmax, smin, smax = detector.roi_bounds()
    fs = torch.arange(fmin, fmax + 1, device=device)
    ss = torch.arange(smin, smax + 1, device=device)
    S, F = torch.meshgrid(ss, fs, indexing="ij")
    return F.reshape(-1), S.reshape(-1), (fmin, fmax, smin, smax)


def render(p: Prepared, detector: DetectorConfig, *, pixel_batch_size: Optional[int] = None,
           chunk_elements: int = DEFAULT_CHUNK_ELEMENTS, checkpoint: Optional[bool] = None,
           progress: Optional[Callable[[int, int], None]] = None, crop: bool = False,
           pixel_mask: Optional[torch.Tensor] = None, checkpoint_budget_bytes: float = 2e9) -> torch.Tensor:
    """Render the (spixels, fpixels) image (zeros outside the ROI), or the ROI only with ``crop``."""
    device = p.pix0.device
    if p.spot_cutoff is not None and pixel_mask is None and not p.curved:
        pixel_mask = spot_block_mask(p, detector, p.spot_cutoff)
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
        # keep the autograd graph while it fits in ~2 GB (about 48 saved values per term); beyond that
        # re-compute each chunk in the backward pass so memory stays bounded by the chunk size
        itemsize = torch.finfo(p.dtype).bits // 8
        checkpoint = grad and npx > batch and npx * per_pixel * itemsize * 48 > checkpoint_budget_bytes
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
    img = torch.zeros(detector.spixels * detector.fpixels, dtype=p.dtype, device=device)
    img = img.index_put((s_all * detector.fpixels + f_all,), vals)
    img = img.reshape(detector.spixels, detector.fpixels)
    if crop:
        return img[smin:smax + 1, fmin:fmax + 1]
    return img


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


__all__ = ["simulate", "prepare", "render", "pixel_positions_and_q", "spot_block_mask", "Prepared", "Crystal", "Detector", "Simulator", "auto_oversample"]
