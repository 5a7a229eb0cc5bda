"""Multiplicative per-pixel intensity corrections and counting-statistics errors.

Every factor here is a *multiplier* applied to the raw (background-subtracted) counts:
``I_corr = (I_raw - B) * polarisation * efficiency * solid_angle * air``.
The factors are treated as exact, so ``sigma_corr = sigma_net * product``.

- polarisation: ``1/P`` with DIALS' stills convention (no Lorentz factor; XDS-style
  polarisation fraction, 0.5 = unpolarised), identical to
  ``dials.algorithms.integration.Corrections(beam, detector).lp(s1)``.
- efficiency: ``1/QE`` with ``QE = 1 - exp(-mu t / |cos(n, s1)|)`` from the sensor's
  attenuation coefficient ``mu`` (1/mm) and thickness ``t`` (mm) stored on the dxtbx panel,
  identical to ``Corrections.qe(s1, panel)``, by which DIALS divides.
- solid angle: ``Omega_ref / Omega`` with ``Omega = A cos(obliquity) / r^2`` (sr) for a
  pixel of area ``A`` at distance ``r``; ``Omega_ref = A_0 / d_0^2`` is the solid angle of a
  panel-0 pixel at normal incidence at panel 0's distance, so corrected values stay in
  "counts per reference pixel".
- air: ``exp(+mu_air L)`` for the sample-to-pixel path ``L`` (mm) times an optional
  fraction (helium cones, vacuum paths). ``mu_air`` = density x sum_i w_i (mu/rho)_i with
  the element mass attenuation coefficients of cctbx's ``eltbx.attenuation_coefficient``
  tables (NIST, Hubbell & Seltzer, NISTIR 5632) and the dry-air composition and density
  of NIST's "Air, Dry (near sea level)" material.
"""
from __future__ import annotations

import numpy as np

#: NIST "Air, Dry (near sea level)" mass fractions (X-Ray Mass Attenuation Coefficients, Table 2).
DRY_AIR_MASS_FRACTIONS = {"C": 0.000124, "N": 0.755268, "O": 0.231781, "Ar": 0.012827}
#: NIST density of dry air near sea level, g/cm^3.
DRY_AIR_DENSITY_G_CM3 = 1.20479e-3


def polarisation_correction(s1x, s1y, s1z, s0, pol_normal, pol_fraction) -> np.ndarray:
    """``1/P`` for stills (DIALS ``Corrections.lp`` without goniometer).

    ``P = (1 - 2 f)(1 - (n.s1_hat)^2) + f (1 + (s0_hat.s1_hat)^2)`` with polarisation-plane
    normal ``n`` and fraction ``f`` (XDS convention).
    """
    s0 = np.asarray(s0, dtype=float)
    n = np.asarray(pol_normal, dtype=float)
    s1_len = np.sqrt(s1x * s1x + s1y * s1y + s1z * s1z)
    p1 = (n[0] * s1x + n[1] * s1y + n[2] * s1z) / s1_len
    p3 = (s0[0] * s1x + s0[1] * s1y + s0[2] * s1z) / (s1_len * np.linalg.norm(s0))
    P = (1.0 - 2.0 * pol_fraction) * (1.0 - p1 * p1) + pol_fraction * (1.0 + p3 * p3)
    return 1.0 / P


def detector_efficiency(cos_obliquity, mu_per_mm: float, thickness_mm: float) -> np.ndarray | None:
    """Absorption efficiency ``1 - exp(-mu t / |cos|)`` of the sensor, or None when unknown."""
    if not (mu_per_mm > 0 and thickness_mm > 0):
        return None
    return -np.expm1(-mu_per_mm * thickness_mm / np.abs(cos_obliquity))


def solid_angle(pixel_area_mm2: float, dist_mm, cos_obliquity) -> np.ndarray:
    """Solid angle (sr) of a small flat pixel: ``A cos(obliquity) / r^2``."""
    return pixel_area_mm2 * cos_obliquity / (dist_mm * dist_mm)


def reference_solid_angle(detector) -> float:
    """Solid angle (sr) of a panel-0 pixel at normal incidence at panel 0's distance."""
    p = detector[0]
    psx, psy = p.get_pixel_size()
    d = abs(float(p.get_distance()))
    return psx * psy / (d * d)


def air_attenuation_coefficient(
    wavelength_A: float,
    density_g_cm3: float = DRY_AIR_DENSITY_G_CM3,
    mass_fractions: dict[str, float] | None = None,
) -> float:
    """Linear attenuation coefficient of air (1/mm) at ``wavelength_A`` from cctbx's NIST tables."""
    from cctbx.eltbx import attenuation_coefficient  # cctbx (~1 s): only the air correction needs it

    fractions = mass_fractions or DRY_AIR_MASS_FRACTIONS
    mu_rho = sum(w * attenuation_coefficient.get_table(el).mu_rho_at_angstrom(wavelength_A)
                 for el, w in fractions.items())  # cm^2/g
    return mu_rho * density_g_cm3 / 10.0  # 1/cm -> 1/mm


def air_correction(dist_mm, mu_air_per_mm: float, path_fraction: float = 1.0) -> np.ndarray:
    """``1 / transmission = exp(mu_air L)`` for the sample-to-pixel air path ``L = f r``."""
    return np.exp(mu_air_per_mm * path_fraction * dist_mm)


def counting_variance(raw, gain: float = 1.0) -> np.ndarray:
    """Poisson variance of raw values in ADU with gain ``g`` (ADU/photon): ``g * max(I, g)``.

    The floor of one photon keeps zero-count pixels from getting zero variance (infinite weight).
    """
    return gain * np.maximum(raw, gain)
