"""The interpolated radial functions of ``static_pixels`` against their exact evaluation: the error bound of the
tables, and the stored (float32) geometry and multipliers of real and tilted detectors, per pixel."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from diffuse_extractor import ExtractionParams, synthetic
from diffuse_extractor.core import corrections as corr
from diffuse_extractor.core import extract as ex
from diffuse_extractor.core import geometry as geo
from diffuse_extractor.core import kernels

COLS = ("u", "polarisation", "efficiency", "solid_angle", "air", "correction", "lorentz", "radial_bin")


def _copy(pixels):
    return [{c: np.array(getattr(pp, c)) for c in COLS} for pp in pixels]


def _assert_within_one_float32_rounding(tab, exact, max_fraction=1e-5):
    """Every value equal, or one float32 step apart; and those few (rounding flips) rare."""
    for a, b in zip(tab, exact):
        for c in COLS:
            x, y = a[c], b[c]
            assert x.shape == y.shape and x.dtype == y.dtype, c
            if c == "radial_bin":
                assert np.abs(x.astype(int) - y.astype(int)).max() <= 1, c
                assert np.count_nonzero(x != y) <= max_fraction * x.size + 1, c
                continue
            steps = np.abs(x.view(np.int32).astype(np.int64) - y.view(np.int32).astype(np.int64))
            assert steps.max() <= 1, (c, steps.max())
            assert np.count_nonzero(steps) <= max_fraction * x.size + 1, (c, np.count_nonzero(steps))


def _pilatus_functions(det, beam, params):
    p = det[0]
    frame = geo.PanelFrame(p, 0)
    wl = beam.get_wavelength()
    mu_air = corr.air_attenuation_coefficient(wl, params.air_density_g_cm3) * params.air_path_fraction
    return frame, functools.partial(
        ex.radial_functions, d0=frame.d0, parallax=frame.parallax, eff_known=True, mu_s=p.get_mu(),
        t_s=p.get_thickness(), sa_k=corr.reference_solid_angle(det) / (frame.pixel_area * frame.d0), mu_air=mu_air)


def test_radial_table_error_bound_between_nodes(thaumatin_cbfs):
    """The local cubics stay within 1e-13 relative of the exact functions anywhere in the range (not only at the
    midpoints the construction checks), for the PILATUS 6M at its distance and much closer (steeper functions)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    e = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[0])])[0]
    params = ExtractionParams()
    rng = np.random.default_rng(1)
    for dz in (0.0, 0.8):  # as read, and the detector moved to 20 % of its distance
        det = e.detector
        if dz:
            from dxtbx.model.detector import DetectorFactory

            det = DetectorFactory.from_dict(e.detector.to_dict())
            o = det[0].get_origin()
            det[0].set_frame(det[0].get_fast_axis(), det[0].get_slow_axis(), (o[0], o[1], o[2] * (1 - dz)))
        frame, fn = _pilatus_functions(det, e.beam, params)
        nx, ny = det[0].get_image_size()
        psx, psy = det[0].get_pixel_size()
        a = (np.arange(nx) + 0.5) * psx + float(np.dot(frame.o, frame.f))
        b = (np.arange(ny) + 0.5) * psy + float(np.dot(frame.o, frame.s))
        lo, hi = float((b * b).min() + (a * a).min()) + frame.d0 ** 2, float((b * b).max() + (a * a).max()) + frame.d0 ** 2
        coef, s_lo, inv_h = ex.radial_table(lo, hi, fn)
        s = np.concatenate([rng.uniform(lo, hi, 200_000), [lo, hi]])
        t = (s - s_lo) * inv_h
        i = np.minimum(t.astype(np.intp), coef.shape[0] - 1)
        w = t - i
        c = coef[i].reshape(-1, 5, 4)
        approx = c[..., 0] + w[:, None] * (c[..., 1] + w[:, None] * (c[..., 2] + w[:, None] * c[..., 3]))
        exact = fn(s).T
        rel = np.abs(approx - exact) / np.abs(exact)
        assert rel.max() < 1e-13, rel.max(axis=0)
        assert np.ptp(exact[:, 3]) > 0.1  # the solid-angle factor does vary over the range


def test_radial_table_refuses_what_it_cannot_interpolate():
    smooth = lambda s: np.stack([1.0 / np.sqrt(s)])  # noqa: E731
    kink = lambda s: np.stack([1.0 + np.abs(s - 2.5)])  # noqa: E731  (a corner: no cubic gets 2e-14)
    assert ex.radial_table(1.0, 4.0, smooth) is not None
    assert ex.radial_table(1.0, 4.0, kink) is None
    assert ex.radial_table(0.0, 4.0, smooth) is None  # a node at s <= 0 (a panel through the sample's plane)
    assert ex.radial_table(1e-6, 4.0, smooth) is None


def test_static_pixels_tables_equal_the_exact_path_on_a_pilatus_6m(thaumatin_cbfs):
    """6.2 Mpixel with parallax: u, the four multipliers, their product and the |q| shells as the exact
    per-pixel evaluation gives them, to one float32 rounding in at most 1e-5 of the values."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    e = ExperimentListFactory.from_filenames([str(thaumatin_cbfs[0])])[0]
    params = ExtractionParams()
    exact = _copy(ex.static_pixels(e.detector, e.beam, params, radial_tables=False))
    tab = _copy(ex.static_pixels(e.detector, e.beam, params))
    _assert_within_one_float32_rounding(tab, exact)


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("rotation", [False, True])
def test_static_pixels_tables_tilted_panels_and_lorentz(monkeypatch, engine, rotation):
    """A tilted and an untilted panel with parallax, optionally rotation data (Lorentz factor): both engines
    within one float32 rounding of the exact path, and the two engines bit-identical."""
    if engine == "numba" and not kernels.available():
        pytest.skip("numba is not importable here")
    det = synthetic.make_detector(parallax=True, tilt_deg=25.0)
    beam = synthetic._beam(1.0, 0.9)
    params = ExtractionParams(air_path_fraction=0.7)
    gonio = None
    if rotation:
        from dxtbx.model import GoniometerFactory

        gonio = GoniometerFactory.known_axis((0.3, 0.9, 0.1))
    monkeypatch.setenv(kernels.ENV, engine)
    exact = _copy(ex.static_pixels(det, beam, params, gonio, radial_tables=False))
    tab = _copy(ex.static_pixels(det, beam, params, gonio))
    assert all(geo.PanelFrame(p).flat_orthonormal for p in det)
    if rotation:
        assert np.ptp(tab[0]["lorentz"]) > 0.01
    _assert_within_one_float32_rounding(tab, exact)
    monkeypatch.setenv(kernels.ENV, "numba" if engine == "numpy" else "numpy")
    other = _copy(ex.static_pixels(det, beam, params, gonio))
    for a, b in zip(tab, other):
        for c in COLS:
            np.testing.assert_array_equal(a[c], b[c], err_msg=c)
