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
