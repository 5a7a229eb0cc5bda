"""Bad inputs through the bus to each real service: every one is rejected with a clear reason naming the problem,
lands in the dead-letter stream with that reason, and the worker keeps serving the good jobs after it."""
from __future__ import annotations

import asyncio
import json

import h5py
import numpy as np

from diffractflow.artifacts import Volume
from orchestration.tasks import submit_and_wait


def _ok(settings, service, inputs, params, job_id):
    return asyncio.run(submit_and_wait(service, inputs, params, run_id="good", job_id=job_id, timeout=300,
                                       settings=settings))


def test_stills_processor_bad_stills(expect_rejections, settings, volume, thaumatin_cbf, probe):
    good = thaumatin_cbf(volume / "incoming", 1)
    raw = good.read_bytes()
    truncated = volume / "incoming" / "truncated.cbf"
    truncated.write_bytes(raw[: len(raw) // 3])
    corrupt = volume / "incoming" / "corrupt.cbf"
    corrupt.write_bytes(raw[:4096] + bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8)))
    expect_rejections("stills-processor", [
        ("sp-truncated", {"image0": truncated}, {"nproc": 1}, "bad_input", "truncated.cbf"),
        ("sp-corrupt", {"image0": corrupt}, {"nproc": 1}, "bad_input", "corrupt.cbf"),
        ("sp-noimage", {"data": good}, {"nproc": 1}, "bad_input", "no image inputs"),
        ("sp-badcell", {"image0": good}, {"unit_cell": [57.8, -1, 150.3, 90, 90, 90]}, "bad_params",
                "unit_cell"),
        ("sp-badsg", {"image0": good}, {"space_group": "P 42 42 42 7"}, "bad_params", "space_group"),
    ])
    # a still with zero spots is data, not an error: a clear non-hit row, no dead letter (blank frames are
    # most of a serial run), and the worker goes on
    blank = thaumatin_cbf(volume / "incoming", 16)
    res = _ok(settings, "stills-processor", {"image0": blank}, {"nproc": 1}, "sp-blank")
    m = res.metrics
    assert m["status"] == "non_hit" and m["n_spots"] <= 1 and "spot" in m["reason"].lower(), m
    assert "sp-blank" not in {l.job_id for l in probe.dead_letters()}


def test_stem_polar_bad_datasets(expect_rejections, settings, volume):
    from stem_polar.synthetic import write_demo_dataset

    inc = volume / "incoming"
    write_demo_dataset(inc, h=16, w=16, k=32, seed=1)
    data = h5py.File(inc / "patterns.h5", "r")["patterns"][()]
    with h5py.File(inc / "bad.h5", "w") as f:
        f["flat"] = data[0, 0]  # 2-D: not a 4D-STEM dataset
        nan = data.astype(np.float32)
        nan[3, 4, 10, 10] = np.nan
        f["with_nan"] = nan
        inf = data.astype(np.float32)
        inf[0, 1, 2, 3] = np.inf
        f["with_inf"] = inf
        f["text"] = np.array([b"abc"] * 16)
        f["complex"] = data.astype(np.complex64)
    np.save(inc / "short_labels.npy", np.zeros(16 * 16 - 5, dtype=int))
    good = {"data": inc / "patterns.h5", "labels": inc / "labels.npy"}
    expect_rejections("stem-polar", [
        ("sp-2d", {"data": inc / "bad.h5", "labels": inc / "labels.npy"}, {"dset": "flat"}, "bad_input", "flat"),
        ("sp-nan", {"data": inc / "bad.h5", "labels": inc / "labels.npy"}, {"dset": "with_nan"}, "bad_input",
                "nan"),
        ("sp-inf", {"data": inc / "bad.h5", "labels": inc / "labels.npy"}, {"dset": "with_inf"}, "bad_input",
                "inf"),
        ("sp-text", {"data": inc / "bad.h5", "labels": inc / "labels.npy"}, {"dset": "text"}, "bad_input",
                "dtype"),
        ("sp-complex", {"data": inc / "bad.h5", "labels": inc / "labels.npy"}, {"dset": "complex"},
                "bad_input", "dtype"),
        ("sp-labels", {"data": inc / "patterns.h5", "labels": inc / "short_labels.npy"}, {"dset": "patterns"},
                "bad_input", "short_labels.npy"),
        ("sp-missing-dset", good, {"dset": "nope"}, "bad_input", "nope"),
        ("sp-scan", good, {"dset": "patterns", "scan_shape": [7, 9]}, "bad_input", "scan"),
        ("sp-chunks", good, {"dset": "patterns", "chunks": 0}, "bad_params", "chunks"),
        ("sp-config", good, {"dset": "patterns", "config": {"matched_filter": {"softmax_temp": -1}}}, "bad_params",
                "softmax_temp"),
    ])
    res = _ok(settings, "stem-polar", good, {"dset": "patterns"}, "sp-good")
    assert res.status == "ok"


def test_scaler_bad_tables(expect_rejections, settings, volume):
    from scaler.artifacts import write_observations

    inc = volume / "incoming"
    inc.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = 4000
    cols = dict(still_id=np.repeat(np.arange(20), n // 20), voxel_id=rng.integers(0, 100, n),
                q_magnitude=rng.uniform(0.1, 0.5, n), intensity=rng.uniform(50, 60, n), sigma=np.full(n, 2.0))
    write_observations(inc / "good.h5", **cols)
    with h5py.File(inc / "ragged.h5", "w") as f:
        for k, v in cols.items():
            f[k] = v[:-3] if k == "sigma" else v
    with h5py.File(inc / "twod.h5", "w") as f:
        for k, v in cols.items():
            f[k] = v.reshape(-1, 2) if k == "intensity" else v
    nan = dict(cols, intensity=np.where(np.arange(n) == 7, np.nan, cols["intensity"]))
    write_observations(inc / "nan.h5", **nan)
    (inc / "notes.h5").write_text("not hdf5 at all")
    expect_rejections("scaler", [
        ("sc-ragged", {"observations": inc / "ragged.h5"}, {}, "bad_input", "sigma"),
        ("sc-2d", {"observations": inc / "twod.h5"}, {}, "bad_input", "dataset intensity has shape (2000, 2)"),
        ("sc-nothdf5", {"observations": inc / "notes.h5"}, {}, "bad_input", "notes.h5"),
        ("sc-points", {"observations": inc / "good.h5"}, {"smoother": True, "n_control_points": 9},
                "bad_params", "n_control_points"),
        ("sc-qrange", {"observations": inc / "good.h5"}, {"q_range": [0.5, 0.1]}, "bad_params", "q_range"),
    ])
    assert _ok(settings, "scaler", {"observations": inc / "good.h5"}, {}, "sc-good").metrics["n_excluded"] == 0
    # one NaN among 4000 observations is excluded (weight 0) and counted, as DIALS drops bad observations
    assert _ok(settings, "scaler", {"observations": inc / "nan.h5"}, {}, "sc-nan").metrics["n_excluded"] == 1


def test_voxel_merger_bad_stills(expect_rejections, settings, volume):
    inc = volume / "incoming"
    inc.mkdir(parents=True)
    with h5py.File(inc / "empty_still.h5", "w") as f:
        f.create_group("entry")
    (inc / "grid.json").write_text("{not json")
    grid = {"ndiv": 1, "lo": [-5, -5, -5], "shape": [11, 11, 11], "unit_cell": [50, 50, 50, 90, 90, 90],
            "space_group": "P 1"}
    expect_rejections("voxel-merger", [
        ("vm-empty", {"still": inc / "empty_still.h5"}, {"mode": "accumulate", "grid": grid, "subdivisions": 1},
                "bad_input", "empty_still.h5"),
        ("vm-grid", {"still": inc / "empty_still.h5", "grid": inc / "grid.json"},
                {"mode": "accumulate", "subdivisions": 1}, "bad_input", "grid.json"),
        ("vm-even", {"still": inc / "empty_still.h5"}, {"mode": "run", "subdivisions": 2}, "bad_input",
                "odd"),
        ("vm-nopartials", {"still": inc / "empty_still.h5"}, {"mode": "merge"}, "bad_input", "partial"),
        ("vm-mode", {"still": inc / "empty_still.h5"}, {"mode": "explode"}, "bad_params", "mode"),
    ])


def test_diffuse_extractor_bad_experiments(expect_rejections, settings, volume, thaumatin_cbf):
    inc = volume / "incoming"
    inc.mkdir(parents=True)
    (inc / "garbage.expt").write_text("{this is not an experiment list")
    (inc / "empty.expt").write_text(json.dumps({"__id__": "ExperimentList", "experiment": []}))
    expect_rejections("diffuse-extractor", [
        ("de-garbage", {"experiments": inc / "garbage.expt"}, {}, "bad_input", "garbage.expt"),
        ("de-empty", {"experiments": inc / "empty.expt"}, {}, "bad_input", "empty.expt"),
        ("de-shape", {"experiments": inc / "empty.expt"}, {"mask_shapes": ["hexagon 1 2 3"]}, "bad_params",
                "mask_shapes"),
        ("de-gain", {"experiments": inc / "empty.expt"}, {"gain": -2}, "bad_params", "gain"),
    ])


def test_diff_sim_refiner_bad_jobs(expect_rejections, settings, volume):
    inc = volume / "incoming"
    inc.mkdir(parents=True)
    (inc / "bad.hkl").write_text("1 2 three 100\n")
    base = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1.0 -distance 100 -detpixels 64 -pixel 0.1"
    expect_rejections("diff-sim-refiner", [
        ("ds-flag", {}, {"nanobragg": (base + " -frobnicate 3").split()}, "bad_input", "-frobnicate"),
        ("ds-value", {}, {"nanobragg": base.replace("-N 5", "-N five").split()}, "bad_input", "-N"),
        ("ds-hkl", {"hkl": inc / "bad.hkl"}, {"nanobragg": (base + " -hkl x").split()}, "bad_input", "bad.hkl"),
        ("ds-big", {}, {"nanobragg": base.replace("-detpixels 64", "-detpixels 100000").split()}, "bad_input",
                "max_pixels"),
        ("ds-dtype", {}, {"dtype": "float16"}, "bad_params", "dtype"),
    ])
    res = _ok(settings, "diff-sim-refiner", {}, {"nanobragg": base.split()}, "ds-good")
    assert res.metrics["sum_photons"] > 0
