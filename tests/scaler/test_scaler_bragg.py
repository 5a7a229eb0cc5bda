"""Bragg references (seed 003), xraylib Compton, smoother default off + identifiability guard."""
import numpy as np
import pytest
from cctbx import crystal, miller
from cctbx.array_family import flex as cflex

from scaler import DiffuseScalingModel, SmootherNotIdentifiable
from scaler.core import absolute as ab
from scaler.core import bragg
from scaler.core.refine import ObservationSet
from scaler.pipeline import append_bragg, build_config


def _rotation(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def _still_reflections(rng, cell=40.0, wavelength=1.0, sigma_eps=4e-4, window=3.0, d_min=2.0):
    """Reflections of a random orientation of a cubic P1 cell within +-window*sigma_eps of the sphere."""
    A = _rotation(rng) / cell
    s0 = np.array([0.0, 0.0, -1.0 / wavelength])
    m = int(cell / d_min) + 1
    hkl = np.array(np.meshgrid(*[np.arange(-m, m + 1)] * 3, indexing="ij")).reshape(3, -1).T
    hkl = hkl[np.any(hkl != 0, axis=1)]
    eps, s = bragg.excitation_error(A, s0, hkl)
    keep = (np.abs(eps) < window * sigma_eps) & (s < 1 / d_min)
    return hkl[keep], eps[keep], s[keep]


def test_excitation_error_is_ewald_distance():
    """eps = 0 exactly for a lattice point placed on the sphere; |s| = 1/d from cctbx."""
    rng = np.random.default_rng(0)
    A = _rotation(rng) / 30.0
    h = np.array([[2, -1, 3]])
    q = A @ h[0]
    # choose s0 (length 1/lambda) so that |s0 + q| = |s0|: s0 = -q/2 + a perpendicular part
    perp = np.cross(q, [1.0, 0.2, 0.1])
    perp /= np.linalg.norm(perp)
    lam = 1.1
    s0 = -q / 2 + perp * np.sqrt((1 / lam) ** 2 - np.dot(q, q) / 4)
    eps, s = bragg.excitation_error(A, s0, h)
    assert eps[0] == pytest.approx(0.0, abs=1e-12)
    uc = crystal.symmetry(unit_cell=(30, 30, 30, 90, 90, 90), space_group_symbol="P1").unit_cell()
    assert s[0] == pytest.approx(1 / uc.d((2, -1, 3)), rel=1e-9)


def test_rocking_curve_width_recovered_from_planted_partials():
    """Intensities rendered with a Gaussian rocking curve (sigma_eps = 4e-4 1/Å) and Wilson-like full intensities
    falling with resolution: the shell-normalised method of moments finds sigma_eps within 10 %."""
    rng = np.random.default_rng(1)
    got = []
    for k in range(4):
        hkl, eps, s = _still_reflections(rng)
        full = rng.exponential(1.0, len(s)) * 1e4 * np.exp(-15 * s ** 2)
        inten = rng.poisson(full * bragg.gaussian_partiality(eps, 4e-4)).astype(float)
        got.append(bragg.fit_rlp_sigma(eps, inten, s))
    assert all(g is not None for g in got)
    assert np.median(got) == pytest.approx(4e-4, rel=0.10)
    # no fall-off inside the window (rocking curve much wider than the predictions): not determined
    hkl, eps, s = _still_reflections(rng, window=0.3)
    inten = rng.exponential(1.0, len(s)) * 1e4 * np.exp(-15 * s ** 2)
    assert bragg.fit_rlp_sigma(eps, inten, s) is None


def test_scales_from_diffuse_and_bragg_with_partiality_threshold():
    """Planted per-still scales; sparse noisy diffuse + Bragg partials with known partialities. Partials below
    P_min are rendered with a wrong (model-failure) intensity: excluded, the scales come out right; let in,
    they bias the scales."""
    rng = np.random.default_rng(3)
    n_stills, n_vox = 40, 300
    b_true = np.exp(rng.normal(0, 0.25, n_stills))
    # diffuse: 30 observations per still, 30 % noise
    st = np.repeat(np.arange(n_stills), 30)
    vx = rng.integers(0, n_vox, st.size)
    iref = rng.gamma(2.0, 20.0, n_vox) + 5
    model_d = b_true[st] * iref[vx]
    dif = {"still_id": st, "voxel_id": vx, "q_magnitude": rng.uniform(0.1, 0.5, st.size),
           "intensity": model_d * (1 + 0.3 * rng.normal(size=st.size)), "sigma": 0.3 * model_d}
    # Bragg: 200 reflections, each still sees 60 of them with random partialities
    n_ref = 200
    hkl_ref = np.stack([rng.integers(-20, 21, n_ref), rng.integers(-20, 21, n_ref), rng.integers(1, 30, n_ref)], 1)
    F2 = rng.exponential(1000.0, n_ref) + 50
    rows = {k: [] for k in ("still_id", "miller_index_asu", "q_magnitude", "intensity", "sigma", "partiality")}
    for s_ in range(n_stills):
        r = rng.choice(n_ref, 60, replace=False)
        P = rng.uniform(0.02, 1.0, 60)
        true_partial = b_true[s_] * F2[r] * P
        sig = 0.02 * true_partial + 1.0
        observed = true_partial + sig * rng.normal(size=60)
        low = P < 0.3
        observed[low] *= 2.5  # the partiality model fails far from the sphere
        rows["still_id"] += [s_] * 60
        rows["miller_index_asu"].append(hkl_ref[r])
        rows["q_magnitude"].append(rng.uniform(0.1, 0.5, 60))
        rows["intensity"].append(observed)
        rows["sigma"].append(sig)
        rows["partiality"].append(P)
    br = {k: (np.array(v) if k == "still_id" else np.concatenate(v)) for k, v in rows.items()}
    n_low = int((br["partiality"] < 0.3).sum())

    def run(threshold):
        obs = ObservationSet(dif["still_id"].astype(np.int32), dif["voxel_id"], None, dif["intensity"],
                             1 / dif["sigma"] ** 2, np.arange(n_stills), n_vox, None, n_vox)
        obs, info = append_bragg(obs, br, threshold)
        model = DiffuseScalingModel(build_config(partiality_threshold=threshold), still_ids=list(range(n_stills)))
        refined, stats = model.refine_observation_set(obs, {"outlier_zmax": None})
        b = np.array([refined[i]["multiplicative_scale"] for i in range(n_stills)])
        r = b / b_true
        return np.sqrt(np.mean((r / np.exp(np.mean(np.log(r))) - 1) ** 2)), info

    err, info = run(0.3)
    assert info["n_bragg_below_partiality_threshold"] == n_low
    assert info["n_bragg"] == len(br["partiality"]) - n_low
    assert err < 0.01, err
    err_all, _ = run(0.0)
    assert err_all > 3 * err
    # diffuse alone (30 obs/still at 30 % noise) is much worse: the Bragg references carry the scales
    obs = ObservationSet(dif["still_id"].astype(np.int32), dif["voxel_id"], None, dif["intensity"],
                         1 / dif["sigma"] ** 2, np.arange(n_stills), n_vox, None, n_vox)
    refined, _ = DiffuseScalingModel(build_config(), still_ids=list(range(n_stills))).refine_observation_set(
        obs, {"outlier_zmax": None})
    b = np.array([refined[i]["multiplicative_scale"] for i in range(n_stills)])
    r = b / b_true
    assert np.sqrt(np.mean((r / np.exp(np.mean(np.log(r))) - 1) ** 2)) > 2 * err


def test_asu_mapping_matches_cctbx():
    hkl = np.array([[1, 2, 3], [-2, 1, 3], [2, -1, -3], [3, 2, 1]])
    out = bragg._asu(hkl, (57.8, 57.8, 150.0, 90, 90, 90), bragg._space_group("P41212"))
    sym = crystal.symmetry(unit_cell=(57.8, 57.8, 150.0, 90, 90, 90), space_group_symbol="P 41 21 2")
    ref = miller.set(sym, cflex.miller_index([tuple(map(int, h)) for h in hkl]), False).map_to_asu().indices()
    assert [tuple(h) for h in out] == list(ref)
    assert tuple(out[0]) == tuple(out[1]) == tuple(out[2])  # symmetry equivalents (and Friedel mate) merge


# ----------------------------------------------------------------------------- Compton (xraylib)
A0 = 0.529177  # Bohr radius, Å


@pytest.mark.parametrize("x", [0.05, 0.1, 0.2, 0.3, 0.5, 1.0])
def test_compton_hydrogen_equals_pirenne(x):
    """Z = 1: Hubbell et al. (1975) tabulate Pirenne's closed form S = 1 - f^2, f = (1 + (2 pi a0 x)^2)^-2."""
    f = (1 + (2 * np.pi * A0 * x) ** 2) ** -2
    assert ab.incoherent_function("H", np.array([2 * x]))[0] == pytest.approx(1 - f * f, rel=2e-4)


@pytest.mark.parametrize("el,z", [("C", 6), ("N", 7), ("O", 8), ("S", 16)])
def test_compton_second_row_limits_and_bound(el, z):
    """C, N, O, S: S(0) = 0, S -> Z at large x, and S <= Z - f0^2/Z at every x (Waller-Hartree with exchange:
    S = Z - sum_j |f_j|^2 - exchange >= 0 and sum_j |f_j|^2 >= (sum_j f_j)^2 / Z by Cauchy-Schwarz), with f0
    from cctbx's independent Waasmaier-Kirfel fit."""
    s = np.linspace(0.02, 3.0, 150)
    S = ab.incoherent_function(el, s)
    assert ab.incoherent_function(el, np.array([0.0]))[0] == 0.0
    assert np.all(np.diff(S) > 0)
    assert ab.incoherent_function(el, np.array([8.0]))[0] == pytest.approx(z, rel=0.02)
    assert np.all(S <= ab.waller_hartree_approx(s, el) + 0.02 * z)
    # composition sum and Breit-Dirac
    assert ab.incoherent_scattering(s, {el: 3}) == pytest.approx(3 * S)
    assert np.all(ab.incoherent_scattering(s, {el: 1}, wavelength=1.0) < S)


# ----------------------------------------------------------------------------- smoother
def test_smoother_default_off():
    from scaler.worker import Params

    assert Params.model_validate({}).root.smoother is False
    assert build_config()["resolution_smoother"] == {"enabled": False}
    assert DiffuseScalingModel(build_config(), still_ids=[0, 1]).smoother is None


def test_smoother_identifiability_guard(planted):
    """Every voxel at one |q| (no spread inside voxels): g(|q|) is absorbed by the references -> refused with the
    metric; a 0.03 1/Å spread inside voxels identifies it (metric well above the threshold)."""
    cfg = build_config(smoother=True, n_control_points=4, q_range=(0.1, 0.6))
    d = planted(n_stills=60, n_per_still=300, n_voxels=800, voxel_q_halfwidth=0.0,
                resolution_factor=lambda q: np.exp(-2 * q ** 2))
    table = {k: d[k] for k in ("still_id", "voxel_id", "q_magnitude", "intensity", "sigma")}
    with pytest.raises(SmootherNotIdentifiable) as exc:
        DiffuseScalingModel(cfg, still_ids=list(range(60))).refine_parameters(table)
    assert "relative information" in exc.value.detail
    d = planted(n_stills=60, n_per_still=300, n_voxels=800, voxel_q_halfwidth=0.03,
                resolution_factor=lambda q: np.exp(-2 * q ** 2))
    table = {k: d[k] for k in ("still_id", "voxel_id", "q_magnitude", "intensity", "sigma")}
    _, stats = DiffuseScalingModel(cfg, still_ids=list(range(60))).refine_parameters(table)
    ident = stats["resolution_smoother"]["identifiability"]
    assert ident["relative_information"] > 5 * ident["min_information"]
