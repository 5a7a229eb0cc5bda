"""DiffuseScalingModel (seed 003): planted-truth recovery, analytic normal equations, errors, API."""
import numpy as np
import pytest

from scaler import DiffuseScalingModel, DisabledComponentAccess, ParameterLimitExceeded, RefinementFailure
from scaler.core.refine import ObservationSet, ScalingProblem, SmootherSetup, sparse_jacobian
from scaler.core.smoother import GaussianSmoother1D


def _table(d):
    return {k: d[k] for k in ("still_id", "voxel_id", "q_magnitude", "intensity", "sigma")}


def _scales(refined, n):
    return np.array([refined[i]["multiplicative_scale"] for i in range(n)])


def test_planted_per_still_scales_recovered(planted, rms_rel):
    d = planted(n_stills=200, n_per_still=600, noise=0.05, spread=0.2)
    model = DiffuseScalingModel({"per_still_scale": {"enabled": True}}, still_ids=list(range(200)))
    refined, stats = model.refine_parameters(_table(d), None, {"max_iterations": 20})
    b = _scales(refined, 200)
    assert stats["convergence_achieved"]
    assert rms_rel(b, d["b_true"]) <= 0.006
    assert np.mean(b) == pytest.approx(1.0)  # gauge: mean scale 1
    assert stats["final_r_factor"] < 0.05 < stats["r_factor_history"][0]
    assert all(v["additive_offset"] == 0.0 for v in refined.values())


def test_planted_scales_and_resolution_factor(planted, rms_rel):
    """Planted log-normal scales (20 %) and g(q) = exp(-2 q^2) with 5 % noise, 200 x 600: b to <= 0.6 % rms,
    and the smoother recovers the shape of g (identified by the |q| spread inside each voxel)."""
    gfun = lambda q: np.exp(-2.0 * q ** 2)  # noqa: E731
    d = planted(n_stills=200, n_per_still=600, noise=0.05, spread=0.2, resolution_factor=gfun, voxel_q_halfwidth=0.03)
    cfg = {"per_still_scale": {"enabled": True, "initial_values": {}},
           "resolution_smoother": {"enabled": True, "n_control_points": 5, "resolution_range": (0.1, 0.6)},
           "experimental_components": {"panel_scale": {"enabled": False}, "spatial_scale": {"enabled": False},
                                       "additive_offset": {"enabled": False}},
           "partiality_threshold": 0.1}
    model = DiffuseScalingModel(cfg, still_ids=list(range(200)))
    assert model.MAX_FREE_PARAMS == 205 and model.n_free_parameters == 205
    refined, stats = model.refine_parameters(_table(d), None, {"max_iterations": 30, "convergence_tolerance": 1e-7})
    assert stats["convergence_achieved"]
    assert rms_rel(_scales(refined, 200), d["b_true"]) <= 0.006
    qq = np.linspace(0.15, 0.55, 9)
    ratio = model.smoother.scale_at(qq) / gfun(qq)
    ratio /= ratio.mean()
    assert np.max(np.abs(ratio - 1)) < 0.02, ratio
    # per-observation scale = b * g(q)
    b0, off = model.get_scales_for_observation(3, 0.3)
    assert off == 0.0
    assert b0 == pytest.approx(refined[3]["multiplicative_scale"] * float(model.smoother.scale_at(np.array([0.3]))[0]))
    assert set(stats["parameter_shifts"]) >= {"per_still_scale", "resolution_smoother"}


def _small_problem(project_var=False, seed=1):
    rng = np.random.default_rng(seed)
    n, N, G = 400, 7, 30
    s = rng.integers(0, N, n).astype(np.int32)
    g = rng.integers(0, G, n).astype(np.int64)
    q = rng.uniform(0.1, 0.5, n)
    inten = rng.gamma(3, 10, n)
    w = 1 / rng.uniform(1, 3, n) ** 2
    obs = ObservationSet(s, g, q, inten, w, np.arange(N), G)
    sm = SmootherSetup(GaussianSmoother1D((0.1, 0.5), 5), n_q_bins=512)
    return ScalingProblem(obs, sm, chunk=97), rng


def test_normal_equations_equal_sparse_jacobian_products():
    """Chunked bincount accumulation == J^T W J and -J^T W r from the explicit scipy.sparse Jacobian."""
    prob, rng = _small_problem()
    b = rng.uniform(0.7, 1.3, prob.N)
    c = rng.uniform(0.8, 1.2, prob.M)
    gb = prob.g_bins(c)
    ih, var = prob.reference(b, gb)
    ne = prob.normal_equations(b, c, gb, ih, None, True)
    J = sparse_jacobian(prob, b, c, ih).toarray()
    W = prob.obs.weight
    t = b[prob.obs.still_index] * gb[prob.qbin]
    r = prob.obs.intensity - t * ih[prob.obs.group_index]
    JtWJ = J.T @ (W[:, None] * J)
    N = prob.N
    np.testing.assert_allclose(ne["Ass"], np.diag(JtWJ)[:N], rtol=1e-10)
    np.testing.assert_allclose(JtWJ[:N, :N], np.diag(np.diag(JtWJ)[:N]), atol=1e-12)  # arrow structure
    np.testing.assert_allclose(ne["Asc"], JtWJ[:N, N:], rtol=1e-10)
    np.testing.assert_allclose(ne["Acc"], JtWJ[N:, N:], rtol=1e-10)
    np.testing.assert_allclose(np.concatenate([ne["rs"], ne["rc"]]), -(J.T @ (W * r)), rtol=1e-9, atol=1e-9)
    assert ne["f"] == pytest.approx(float(np.sum(W * r * r)))
    # references are the weighted least-squares values: sum_{k in v} w t r = 0
    np.testing.assert_allclose(np.bincount(prob.obs.group_index, W * t * r, minlength=prob.G), 0, atol=1e-8)


def test_projected_smoother_block_matches_explicit_projection():
    """Variable-projection (Kaufman) smoother columns: J_c minus its projection on each group's reference."""
    prob, rng = _small_problem(seed=2)
    b = rng.uniform(0.7, 1.3, prob.N)
    c = rng.uniform(0.8, 1.2, prob.M)
    gb = prob.g_bins(c)
    ih, var = prob.reference(b, gb)
    ne = prob.normal_equations(b, c, gb, ih, var, True)
    J = sparse_jacobian(prob, b, c, ih).toarray()
    o = prob.obs
    W = o.weight
    t = b[o.still_index] * gb[prob.qbin]
    N = prob.N
    Jc = J[:, N:].copy()
    for v in range(prob.G):
        m = o.group_index == v
        if m.any():
            coef = (W[m] * t[m]) @ Jc[m] / np.sum(W[m] * t[m] ** 2)
            Jc[m] -= np.outer(t[m], coef)
    np.testing.assert_allclose(ne["Acc"], Jc.T @ (W[:, None] * Jc), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ne["Asc"], J[:, :N].T @ (W[:, None] * Jc), rtol=1e-9, atol=1e-9)


def test_parameter_limit_errors():
    with pytest.raises(ParameterLimitExceeded) as e:
        DiffuseScalingModel({"resolution_smoother": {"enabled": True, "n_control_points": 6,
                                                     "resolution_range": (0.1, 0.5)}}, still_ids=[1, 2, 3])
    assert str(e.value) == "v1 model parameter limit exceeded"
    # also raised before any still is known
    with pytest.raises(ParameterLimitExceeded, match="^v1 model parameter limit exceeded$"):
        DiffuseScalingModel({"resolution_smoother": {"enabled": True, "n_control_points": 9,
                                                     "resolution_range": (0.1, 0.5)}})
    from scaler import ResolutionSmootherComponent

    with pytest.raises(ParameterLimitExceeded, match="v1 model parameter limit exceeded"):
        ResolutionSmootherComponent(None, 6, (0.1, 0.5))


@pytest.mark.parametrize("name", ["panel_scale", "spatial_scale", "additive_offset"])
def test_disabled_components(name):
    cfg = {"per_still_scale": {"enabled": True},
           "experimental_components": {name: {"enabled": True}}}
    with pytest.raises(DisabledComponentAccess) as e:
        DiffuseScalingModel(cfg, still_ids=[0, 1])
    assert str(e.value) == "Advanced component disabled in v1"
    with pytest.raises(DisabledComponentAccess, match="^Advanced component disabled in v1$"):
        DiffuseScalingModel({name: {"enabled": True}}, still_ids=[0, 1])
    model = DiffuseScalingModel({"per_still_scale": {"enabled": True}}, still_ids=[0, 1])
    with pytest.raises(DisabledComponentAccess, match="Advanced component disabled in v1"):
        getattr(model, name)


def test_refinement_failure_anticorrelated_still(planted):
    d = planted(n_stills=20, n_per_still=300, n_voxels=200, noise=0.05)
    bad = d["still_id"] == 5
    d["intensity"] = np.where(bad, -d["intensity"], d["intensity"])  # still 5 anti-correlated with the reference
    model = DiffuseScalingModel({"per_still_scale": {"enabled": True}}, still_ids=list(range(20)))
    with pytest.raises(RefinementFailure) as e:
        model.refine_parameters(_table(d), None, {"outlier_zmax": None})
    assert str(e.value) == "Parameter refinement failed"
    assert "5" in e.value.detail


def test_refinement_failure_no_data():
    model = DiffuseScalingModel({"per_still_scale": {"enabled": True}}, still_ids=[0])
    empty = {k: np.zeros(0) for k in ("q_magnitude", "intensity", "sigma")}
    empty.update(still_id=np.zeros(0, dtype=int), voxel_id=np.zeros(0, dtype=int))
    with pytest.raises(RefinementFailure, match="^Parameter refinement failed$"):
        model.refine_parameters(empty, None, {})


def test_seed_dict_format_and_dials_parameter_manager(planted):
    d = planted(n_stills=6, n_per_still=80, n_voxels=40, noise=0.02, seed=3)
    binned = {}
    for i in range(len(d["intensity"])):
        binned.setdefault(int(d["voxel_id"][i]), {"observations": []})["observations"].append(
            {"intensity": d["intensity"][i], "sigma": d["sigma"][i], "still_id": int(d["still_id"][i]),
             "q_vector_lab": np.array([d["q_magnitude"][i], 0.0, 0.0])})
    m1 = DiffuseScalingModel({"per_still_scale": {"enabled": True}})  # still ids taken from the data
    r1, s1 = m1.refine_parameters(binned, {}, {"max_iterations": 10})
    m2 = DiffuseScalingModel({"per_still_scale": {"enabled": True, "initial_values": {i: 1.0 for i in range(6)}}})
    r2, s2 = m2.refine_parameters(_table(d), None, {"max_iterations": 10})
    np.testing.assert_allclose(_scales(r1, 6), _scales(r2, 6), rtol=1e-10)
    # DIALS active parameter manager and component hold the refined values
    np.testing.assert_allclose(np.array(m1.active_parameter_manager.get_param_vals()), _scales(r1, 6))
    np.testing.assert_allclose(np.array(m1.per_still.parameters), _scales(r1, 6))
    assert m1.is_scaled and m1.MAX_FREE_PARAMS == 11
    dd = m1.to_dict()
    assert dd["__id__"] == "diffuse_v1" and len(dd["per_still_scale"]["parameters"]) == 6
    for key in ("n_iterations", "final_r_factor", "convergence_achieved", "parameter_shifts"):
        assert key in s1
    with pytest.raises(ValueError):
        m1.get_scales_for_observation(0, -0.1)
    with pytest.raises(ValueError):
        m1.get_scales_for_observation(99, 0.2)
    # component API: scales and unit derivatives
    scales, der = m1.per_still.calculate_scales_and_derivatives({"still_id": np.array([0, 5, 5])})
    assert list(scales) == pytest.approx([r1[0]["multiplicative_scale"], r1[5]["multiplicative_scale"],
                                          r1[5]["multiplicative_scale"]])
    dense = np.array(der.as_dense_matrix()).reshape(3, 6)
    np.testing.assert_array_equal(dense, np.eye(6)[[0, 5, 5]])


def test_generate_references_and_bragg_partiality(planted):
    d = planted(n_stills=30, n_per_still=400, n_voxels=300, noise=0.03, seed=5)
    rng = np.random.default_rng(0)
    # Bragg: 50 reflections, each seen by every still with partiality P; I = b * P * I_full
    hkl = rng.integers(-10, 10, (50, 3))
    i_full = rng.uniform(1e3, 5e3, 50)
    bragg = {}
    for s in range(30):
        part = rng.uniform(0.02, 1.0, 50)
        inten = d["b_true"][s] * part * i_full * (1 + 0.01 * rng.normal(size=50))
        bragg[s] = {"miller_index": hkl, "intensity.sum.value": inten,
                    "intensity.sum.variance": (0.01 * inten) ** 2, "partiality": part, "d": np.full(50, 3.0)}
    model = DiffuseScalingModel({"per_still_scale": {"enabled": True}, "partiality_threshold": 0.1},
                                still_ids=list(range(30)))
    refined, stats = model.refine_parameters(_table(d), bragg, {})
    n_kept = sum(int((b["partiality"] >= 0.1).sum()) for b in bragg.values())
    assert stats["n_bragg"] == n_kept
    bragg_ref, diffuse_ref = model.generate_references(_table(d), bragg)
    # references are on the scale where mean(b) = 1: I_ref_est = I_true * mean(b_true)-like factor k
    vox = sorted(diffuse_ref)
    est = np.array([diffuse_ref[v]["intensity"] for v in vox])
    k = np.exp(np.mean(np.log(est / d["i_ref"][vox])))
    assert np.sqrt(np.mean((est / (k * d["i_ref"][vox]) - 1) ** 2)) < 0.02
    keys = [tuple(int(x) for x in h) for h in hkl]
    best = np.array([bragg_ref[kk]["intensity"] for kk in keys])
    np.testing.assert_allclose(best / (k * i_full), 1.0, rtol=0.02)
    counts = np.array([bragg_ref[kk]["n_observations"] for kk in keys])
    expected = np.sum([b["partiality"] >= 0.1 for b in bragg.values()], axis=0)
    np.testing.assert_array_equal(counts, expected)


def test_gauss_newton_and_outlier_rejection(planted, rms_rel):
    d = planted(n_stills=40, n_per_still=500, n_voxels=400, noise=0.05, seed=11)
    idx = np.random.default_rng(1).choice(d["intensity"].size, 30, replace=False)
    d["intensity"][idx] *= 8.0  # gross outliers (e.g. unmasked Bragg tails)
    m = DiffuseScalingModel({"per_still_scale": {"enabled": True}}, still_ids=list(range(40)))
    refined, stats = m.refine_parameters(_table(d), None, {"minimizer_type": "gauss_newton", "outlier_zmax": 6.0})
    assert stats["n_outliers_rejected"] >= 28
    assert rms_rel(_scales(refined, 40), d["b_true"]) < 0.006
    with pytest.raises(ValueError):
        m.refine_parameters(_table(d), None, {"minimizer_type": "newton"})


def test_smoother_only_model_recovers_resolution_shape(planted):
    """per_still_scale disabled (scales fixed at 1): the smoother alone recovers g(q) = exp(-2 q^2) up to a constant."""
    gfun = lambda q: np.exp(-2.0 * q ** 2)  # noqa: E731
    d = planted(n_stills=20, n_per_still=300, n_voxels=100, spread=0.0, resolution_factor=gfun, voxel_q_halfwidth=0.05)
    m = DiffuseScalingModel({"per_still_scale": {"enabled": False},
                             "resolution_smoother": {"enabled": True, "n_control_points": 3,
                                                     "resolution_range": (0.1, 0.6)}}, still_ids=list(range(20)))
    refined, stats = m.refine_parameters(_table(d), None, {})
    assert stats["convergence_achieved"] and m.n_free_parameters == 3
    assert all(v["multiplicative_scale"] == 1.0 for v in refined.values())
    q = np.linspace(0.15, 0.55, 5)
    r = m.smoother.scale_at(q) / gfun(q)
    assert np.max(np.abs(r / r.mean() - 1)) < 0.02
