"""Re-running a run (issue 20): nothing changed -> every job is reused and the map is the same; the configuration
changed -> the stages it affects run anew into new job directories, the others are reused, and the run's summary
points at the new result. Through `diffractflow process diffuse --rerun` on a real topology."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from orchestration.embedded import Topology
from orchestration.process import DIFFUSE_SERVICES

BIN = Path(sys.executable).parent


def _jobs(volume: Path) -> dict[str, set[str]]:
    return {s.name: {d.name for d in s.iterdir() if (d / "manifest.json").exists()}
            for s in (volume / "jobs").iterdir() if s.is_dir()}


def _map(out: Path) -> np.ndarray:
    with h5py.File(out / "map.h5", "r") as f:
        return f["entry/map/intensity"][()]


@pytest.fixture(scope="module")
def reruns(tmp_path_factory):
    from diff_sim_refiner.datasets.stills import StillsSpec, generate_stills

    from orchestration.demo import demo_run_config

    tmp = tmp_path_factory.mktemp("rerun")
    truth = generate_stills(tmp / "data", StillsSpec(n_stills=3, n_background_frames=1, seed=5))
    topo = Topology(tmp / "home")
    topo.up(DIFFUSE_SERVICES, {"stills-processor": 2}, volume=tmp / "volume", log=lambda *a: None)
    env = dict(os.environ, DIFFRACTFLOW_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    steps = []
    try:
        for i, (d_min, extra) in enumerate(((2.0, []), (2.0, ["--rerun"]), (2.5, ["--rerun"]))):
            cfg = tmp / f"cfg{i}.json"
            cfg.write_text(json.dumps({**demo_run_config(truth, 3), "d_min": d_min}))
            out = tmp / f"out{i}"
            res = subprocess.run([str(BIN / "diffractflow"), "process", "diffuse", str(tmp / "data"), "--config",
                                  str(cfg), "--out", str(out), "--pattern", "still_*.cbf", "--background",
                                  "bkg_*.cbf", "--run-id", "r", *extra], env=env, capture_output=True, text=True,
                                 timeout=1500)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            steps.append({"out": out, "jobs": _jobs(tmp / "volume"), "summary": json.loads((out / "summary.json").read_text())})
        without_rerun = subprocess.run([str(BIN / "diffractflow"), "process", "diffuse", str(tmp / "data"), "--config",
                                        str(tmp / "cfg0.json"), "--out", str(tmp / "out-x"), "--pattern", "still_*.cbf",
                                        "--run-id", "r"], env=env, capture_output=True, text=True, timeout=600)
    finally:
        topo.down(log=lambda *a: None)
    yield {"steps": steps, "volume": tmp / "volume", "without_rerun": without_rerun}


def test_unchanged_rerun_reuses_every_job_and_gives_the_same_map(reruns):
    first, same = reruns["steps"][0], reruns["steps"][1]
    assert first["summary"]["stills_processed"] == 3 and same["summary"]["stills_processed"] == 3
    assert same["jobs"] == first["jobs"]  # not one new job directory
    np.testing.assert_array_equal(_map(same["out"]), _map(first["out"]))
    assert (reruns["volume"] / "runs" / "r" / "previous-output" / "map.h5").is_file()


def test_changed_config_reruns_what_it_affects_and_reuses_the_rest(reruns):
    same, changed = reruns["steps"][1], reruns["steps"][2]
    # d_min does not change indexing; extraction stops at the run's d_min, so the stills are extracted again
    assert changed["jobs"]["stills-processor"] == same["jobs"]["stills-processor"]
    new_ex = changed["jobs"]["diffuse-extractor"] - same["jobs"]["diffuse-extractor"]
    assert sum(".extract." in j for j in new_ex) == 3 and len(new_ex) == 3, sorted(new_ex)
    new_acc = changed["jobs"]["voxel-merger"] - same["jobs"]["voxel-merger"]
    assert sum(".accumulate." in j for j in new_acc) == 3 and any(".merge." in j for j in new_acc)
    assert changed["jobs"]["voxel-merger"] > same["jobs"]["voxel-merger"]  # the old results stay until gc
    old, new = _map(same["out"]), _map(changed["out"])
    assert new.size < old.size  # the grid follows the new d_min
    with h5py.File(changed["out"] / "map.h5", "r") as f:
        h, k, l = (f[f"entry/map/{a}"][()] for a in "hkl")
    assert np.abs(h).max() <= 40 / 2.5 + 1 and np.abs(l).max() <= 60 / 2.5 + 1  # cell 40 x 40 x 60 A


def test_a_finished_run_is_not_reprocessed_by_accident(reruns):
    res = reruns["without_rerun"]
    assert res.returncode == 2
    assert "--rerun" in res.stdout + res.stderr
