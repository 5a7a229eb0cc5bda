"""`scaler run` and the bus worker (run inline) on a planted observation table."""
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from diffractflow.formats import write_header
from diffractflow.formats.scales import read_scales
from scaler.artifacts import write_observations
from scaler.cli import app


@pytest.fixture()
def obs_file(tmp_path, planted):
    d = planted(n_stills=60, n_per_still=400, n_voxels=600, noise=0.05, seed=21)
    # still ids as in the voxel-merger table: indices into still_names, here offset to check the keys
    p = write_observations(tmp_path / "obs.h5", d["still_id"] + 100, d["voxel_id"] * 7 + 3, d["q_magnitude"],
                           d["intensity"], d["sigma"], still_names=[f"img_{i:03d}" for i in range(160)])
    return p, d


def test_run_writes_scales_statistics_plots(tmp_path, obs_file, rms_rel):
    path, d = obs_file
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", "--observations", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    scales = read_scales(out / "scales.json")
    assert sorted(scales) == [f"img_{i:03d}" for i in range(100, 160)]  # keyed by still id (the table's names)
    b = np.array([scales[f"img_{i + 100:03d}"] for i in range(60)])
    assert rms_rel(b, d["b_true"]) <= 0.006
    stats = json.loads((out / "statistics.json").read_text())
    for key in ("n_iterations", "final_r_factor", "convergence_achieved", "parameter_shifts"):
        assert key in stats
    assert stats["convergence_achieved"] and stats["n_observations"] == 24000
    assert stats["still_names"]["100"] == "img_100"
    for png in ("scales_per_still.png", "r_factor_per_iteration.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # voxel-merger reads these scales back
    from voxel_merger.artifacts import read_scales as merger_read_scales

    assert merger_read_scales(out / "scales.json")["img_100"] == pytest.approx(b[0])


def test_run_with_smoother_and_errors(tmp_path, obs_file):
    path, _ = obs_file
    r = CliRunner().invoke(app, ["run", "--observations", str(path), "--out", str(tmp_path / "o2"), "--smoother",
                                 "--n-control-points", "4", "--no-plots"])
    assert r.exit_code == 0, r.output
    stats = json.loads((tmp_path / "o2" / "statistics.json").read_text())
    assert len(stats["resolution_smoother"]["control_values"]) == 4
    r = CliRunner().invoke(app, ["run", "--observations", str(path), "--out", str(tmp_path / "o3"), "--smoother",
                                 "--n-control-points", "6"])
    assert r.exit_code == 2 and "v1 model parameter limit exceeded" in r.output
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        write_header(f, schema="diffractflow.voxel_merger.observations", version=1, producer="test")
        f["still_id"] = np.zeros(3, dtype=int)
        f["intensity"] = np.ones(3)
    r = CliRunner().invoke(app, ["run", "--observations", str(bad), "--out", str(tmp_path / "o4")])
    assert r.exit_code == 2 and "bad.h5" in r.output and "voxel_id" in r.output
    r = CliRunner().invoke(app, ["run", "--observations", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "o5")])
    assert r.exit_code == 2 and "not found" in r.output


def test_worker_relative_and_bad_input(tmp_path, obs_file):
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import BadInput, run_inline

    from scaler.worker import STAGE

    path, d = obs_file
    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    target = vol / "in" / "obs.h5"
    target.write_bytes(path.read_bytes())
    settings = Settings(volume=vol)
    job = JobRequest(job_id="scale-1", service="scaler", inputs={"observations": ArtifactRef(path="in/obs.h5")},
                     params={"mode": "relative", "max_iterations": 20})
    ctx = run_inline(STAGE, job, settings)
    assert {"scales", "statistics"} <= set(ctx.outputs)
    assert ctx.metrics["convergence_achieved"] and ctx.metrics["n_stills"] == 60
    scales = read_scales(ctx.outputs["scales"])
    assert len(scales) == 60
    # absolute mode without a map input: bad input naming the missing input
    with pytest.raises(BadInput, match="no input named 'map'"):
        run_inline(STAGE, JobRequest(job_id="scale-2", service="scaler",
                                     inputs={"observations": ArtifactRef(path="in/obs.h5")},
                                     params={"mode": "absolute", "cell_volume": 1000.0}), settings)
    # > 5 smoother control points: rejected by the parameter model before any work
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        run_inline(STAGE, JobRequest(job_id="scale-3", service="scaler",
                                     inputs={"observations": ArtifactRef(path="in/obs.h5")},
                                     params={"mode": "relative", "smoother": True, "n_control_points": 6}), settings)
