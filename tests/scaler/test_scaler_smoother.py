"""The numpy Gaussian smoother reproduces DIALS' C++ GaussianSmoother exactly."""
import numpy as np
import pytest
from dials_refinement_helpers_ext import GaussianSmoother
from scitbx.array_family import flex

from scaler.core.smoother import GaussianSmoother1D, nparam_to_num_intervals


@pytest.mark.parametrize("n_params", [2, 3, 5, 6])
def test_smoother_matches_dials(n_params):
    rng = np.random.default_rng(n_params)
    x_range = (0.05, 0.72)
    ours = GaussianSmoother1D(x_range, n_params)
    ref = GaussianSmoother(x_range, nparam_to_num_intervals(n_params))
    assert ref.num_values() == n_params
    np.testing.assert_allclose(list(ref.positions()), ours.positions)
    assert ref.sigma() == pytest.approx(ours.sigma)
    x = np.concatenate([rng.uniform(*x_range, 500), np.linspace(*x_range, 101)])
    vals = rng.uniform(0.5, 1.5, n_params)
    res = ref.multi_value_weight(flex.double(x), flex.double(vals))
    dials_value = np.array(res.get_value())
    dials_w = np.array(res.get_weight().as_dense_matrix()).reshape(len(x), n_params)
    dials_sumw = np.array(res.get_sumweight())
    np.testing.assert_allclose(ours.value(x, vals), dials_value, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ours.dense_derivatives(x), dials_w / dials_sumw[:, None], rtol=1e-12, atol=1e-14)


def test_smoother_four_points_extension():
    """DIALS has no 4-value layout; ours uses the offset layout: partition of unity, exact on constants,
    smooth interpolation between control points."""
    s = GaussianSmoother1D((0.0, 1.0), 4)
    np.testing.assert_allclose(s.positions, [-0.5, 0.5, 1.5, 2.5])
    x = np.linspace(0, 1, 201)
    np.testing.assert_allclose(s.value(x, np.full(4, 2.5)), 2.5)
    np.testing.assert_allclose(s.dense_derivatives(x).sum(axis=1), 1.0)
    lin = s.value(x, 1.0 + 0.2 * s.control_q())
    assert np.all(np.diff(lin) > 0)  # monotone control values give a monotone curve
    assert np.max(np.abs(lin - (1.0 + 0.2 * x))) < 0.01


def test_smoother_unity_and_bad_input():
    s = GaussianSmoother1D((0.0, 1.0), 5)
    np.testing.assert_allclose(s.value(np.linspace(0, 1, 50), np.ones(5)), 1.0)
    with pytest.raises(ValueError):
        GaussianSmoother1D((1.0, 0.5), 3)
    with pytest.raises(ValueError):
        GaussianSmoother1D((0.0, 1.0), 1)
