"""Compton (incoherent) scattering of the absolute scale checked against published tables and analytic physics
(issue 16, item 3).

The scaler takes S(x, Z) from xraylib 4.3.0 (``SF_Compt``) with x = sin(theta)/lambda = |s|/2 and applies the
Breit-Dirac recoil factor for a photon-counting detector. References used here, none of them xraylib:

- S(x, Z) of Hubbell, Veigele, Briggs, Brown, Cromer & Howerton (1975), J. Phys. Chem. Ref. Data 4, 471-538
  (x = sin(theta/2)/lambda with theta the scattering angle, i.e. sin(theta_Bragg)/lambda), as transcribed from
  the paper's tables by S. Meisburger (2017) for mdx-lib (``model.atom.ScatteringFactor``, Meisburger & Ando) and
  represented there by a 4-Gaussian + constant fit over sin(theta)/lambda <= 2 1/Å. The values below are that
  representation evaluated at the given x, rounded to 3 decimals; the fit reproduces the table to about 0.01 e,
  which sets the tolerance (the tables themselves give 4 significant figures).
- The Compton shift and the Klein-Nishina cross-section from CODATA constants (scipy.constants).
"""
import math

import numpy as np
import pytest
import scipy.constants as sc

from scaler.core import absolute as ab

# x = sin(theta)/lambda (1/Å) -> S(x, Z) in electrons (Hubbell et al. 1975, via mdx-lib's transcription)
X = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5)
HUBBELL_1975 = {
    "C": (1.033, 2.607, 3.637, 4.478, 5.052, 5.349, 5.779),
    "N": (1.075, 2.863, 4.090, 5.184, 5.810, 6.115, 6.629),
    "O": (0.973, 2.803, 4.288, 5.830, 6.596, 6.902, 7.461),
    "S": (2.146, 4.960, 6.788, 8.960, 11.339, 12.476, 13.986),
}
Z = {"C": 6, "N": 7, "O": 8, "S": 16}
TABLE_TOLERANCE = 0.01  # electrons: the accuracy of the transcribed table's representation


@pytest.mark.parametrize("element", sorted(HUBBELL_1975))
def test_incoherent_function_matches_hubbell_1975(element):
    """The scaler's S at |s| = 2x equals the published S(x): the units of x (sin(theta)/lambda, not |s| = 1/d and not
    q = 4 pi sin(theta)/lambda) are right."""
    x = np.array(X)
    ref = np.array(HUBBELL_1975[element])
    ours = ab.incoherent_function(element, 2.0 * x)  # the scaler's argument is |s| = 1/d = 2 sin(theta)/lambda
    np.testing.assert_allclose(ours, ref, atol=TABLE_TOLERANCE, rtol=0)
    # what a units mix-up would give: x taken as |s| (factor 2) or as q (factor 4 pi) misses the table by far more
    assert np.max(np.abs(ab.incoherent_function(element, x[:3]) - ref[:3])) > 0.3
    assert np.max(np.abs(ab.incoherent_function(element, 4 * np.pi * x[:3]) - ref[:3])) > 1.0


@pytest.mark.parametrize("element", sorted(HUBBELL_1975))
def test_incoherent_function_limits(element):
    """S(0) = 0 (no incoherent scattering forward), S grows monotonically and tends to Z (all electrons act free)."""
    z = Z[element]
    s = np.linspace(0.0, 8.0, 400)
    S = ab.incoherent_function(element, s)
    assert S[0] == 0.0
    assert np.all(np.diff(S) > 0)
    # small x: S ~ x^2 (the leading term of Z - sum |f_jk|^2); S(x = 0.01) is a tiny fraction of Z
    assert ab.incoherent_function(element, np.array([0.02]))[0] < 0.01 * z
    assert ab.incoherent_function(element, np.array([20.0]))[0] == pytest.approx(z, rel=2e-3)
    assert ab.incoherent_function(element, np.array([40.0]))[0] == pytest.approx(z, rel=2e-4)
    # compositions add per atom
    assert ab.incoherent_scattering(s, {element: 2.5}) == pytest.approx(2.5 * S)


def test_compton_wavelength_is_codata():
    lam_c = sc.physical_constants["Compton wavelength"][0] * 1e10  # Å
    assert ab.COMPTON_WAVELENGTH == pytest.approx(lam_c, rel=1e-5)


@pytest.mark.parametrize("wavelength", [0.5, 0.979, 1.54])
def test_breit_dirac_factor_against_compton_shift_and_klein_nishina(wavelength):
    """Recoil factor for photon counting: (lambda/lambda')^2 with the Compton shift of 2-theta from Bragg's law,
    computed from energies (E' = E / (1 + E/mc^2 (1 - cos 2theta))); it is the low-energy limit of the
    Klein-Nishina / Thomson ratio, which it matches to second order in the shift."""
    s = np.linspace(0.05, 1.6 / wavelength, 25)  # |s| = 1/d up to 2 theta ~ 106 deg
    two_theta = 2.0 * np.arcsin(s * wavelength / 2.0)
    energy = sc.h * sc.c / (wavelength * 1e-10)  # J
    mc2 = sc.m_e * sc.c ** 2
    ratio = 1.0 / (1.0 + energy / mc2 * (1.0 - np.cos(two_theta)))  # E'/E = lambda/lambda'
    bd = ab.breit_dirac(s, wavelength)
    np.testing.assert_allclose(bd, ratio ** 2, rtol=2e-6)
    cos2 = np.cos(two_theta) ** 2
    kn = ratio ** 2 * (ratio + 1.0 / ratio - (1.0 - cos2)) / (1.0 + cos2)  # Klein-Nishina / Thomson (unpolarised)
    shift = 1.0 - ratio  # relative energy loss, first order
    assert np.all(np.abs(kn / bd - 1) <= 2.0 * shift ** 2 + 1e-12)  # agreement to second order in the shift
    # the exponent matters: the energy-weighted factor (lambda/lambda')^3 differs at first order
    assert np.max(np.abs(ratio ** 3 / bd - 1)) > 0.5 * np.max(shift) > 0.005
    # and the absolute mode applies it: Compton with a wavelength = table S x recoil
    comp = {"C": 3, "O": 1}
    np.testing.assert_allclose(ab.incoherent_scattering(s, comp, wavelength),
                               ab.incoherent_scattering(s, comp) * ratio ** 2, rtol=2e-6)
