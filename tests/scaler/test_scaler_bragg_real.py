"""Bragg references from a real stills-processor output (thaumatin still, DIALS 3.12) through the worker."""
import bz2
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from diffractflow.formats.scales import read_scales

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
STILL = SHARED / "data" / "thaumatin_grid" / "thau_3_2_0001.cbf.bz2"


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    """One thaumatin still through `stills-processor run` (about 6 s)."""
    from typer.testing import CliRunner

    from stills_processor.cli import app

    d = tmp_path_factory.mktemp("thau")
    img = d / "thau_3_2_0001.cbf"
    img.write_bytes(bz2.decompress(STILL.read_bytes()))
    out = d / "sp"
    r = CliRunner().invoke(app, ["run", str(img), "--out", str(out), "--space-group", "P41212", "--unit-cell",
                                 "57.8,57.8,150,90,90,90", "--nproc", "1", "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (out / "thau_3_2_0001.refl").is_file()
    return out


def test_dials_stills_partiality_is_uninformative_and_names_match_the_merger(processed):
    from dials.array_family import flex

    from scaler.core import bragg

    t = flex.reflection_table.from_file(str(processed / "thau_3_2_0001.refl"))
    assert "partiality" in t and set(t["partiality"].as_numpy_array().tolist()) == {1.0}
    tab = bragg.read_still_reflections(processed / "thau_3_2_0001.refl")
    assert set(tab.still_name) == {"thau_3_2_0001.cbf#0"}  # voxel-merger's <image file name>#<image index>
    info = tab.per_still["thau_3_2_0001.cbf#0"]
    assert info["source"].startswith("window") and 1e-4 < info["sigma_eps"] < 2e-3
    assert len(tab) > 300 and np.all(tab.hkl[:, 2] >= 0) and np.all(np.isfinite(tab.intensity))


def test_worker_recovers_planted_scale_from_bragg_alone(processed, tmp_path):
    """The same still twice (the copy's image renamed, its Bragg intensities x 1.7), diffuse voxels not shared:
    only the Bragg references tie the two stills, and the worker's scales come out in the ratio 1.7."""
    from dials.array_family import flex
    from diffractflow.config import Settings
    from diffractflow.messages import ArtifactRef, JobRequest
    from diffractflow.runtime import run_inline

    from scaler.artifacts import write_observations
    from scaler.worker import STAGE

    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    src = processed / "thau_3_2_0001"
    (vol / "in" / "a.expt").write_text(Path(f"{src}.expt").read_text())
    (vol / "in" / "a.refl").write_bytes(Path(f"{src}.refl").read_bytes())
    (vol / "in" / "b.expt").write_text(Path(f"{src}.expt").read_text().replace("thau_3_2_0001.cbf", "copy_0001.cbf"))
    t = flex.reflection_table.from_file(f"{src}.refl")
    t["intensity.sum.value"] = t["intensity.sum.value"] * 1.7
    t["intensity.sum.variance"] = t["intensity.sum.variance"] * 1.7 ** 2
    t.as_file(str(vol / "in" / "b.refl"))
    rng = np.random.default_rng(0)
    n = 400
    still = np.repeat([0, 1], n)
    vox = np.concatenate([np.arange(n), n + np.arange(n)])  # no voxel seen by both stills
    inten = rng.uniform(5, 50, 2 * n)
    write_observations(vol / "in" / "obs.h5", still, vox, rng.uniform(0.05, 0.4, 2 * n), inten, 0.1 * inten,
                       still_names=["thau_3_2_0001.cbf#0", "copy_0001.cbf#0"])
    inputs = {"observations": ArtifactRef(path="in/obs.h5"), "refl_a": ArtifactRef(path="in/a.refl"),
              "expt_a": ArtifactRef(path="in/a.expt"), "refl_b": ArtifactRef(path="in/b.refl")}
    job = JobRequest(job_id="rel-bragg", service="scaler", inputs=inputs,
                     params={"mode": "relative", "partiality_threshold": 0.1, "convergence_tolerance": 1e-10,
                             "max_iterations": 200})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    scales = read_scales(ctx.outputs["scales"])
    assert scales["copy_0001.cbf#0"] / scales["thau_3_2_0001.cbf#0"] == pytest.approx(1.7, rel=1e-3)
    assert ctx.metrics["n_bragg"] > 600 and ctx.metrics["n_bragg_unmatched_stills"] == 0
    with h5py.File(ctx.outputs["bragg_merged"]) as f:
        assert f["intensity"].shape == f["d"].shape and f["intensity"].shape[0] > 100
        assert np.all(f["n_observations"][()] >= 2)  # every reflection seen in both copies
    # the merged Bragg references feed the absolute scale
    (vol / "in" / "bragg.h5").write_bytes(ctx.outputs["bragg_merged"].read_bytes())
    with h5py.File(vol / "in" / "map.h5", "w") as f:
        f["q_magnitude"] = rng.uniform(0.02, 0.6, 5000)
        f["intensity"] = rng.uniform(1e-4, 2e-4, 5000)
    job = JobRequest(job_id="abs-bragg", service="scaler",
                     inputs={"map": ArtifactRef(path="in/map.h5"), "bragg": ArtifactRef(path="in/bragg.h5")},
                     params={"mode": "absolute", "formula": "C1000H1600N280O300S16", "cell_volume": 498000.0})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    res = json.loads(ctx.outputs["absolute"].read_text())
    assert res["bragg_included"] and res["scale"] > 0
