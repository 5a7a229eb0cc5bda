"""Per-pixel physics of nanoBragg, vectorised in torch.

For every pixel the photon count is

    r_e^2 * fluence / steps * sum_{sub-pixels, sources, phi, mosaic} |F_cell(hkl)|^2 |F_latt(hkl)|^2
        * polarisation * solid angle

with ``steps`` the number of terms, fractional Miller indices ``hkl = M_orient @ (s_out - s_in) / lambda``,
and the polarisation and solid angle taken at the pixel's first sub-pixel (nanoBragg's default;
``oversample_polar`` / ``oversample_omega`` evaluate them per sub-pixel instead).
"""
from __future__ import annotations

import math

import torch

from .config import CrystalShape

_PI = math.pi


def sincg_sq(d: torch.Tensor, N: torch.Tensor) -> torch.Tensor:
    """|sin(N pi h) / sin(pi h)|^2 written with d = h - nearest integer (same value for integer N).

    The reduced form is smooth in N (so N can be refined) and exact near the Bragg peak in single
    precision; the small-|d| branch uses the series N^2 (1 - (N^2-1) x^2 / 3).
    """
    x = _PI * d
    sx = torch.sin(x)
    small = torch.abs(x) < (1e-4 if d.dtype == torch.float32 else 1e-7)
    safe = torch.where(small, torch.ones_like(sx), sx)
    r = torch.sin(N * x) / safe
    N2 = N * N
    series = N * (1.0 - (N2 - 1.0) * x * x / 6.0)
    r = torch.where(small, series, r)
    return r * r


def sinc3(x2: torch.Tensor) -> torch.Tensor:
    """3 (sin x - x cos x) / x^3 as a function of x^2 (smooth at 0)."""
    small = x2 < 1e-6
    xs = torch.sqrt(torch.where(small, torch.ones_like(x2), x2))
    val = 3.0 * (torch.sin(xs) - xs * torch.cos(xs)) / (xs * xs * xs)
    return torch.where(small, 1.0 - x2 / 10.0, val)


def lattice_factor_sq(hkl: torch.Tensor, h0: torch.Tensor, N: torch.Tensor, shape: CrystalShape,
                      fudge, recip: torch.Tensor | None) -> torch.Tensor:
    """|F_latt|^2 for the crystal shapes of nanoBragg (square = sincg, round = sinc3, gauss, tophat)."""
    d = hkl - h0
    if shape == CrystalShape.SQUARE:
        f = sincg_sq(d, N)
        return f[..., 0] * f[..., 1] * f[..., 2]
    Nprod = N[0] * N[1] * N[2]
    if shape == CrystalShape.ROUND:
        hrad_sqr = (d * d * (N * N)).sum(-1)
        F = Nprod * 0.723601254558268 * sinc3(_PI * _PI * hrad_sqr * fudge)
        return F * F
    # GAUSS / TOPHAT use the reciprocal-space distance (1/Angstrom) times Na^2 Nb^2 Nc^2, as nanoBragg
    dstar = d @ recip
    rad_star_sqr = (dstar * dstar).sum(-1) * (Nprod * Nprod)
    if shape == CrystalShape.GAUSS:
        F = Nprod * torch.exp(-(rad_star_sqr / 0.63 * fudge))
        return F * F
    F = Nprod * (rad_star_sqr * fudge < 0.3969).to(d.dtype)
    return F * F


class FTable:
    """Structure-factor lookup on the compute device: nearest neighbour or tricubic (nanoBragg's polin3)."""

    def __init__(self, F: torch.Tensor | None, mins: tuple[int, int, int], default_F, interpolate: bool):
        self.F = F
        self.flat = None if F is None else F.reshape(-1)
        self.mins = mins
        self.default_F = default_F
        self.interpolate = bool(interpolate) and F is not None
        if F is not None:
            self.dims = tuple(int(x) for x in F.shape)

    def nearest(self, h0: torch.Tensor) -> torch.Tensor:
        """F at integer indices h0 (..., 3) given as floats; default_F outside the grid."""
        hi = h0.to(torch.int64)
        hr, kr, lr = self.dims
        i = hi[..., 0] - self.mins[0]
        j = hi[..., 1] - self.mins[1]
        k = hi[..., 2] - self.mins[2]
        inside = (i >= 0) & (i < hr) & (j >= 0) & (j < kr) & (k >= 0) & (k < lr)
        lin = (i * kr + j) * lr + k
        lin = torch.where(inside, lin, 0)
        vals = torch.take(self.flat, lin)
        default = torch.as_tensor(self.default_F, dtype=vals.dtype, device=vals.device)
        return torch.where(inside, vals, default)

    def nearest_cols(self, H0: torch.Tensor) -> torch.Tensor:
        """Like :meth:`nearest` for integer-valued indices laid out as (O, 3, M) (returns (O, M))."""
        hr, kr, lr = self.dims
        if hr * kr * lr >= (1 << 24) and H0.dtype == torch.float32:
            return self.nearest(H0.permute(0, 2, 1))
        mins = torch.tensor(self.mins, dtype=H0.dtype, device=H0.device).view(1, 3, 1)
        rel = H0 - mins
        hi = torch.tensor((hr - 1, kr - 1, lr - 1), dtype=H0.dtype, device=H0.device).view(1, 3, 1)
        inside = ((rel >= 0) & (rel <= hi)).all(1)
        lin = (rel[:, 0] * kr + rel[:, 1]) * lr + rel[:, 2]     # exact in float below 2^24 entries
        lin = torch.where(inside, lin, 0.0).to(torch.int64)
        vals = torch.take(self.flat, lin)
        return torch.where(inside, vals, torch.as_tensor(self.default_F, dtype=vals.dtype, device=vals.device))

    def lookup(self, hkl: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        if not self.interpolate:
            return self.nearest(h0)
        return self.tricubic(hkl, h0)

    def tricubic(self, hkl: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """4x4x4 Lagrange interpolation around floor(hkl); nearest neighbour where the stencil leaves the grid."""
        hr, kr, lr = self.dims
        mins = torch.tensor(self.mins, dtype=hkl.dtype, device=hkl.device)
        rng = torch.tensor(self.dims, dtype=hkl.dtype, device=hkl.device)
        rel = hkl - mins
        ok = ((rel + 3 <= rng) & (rel - 2 >= 0)).all(-1)
        flo = torch.floor(hkl)
        t = hkl - flo                                     # (..., 3) in [0, 1)
        tp1, tm1, tm2 = t + 1, t - 1, t - 2
        w = torch.stack([-t * tm1 * tm2 / 6.0, tp1 * tm1 * tm2 / 2.0, -tp1 * t * tm2 / 2.0, tp1 * t * tm1 / 6.0], -1)
        base = (flo - mins).to(torch.int64) - 1           # index of node 0
        base = torch.where(ok[..., None], base, torch.zeros_like(base))
        offs = torch.arange(4, device=hkl.device)
        ii = base[..., 0, None] + offs                    # (..., 4)
        jj = base[..., 1, None] + offs
        kk = base[..., 2, None] + offs
        lin = (ii[..., :, None, None] * kr + jj[..., None, :, None]) * lr + kk[..., None, None, :]
        vals = torch.take(self.flat, lin)                 # (..., 4, 4, 4)
        wh, wk, wl = w[..., 0, :], w[..., 1, :], w[..., 2, :]
        interp = torch.einsum("...ijk,...i,...j,...k->...", vals, wh, wk, wl)
        near = self.nearest(h0)
        return torch.where(ok, interp, near)


def polarization_factor(kahn, incident: torch.Tensor, diffracted: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """nanoBragg's polarisation factor 0.5 (1 + cos^2 2theta - K cos 2psi sin^2 2theta)."""
    if not isinstance(kahn, torch.Tensor) and float(kahn) == 0.0:
        return polarization_factor_in_frame(kahn, incident, diffracted, None, None)
    E_in, B_in = polarization_basis(axis, incident)
    return polarization_factor_in_frame(kahn, incident, diffracted, E_in, B_in)


def polarization_factor_in_frame(kahn, incident: torch.Tensor, diffracted: torch.Tensor, E_in, B_in) -> torch.Tensor:
    """:func:`polarization_factor` with the polarisation frame (E_in, B_in) already known (None: K = 0)."""
    cos2t = diffracted @ incident
    c2 = cos2t * cos2t
    sin2 = 1.0 - c2
    if E_in is None:
        return 0.5 * (1.0 + c2)
    E = diffracted @ E_in
    B = diffracted @ B_in
    den = E * E + B * B
    ok = den > 0
    cos2psi = torch.where(ok, (E * E - B * B) / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))
    return 0.5 * (1.0 + c2 - kahn * cos2psi * sin2)


def polarization_basis(axis: torch.Tensor, incident: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors (E_in, B_in) of nanoBragg's polarisation frame: B_in = axis x incident, E_in = incident x B_in."""
    B_in = torch.linalg.cross(axis, incident)
    B_in = B_in / torch.linalg.vector_norm(B_in)
    E_in = torch.linalg.cross(incident, B_in)
    E_in = E_in / torch.linalg.vector_norm(E_in)
    return E_in, B_in


def rotate_about(v: torch.Tensor, axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues rotation of vectors v (..., 3) about a unit axis (3,) by angles (...)."""
    c, s = torch.cos(angle)[..., None], torch.sin(angle)[..., None]
    k = axis.expand_as(v)
    return v * c + torch.linalg.cross(k, v) * s + k * (v @ axis)[..., None] * (1.0 - c)


__all__ = ["sincg_sq", "sinc3", "lattice_factor_sq", "FTable", "polarization_factor", "polarization_factor_in_frame", "polarization_basis", "rotate_about"]
