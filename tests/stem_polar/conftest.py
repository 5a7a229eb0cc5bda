"""Fixtures for the stem-polar tests; the synthetic scans themselves live in ``stem_polar.synthetic``."""

from __future__ import annotations

import numpy as np
import pytest

from stem_polar.synthetic import DOMAINS, domain_map, make_scan, render, to_detector  # noqa: F401


def corr(a, b):
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="session")
def scan():
    return make_scan()


@pytest.fixture
def mk_scan():
    return make_scan


@pytest.fixture
def corrcoef():
    return corr


@pytest.fixture
def render_frames():
    return render


def assert_same_results(a, b):
    """Two pipeline results (e.g. compiled kernels vs the numpy engine or the generic path) agree at float32
    level: statistics, gates and argmax exactly or within float32 sums, scores and CoM within 1e-4."""
    np.testing.assert_allclose(a.stats.sigma, b.stats.sigma, atol=2e-5)
    np.testing.assert_allclose(a.stats.mu_c, b.stats.mu_c, atol=2e-5)
    np.testing.assert_allclose(a.stats.mu_c_raw, b.stats.mu_c_raw, rtol=1e-6)
    np.testing.assert_array_equal(a.gates, b.gates)
    np.testing.assert_allclose(a.S, b.S, atol=1e-4 * np.abs(b.S).max())
    np.testing.assert_array_equal(a.argmax, b.argmax)
    np.testing.assert_allclose(a.com_x_raw, b.com_x_raw, atol=1e-4)
    np.testing.assert_allclose(a.com_y_raw, b.com_y_raw, atol=1e-4)


@pytest.fixture
def same_results():
    return assert_same_results
