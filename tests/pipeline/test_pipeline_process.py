"""`diffractflow process diffuse` on stills the project did not plant with its own correction code.

The stills are rendered by the simulator (nanoBragg's physics: Gaussian-crystal Bragg spots and diffuse halos,
a water ring and air scatter, background-only frames, per-still scales, PILATUS gaps, Poisson noise), at a few
photons per pixel and again at 16x less. Both runs go through the command line a user types, against one
embedded topology (real nats-server, Prefect's server, the four services as processes). The maps are judged
against the truth at the merged pixels' true Miller indices (orchestration.validation): no offset (background
removed), flat in true intensity (no weighting bias), and the two doses give the same map.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestration.embedded import Topology
from orchestration.process import DIFFUSE_SERVICES

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dose_runs(tmp_path_factory):
    """Six stills at dose 1 and the same six at dose 1/16, processed with `diffractflow process diffuse`."""
    from diff_sim_refiner.datasets.stills import StillsSpec, dose_pair

    from orchestration.demo import demo_run_config

    tmp = tmp_path_factory.mktemp("process")
    n = 6
    high, low = dose_pair(tmp / "data", StillsSpec(n_stills=n, n_background_frames=2, seed=11))
    topo = Topology(tmp / "home")
    topo.up(DIFFUSE_SERVICES, {"stills-processor": 2}, volume=tmp / "volume", log=lambda *a: None)
    env = dict(os.environ, DIFFRACTFLOW_HOME=str(tmp / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("DIFFRACTFLOW_NATS_PASSWORD", None)
    runs = {}
    try:
        for label, truth in (("high", high), ("low", low)):
            cfg = tmp / f"{label}.json"
            cfg.write_text(json.dumps(demo_run_config(truth, n)))
            out = tmp / f"out-{label}"
            res = subprocess.run([str(BIN / "diffractflow"), "process", "diffuse", str(tmp / "data" / label),
                                  "--config", str(cfg), "--out", str(out), "--pattern", "still_*.cbf",
                                  "--background", "bkg_*.cbf", "--run-id", label],
                                 env=env, capture_output=True, text=True, timeout=1500)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            runs[label] = {"truth": truth, "out": out, "summary": json.loads((out / "summary.json").read_text()),
                           "stdout": res.stdout}
    finally:
        topo.down(log=lambda *a: None)
    yield {"runs": runs, "volume": tmp / "volume", "n": n, "home": tmp / "home"}


def _evaluate(dose_runs, label, n_bins: int = 10):
    from orchestration.demo import evaluate_run

    run = dose_runs["runs"][label]
    vol = dose_runs["volume"]
    return evaluate_run(vol / "runs" / label, vol, run["truth"], run["truth"]["space_group"], n_bins=n_bins)


def test_process_writes_the_run_a_user_needs(dose_runs):
    """summary.json with per-still status and CC½, the merged NeXus map with its axes, the figures."""
    import h5py

    s = dose_runs["runs"]["high"]["summary"]
    assert s["stills_total"] == dose_runs["n"] and s["stills_processed"] == dose_runs["n"], s["failed"]
    assert s["background"]["method"] == "frames" and s["background"]["n_frames"] == 2
    # one beamstop for the whole run, found on the background frames before any still (order independence)
    from diffuse_extractor.pipeline import read_beamstop_record

    assert read_beamstop_record(dose_runs["volume"] / "runs" / "high" / "beamstop.npz")
    assert len(s["stills"]) == dose_runs["n"] and all(r["status"] == "ok" for r in s["stills"])
    assert s["cc_half_overall"] is not None and 0.3 < s["cc_half_overall"] <= 1.0
    out = dose_runs["runs"]["high"]["out"]
    for name in ("map.h5", "scales.json", "slice_l0.png", "radial_profile.png", "run_summary.json", "report.html"):
        assert (out / name).is_file(), name
    # the page is rendered once, into --out: the end-of-run flow was told not to write its own copy
    assert not (dose_runs["volume"] / "runs" / "high" / "report.html").exists()
    with h5py.File(out / "map.h5", "r") as f:
        g = f["entry/map"]
        shape = g["intensity"].shape
        assert g["intensity_errors"].shape == shape and g["counts"].shape == shape
        assert [g[a].shape[0] for a in ("h", "k", "l")] == list(shape)


def test_map_matches_truth_without_offset_at_a_few_photons(dose_runs):
    """At ~3 photons of diffuse and ~3 of background per pixel: CC >= 0.95, offset <= 5 % of the mean map,
    map/truth flat within 10 % over the quintiles of true intensity. (Six stills: the weakest decile alone has
    measured 0.89-0.93 in some runs and 1.01 in others; the 20-still benchmark checks deciles.)"""
    m = _evaluate(dose_runs, "high", n_bins=5)
    assert m["map_cc_vs_truth"] >= 0.95, m
    assert abs(m["map_offset_fraction"]) <= 0.05, m
    assert m["map_ratio_flatness"] <= 0.10, m


def test_same_map_at_sixteen_times_lower_dose(dose_runs):
    """The same stills at 16x fewer photons give the same map: the ratio of the two maps is flat over true
    intensity and resolution. Weighting by each pixel's own counts (1/sigma^2) would bend it by 20-30 %."""
    from diff_sim_refiner.datasets.stills import DiffuseTruth

    from orchestration.validation import map_ratio_flatness

    runs = dose_runs["runs"]
    # at 16x fewer photons a still may keep too few strong spots to index: data, not a bias; the rest must merge
    assert runs["low"]["summary"]["stills_processed"] >= dose_runs["n"] - 1, runs["low"]["summary"]["failed"]
    truth = DiffuseTruth.load(runs["high"]["truth"])
    r = map_ratio_flatness(runs["high"]["out"] / "map.h5", runs["low"]["out"] / "map.h5",
                           runs["high"]["truth"]["unit_cell"], n_bins=5, truth=truth.on_voxels)
    # 16x less dose: the ratio of the maps is the ratio of the recovered overall scales, the same in every bin
    # within 5 % plus three counting errors of that bin. At 1/16 dose the weakest fifth of the voxels holds a few
    # % of the counts (measured: 6 % counting error on its ratio), the strongest bins 0.2-1 %; a 1/sigma^2
    # weighting bias (20-30 %) or background left in the map would stand far outside.
    assert r["n_voxels"] > 10_000, r
    ratios = r["ratio_by_intensity"] + r["ratio_by_resolution"]
    errors = r["ratio_errors_by_intensity"] + r["ratio_errors_by_resolution"]
    assert all(0 < e < 0.1 for e in errors[1:]), r  # the errors themselves are small enough to judge by
    assert all(abs(q - 1.0) <= 0.05 + 3.0 * e for q, e in zip(ratios, errors)), r
    low = _evaluate(dose_runs, "low")
    assert low["map_cc_vs_truth"] >= 0.8 and abs(low["map_offset_fraction"]) <= 0.1, low
    assert np.isfinite(r["overall_ratio"]) and r["overall_ratio"] > 0


def test_process_shows_one_progress_display_and_logs_to_a_file(dose_runs):
    """The user sees the run's progress (landed / indexed / extracted / accumulated / failed), not Prefect's
    hundreds of INFO lines; those are in the run's flow log under the topology's home."""
    out = dose_runs["runs"]["high"]["stdout"]
    n = dose_runs["n"]
    assert f"landed {n}/{n}" in out and "accumulated" in out and "failed" in out, out[-2000:]
    assert "Task run" not in out and "Flow run" not in out, out[-2000:]
    log = dose_runs["home"] / "logs" / "flows-high.log"
    text = log.read_text()
    assert "prefect.task_runs" in text and "Finished in state" in text
    assert "Finished in state" not in out
