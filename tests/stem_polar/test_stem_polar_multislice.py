"""stem-polar on a multislice simulation written by others (abTEM), not on our own forward model (issue 22 item 4).

``data/abtem_domains.npz`` comes from ``data/make_abtem_domains.py`` (read its docstring): abTEM 1.0.11 propagates a
200 kV, 2 mrad nanobeam probe through a 6.2 nm PbTiO3-like perovskite whose in-plane polarisation is +x in the matrix
and -x in a central square domain, on a 24 x 24 scan; the patterns sit on a 72 x 72 detector with the beam 5 px
below and 7 px left of the array centre, with Poisson noise at 4000 electrons per probe position. The deflection
between the domains comes from dynamical scattering in a non-centrosymmetric crystal (the Friedel pairs' intensity
asymmetry), i.e. abTEM's physics. The file also holds abTEM's own centre of mass of the noise-free patterns, the
reference for the deflection's sign and map. Regenerate (about 3 minutes, numpy 2, so its own venv):

    python3 -m venv .bench/abtem-venv && .bench/abtem-venv/bin/pip install abtem==1.0.11 "numpy>=2"
    .bench/abtem-venv/bin/python tests/stem_polar/data/make_abtem_domains.py
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from stem_polar.core.config import PolarConfig
from stem_polar.core.pipeline import run_pipeline
from stem_polar.core.source import ArraySource

DATA = Path(__file__).parent / "data" / "abtem_domains.npz"
SEED_EXAMPLE = {"dpc": {"gate_mode": "adaptive", "baseline": "rowcol"}, "matched_filter": {"softmax_temp": 2.0}}


@pytest.fixture(scope="module")
def sim():
    d = np.load(DATA)
    return {k: d[k] for k in ("counts", "domains", "com_abtem", "beam_center")}


def run(sim, cfg: dict, labels=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_pipeline(ArraySource(sim["counts"]), labels, PolarConfig.model_validate(cfg), chunk=128)


def corr(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_the_simulation_carries_a_domain_deflection(sim):
    """abTEM's own CoM: along +x in the +P matrix, along -x in the -P square, nothing along y."""
    cy, cx = sim["com_abtem"]
    dom = sim["domains"]
    assert cx[dom == 1].mean() > 0.005 > -0.005 > cx[dom == -1].mean()  # mrad
    assert corr(cx, dom) > 0.85 and abs(corr(cy, dom)) < 0.2
    assert sim["counts"].dtype == np.uint16 and 3900 < sim["counts"].sum(axis=(2, 3)).mean() < 4100


@pytest.mark.parametrize("name, cfg, min_com, min_field", [
    ("service defaults (autolabel, adaptive, median)", {}, 0.8, 0.7),
    ("union gate", {"dpc": {"gate_mode": "union"}}, 0.9, 0.8),
    ("two clusters", {"autolabel": {"n_clusters": 2}}, 0.9, 0.8),
])
def test_domains_recovered_against_abtem(sim, name, cfg, min_com, min_field):
    """No labels given (PCA + k-means in the service): the off-centre beam is found to 0.05 px, the CoM map follows
    abTEM's, and E (= -field_scale x CoM) points against the deflection: -x in the matrix, +x in the square."""
    res = run(sim, cfg)
    dom = sim["domains"]
    assert abs(res.center.cy - sim["beam_center"][0]) < 0.05 and abs(res.center.cx - sim["beam_center"][1]) < 0.05
    assert corr(res.com_x_raw, sim["com_abtem"][1]) >= min_com
    assert corr(-res.ex, dom) >= min_field
    assert res.ex[dom == 1].mean() < 0 < res.ex[dom == -1].mean()
    assert abs(corr(res.ey, dom)) < 0.3
    # every computed cluster lies (mostly) in one domain
    for k in np.unique(res.labels):
        inside = dom[res.labels == k]
        assert max(np.mean(inside > 0), np.mean(inside < 0)) >= 0.55, (name, k)


def test_true_domain_labels_give_the_field(sim):
    dom = sim["domains"]
    res = run(sim, {}, labels=(dom < 0).astype(int))
    assert res.cluster_ids == [0, 1]
    assert corr(res.com_x_raw, sim["com_abtem"][1]) >= 0.9
    assert corr(-res.ex, dom) >= 0.8
    assert res.ex[dom == 1].mean() < 0 < res.ex[dom == -1].mean()


def test_seed_example_settings_lose_the_field_and_say_so(sim):
    """The seed's example (adaptive gates, rowcol baseline, softmax 2.0): the row/column baseline removes most of
    the square domain's field, and the quality report's baseline check fails instead of staying silent."""
    dom = sim["domains"]
    seed = run(sim, SEED_EXAMPLE)
    default = run(sim, {})
    assert corr(-seed.ex, dom) < corr(-default.ex, dom) - 0.2
    q = seed.report["quality"]
    assert not q["passed"] and "baseline" in q["failed"]
    assert "baseline" not in default.report["quality"]["failed"]
