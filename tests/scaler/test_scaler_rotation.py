"""Per-frame scales of rotation sweeps tied by a smoothness restraint along phi (issue 17); stills stay free.

Ground truth is planted: smooth (or stepped) per-frame scales b(phi), a few noisy observations per frame and
voxel, so the free per-frame scales are noisy and the restraint has something to do.
"""
import json

import numpy as np
import pytest

from diffractflow.formats.scales import read_scales
from scaler import DiffuseScalingModel, SmootherNotIdentifiable
from scaler.core.refine import RotationRestraint
from scaler.pipeline import build_config

N_FRAMES = 120


def rotation_data(n_frames=N_FRAMES, n_stills=0, n_per=150, n_vox=1500, noise=0.3, step=None, trend_only=False,
                  seed=1, q_halfwidth=0.02):
    """Frames 0..n_frames-1 of one sweep (smooth b(phi), optionally a step x step[1] from frame step[0]) and
    ``n_stills`` stills with log-normal scales after them; I = b I_v (1 + noise N(0,1)), sigma = noise b I_v."""
    rng = np.random.default_rng(seed)
    n = n_frames + n_stills
    still = np.repeat(np.arange(n), n_per)
    vox = rng.integers(0, n_vox, still.size)
    vq = rng.uniform(0.15, 0.55, n_vox)
    q = vq[vox] + rng.uniform(-q_halfwidth, q_halfwidth, still.size)
    i_ref = rng.gamma(2.0, 50.0, n_vox) + 10.0
    phi = np.arange(n_frames, dtype=float)
    if trend_only:
        b = np.exp(0.004 * phi)
    else:
        b = np.exp(0.25 * np.sin(2 * np.pi * phi / 80.0) + 0.1 * np.cos(2 * np.pi * phi / 37.0))
    if step is not None:
        b = b * np.where(phi >= step[0], step[1], 1.0)
    b = np.concatenate([b, np.exp(rng.normal(0.0, 0.2, n_stills))])
    model = b[still] * i_ref[vox]
    sigma = noise * model
    table = {"still_id": still, "voxel_id": vox, "q_magnitude": q, "intensity": model + rng.normal(size=model.size) * sigma,
             "sigma": sigma}
    return table, b


def fit(table, weight=None, frames=N_FRAMES, cfg=None):
    cfg = dict(cfg or {})
    if weight is not None:
        cfg["rotation_restraint"] = {"sequences": {"sweep_1": list(range(frames))}, "weight": weight}
    model = DiffuseScalingModel(cfg)
    refined, stats = model.refine_parameters(table)
    return np.array([refined[k]["multiplicative_scale"] for k in sorted(refined)]), stats


def rel_errors(b, b_true):
    """b/b_true - 1 after fixing the overall scale (geometric mean of the ratio = 1)."""
    r = b / b_true
    return r / np.exp(np.mean(np.log(r))) - 1.0


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def test_second_difference_operator_is_exact_for_quadratics():
    """Divided differences on uneven positions (a frame missing from the data): exactly 2 for x^2, 0 for lines."""
    pos = np.array([0.0, 1.0, 3.0, 4.0, 5.5, 7.0])
    idx = np.array([4, 0, 1, 5, 2, 3])  # parameter order differs from rotation order
    D, owner = RotationRestraint({"s": (idx, pos)}).operator(6)
    u = np.zeros(6)
    u[idx] = pos ** 2
    np.testing.assert_allclose(D @ u, 2.0, rtol=1e-12)
    u[idx] = 3.0 - 0.7 * pos
    np.testing.assert_allclose(D @ u, 0.0, atol=1e-12)
    assert D.shape == (4, 6) and owner.tolist() == [0, 0, 0, 0]


def test_smooth_scales_recovered_better_with_the_restraint():
    table, b_true = rotation_data()
    b_free, _ = fit(table)
    b_rot, stats = fit(table, weight=1.0)  # the default weight
    e_free = rms(rel_errors(b_free, b_true))
    e_rot = rms(rel_errors(b_rot, b_true))
    # free per-frame scales: ~2 % noise; restrained: about half of it (measured 0.022 -> 0.011)
    assert 0.015 < e_free < 0.03
    assert e_rot < 0.65 * e_free
    rep = stats["rotation_restraint"]["sequences"]["sweep_1"]
    assert rep["restrained"] and rep["n_frames_in_data"] == N_FRAMES and rep["lambda"] > 0
    # a stronger restraint smooths more; an extreme one flattens the real oscillation and gets worse again
    b_10, _ = fit(table, weight=10.0)
    b_big, _ = fit(table, weight=1e5)
    assert rms(rel_errors(b_10, b_true)) < e_rot
    assert rms(rel_errors(b_big, b_true)) > e_free


def test_weight_zero_is_the_free_fit_and_stills_stay_free():
    table, b_true = rotation_data(n_frames=60, n_stills=40, seed=3)
    b_free, _ = fit(table)
    b_zero, _ = fit(table, weight=0.0, frames=60)
    np.testing.assert_allclose(b_zero, b_free, rtol=1e-9)
    b_rot, _ = fit(table, weight=10.0, frames=60)
    e_free, e_rot = rel_errors(b_free, b_true), rel_errors(b_rot, b_true)
    assert rms(e_rot[:60]) < 0.7 * rms(e_free[:60])
    # the stills' scales are not restrained: their errors stay those of the free fit (only the shared references
    # change a little), unlike the frames'
    assert rms(e_rot[60:]) == pytest.approx(rms(e_free[60:]), rel=0.1)
    assert rms(b_rot[60:] / b_free[60:] - 1) < 0.3 * rms(b_rot[:60] / b_free[:60] - 1)


def test_step_change_kept_with_a_small_weight():
    """A 30 % jump between frames 59 and 60 (beam refill, attenuator): kept at weight 0.01, smeared at 1e4."""
    table, b_true = rotation_data(step=(60, 1.3), seed=5)
    jump = lambda b: float(np.mean(b[60:63]) / np.mean(b[57:60]))  # noqa: E731
    truth = jump(b_true)
    b_free, _ = fit(table)
    b_small, _ = fit(table, weight=0.01)
    b_big, _ = fit(table, weight=1e4)
    assert jump(b_free) == pytest.approx(truth, rel=0.03)
    assert jump(b_small) == pytest.approx(truth, rel=0.03)
    assert abs(jump(b_big) - truth) > 0.08  # the strong restraint rounds the step off
    # frame by frame around the step the small-weight fit is as good as the free one
    e_small = rel_errors(b_small, b_true)[55:65]
    e_free = rel_errors(b_free, b_true)[55:65]
    assert rms(e_small) < 1.1 * rms(e_free)


def test_exponential_trend_is_not_biased():
    """The restraint is on second differences of ln b: an exponential drift along phi (decay) costs nothing, so a
    very strong restraint recovers it almost exactly (better than the free fit)."""
    table, b_true = rotation_data(trend_only=True, seed=11)
    b_free, _ = fit(table)
    b_rot, stats = fit(table, weight=1e6)
    assert rms(rel_errors(b_rot, b_true)) < 0.2 * rms(rel_errors(b_free, b_true))
    assert stats["rotation_restraint"]["sequences"]["sweep_1"]["rms_second_difference_ln_b"] < 1e-4


def test_frame_without_data_and_bad_sequences():
    table, b_true = rotation_data(n_frames=30, n_per=120, seed=2)
    keep = table["still_id"] != 12  # frame 12 lost (e.g. not integrated): a gap in the sweep
    t2 = {k: v[keep] for k, v in table.items()}
    cfg = {"rotation_restraint": {"sequences": {"s": list(range(30))}, "weight": 1.0}}
    model = DiffuseScalingModel(cfg)
    _, stats = model.refine_parameters(t2)
    rep = stats["rotation_restraint"]["sequences"]["s"]
    assert rep["n_frames_in_data"] == 29 and rep["frames_without_data"] == [12]
    with pytest.raises(ValueError, match="listed in rotation sequences"):
        DiffuseScalingModel({"rotation_restraint": {"sequences": {"a": [0, 1, 2], "b": [2, 3, 4]}}}).refine_parameters(t2)
    with pytest.raises(ValueError, match=">= 0"):
        DiffuseScalingModel({"rotation_restraint": {"sequences": {"a": [0, 1, 2]}, "weight": -1}}).refine_parameters(t2)


def test_identifiability_guard_still_refuses_the_smoother():
    """Rotation restraint on, smoother asked for on data that cannot identify it (each voxel at one |q|): refused."""
    table, _ = rotation_data(n_frames=40, n_per=200, n_vox=600, q_halfwidth=0.0, seed=4)
    cfg = build_config(smoother=True, n_control_points=4, q_range=(0.1, 0.6))
    cfg["rotation_restraint"] = {"sequences": {"s": list(range(40))}, "weight": 1.0}
    with pytest.raises(SmootherNotIdentifiable):
        DiffuseScalingModel(cfg).refine_parameters(table)


def test_pipeline_and_worker_match_sequences_by_still_name(tmp_path):
    """The bus/CLI path: sequences keyed by the table's still_names ('<file>#<index>'), unknown keys reported."""
    from typer.testing import CliRunner

    from scaler.artifacts import write_observations
    from scaler.cli import app
    from scaler.pipeline import run_relative
    from scaler.worker import Params  # the bus worker's model: mode relative when not given

    n_frames, n_stills = 40, 10
    table, b_true = rotation_data(n_frames=n_frames, n_stills=n_stills, n_per=150, seed=6)
    names = [f"sweep_{i + 1:04d}.cbf#0" for i in range(n_frames)] + [f"still_{i}.cbf#0" for i in range(n_stills)]
    # table order is not rotation order: shuffle the integer ids against the names
    perm = np.random.default_rng(0).permutation(n_frames + n_stills)
    obs = tmp_path / "observations.h5"
    write_observations(obs, perm[table["still_id"]].astype(np.int32), table["voxel_id"], table["q_magnitude"],
                       table["intensity"], table["sigma"], still_names=[names[j] for j in np.argsort(perm)])
    sweep = names[:n_frames] + ["sweep_0041.cbf#0"]  # the last frame never reached the table
    p = Params.model_validate({"sequences": {"sweep_1": sweep}}).root
    assert p.rotation_smoothness == 1.0
    paths, stats = run_relative(obs, tmp_path / "out", sequences=p.sequences, rotation_smoothness=10.0, plots=False)
    rep = stats["rotation_restraint"]["sequences"]["sweep_1"]
    assert rep["n_frames_in_data"] == n_frames and rep["keys_not_in_table"] == ["sweep_0041.cbf#0"]
    scales = read_scales(paths["scales"])
    assert set(scales) == set(names)  # keyed by still id
    b = np.array([scales[n] for n in names])
    _, free = run_relative(obs, tmp_path / "free", plots=False)
    b_free = np.array([read_scales(tmp_path / "free" / "scales.json")[n] for n in names])
    assert rms(rel_errors(b[:n_frames], b_true[:n_frames])) < 0.7 * rms(rel_errors(b_free[:n_frames], b_true[:n_frames]))
    # CLI: --sequences FILE.json
    seq = tmp_path / "seq.json"
    seq.write_text(json.dumps({"sweep_1": sweep}))
    r = CliRunner().invoke(app, ["run", "-i", str(obs), "-o", str(tmp_path / "cli"), "--sequences", str(seq),
                                 "--rotation-smoothness", "10", "--no-plots"])
    assert r.exit_code == 0, r.output
    st = json.loads((tmp_path / "cli" / "statistics.json").read_text())
    assert st["rotation_restraint"]["weight"] == 10.0
    r = CliRunner().invoke(app, ["run", "-i", str(obs), "-o", str(tmp_path / "cli"), "--sequences", str(obs)])
    assert r.exit_code == 2 and "rotation sequences" in r.output
