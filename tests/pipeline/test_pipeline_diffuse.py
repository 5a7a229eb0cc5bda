"""The diffuse pipeline end to end: the embedded topology (real nats-server, the services as processes,
Prefect's server), the watcher and dispatcher, planted truth, a service killed mid-run, and real stills."""
from __future__ import annotations

import asyncio
import bz2
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.formats.scales import read_scales
from orchestration.diffuse import DiffuseRunConfig, diffuse_merge_flow, diffuse_still_flow, run_dir
from orchestration.embedded import Topology

DIFFUSE_SERVICES = ["stills-processor", "diffuse-extractor", "voxel-merger", "scaler"]


@pytest.fixture
def topology(tmp_path, monkeypatch):
    """An embedded topology; `point_here()` points this process's clients at it (undone after the test)."""
    topo = Topology(tmp_path / "home")

    def point_here():
        monkeypatch.delenv("DIFFRACTFLOW_NATS_PASSWORD", raising=False)
        for k, v in topo.client_env().items():
            monkeypatch.setenv(k, v)

    topo.point_here = point_here
    yield topo
    topo.down(log=lambda *a: None)


def test_run_completes_with_every_still_when_a_replica_is_killed(topology, tmp_path):
    """8 stills rendered with nanoBragg's physics through watcher -> flows -> services; one stills-processor
    replica is SIGKILLed while the run is in flight. Every still is accounted for, and the map and scales match
    the truth computed in reciprocal space."""
    from diff_sim_refiner.datasets.stills import StillsSpec, generate_stills

    from orchestration.demo import demo_run_config, evaluate_run
    from orchestration.diffuse import diffuse_background_flow
    from orchestration.process import feed_and_dispatch, land

    n = 8
    truth = generate_stills(tmp_path / "dataset", StillsSpec(n_stills=n, n_background_frames=2, seed=77))
    state = topology.up(DIFFUSE_SERVICES, {"stills-processor": 2}, volume=tmp_path / "volume", log=lambda *a: None)
    topology.point_here()
    volume = Volume(tmp_path / "volume")
    incoming = volume.resolve("incoming/kill")
    incoming.mkdir(parents=True)
    frames = [volume.relative(land(tmp_path / "dataset" / f, incoming / "background"))
              for f in truth["background_frames"]]
    cfg = DiffuseRunConfig.model_validate({**demo_run_config(truth, n), "stage_timeout_s": 300,
                                           "background_frames": frames})
    rdir = volume.resolve("runs/kill")
    rdir.mkdir(parents=True)
    atomic_write_json(rdir / "config.json", cfg.model_dump())
    victim = next(s["pid"] for s in state["services"] if s["service"] == "stills-processor")

    async def kill_when_busy():
        jobs = volume.resolve("jobs/stills-processor")
        while not (jobs.exists() and len(list(jobs.iterdir())) >= 3):
            await asyncio.sleep(0.2)
        os.killpg(victim, signal.SIGKILL)
        return time.monotonic()

    async def scenario():
        await diffuse_background_flow("kill")
        killer = asyncio.create_task(kill_when_busy())
        await feed_and_dispatch(topology, incoming, "kill", sorted((tmp_path / "dataset").glob("still_*.cbf")),
                                Console(quiet=True), interval_s=0.5)
        return await killer

    with topology.prefect_settings():
        asyncio.run(asyncio.wait_for(scenario(), timeout=1500))
    records = [json.loads(p.read_text()) for p in sorted((rdir / "stills").glob("*.json"))]
    assert len(records) == n and all(r["status"] == "ok" for r in records), [r["reason"] for r in records]
    summary = json.loads((rdir / "output" / "run_summary.json").read_text())
    assert summary["stills_processed"] == n and summary["stills_failed"] == 0
    for name in ("map.h5", "scales.json", "slice_l0.png", "radial_profile.png"):
        assert (rdir / "output" / name).is_file()
    m = evaluate_run(rdir, volume.root, truth, truth["space_group"])
    assert m["map_cc_vs_truth"] >= 0.95, m
    assert abs(m["map_offset_fraction"]) <= 0.05, m
    assert m["scale_error_max"] <= 0.06, m


def _thaumatin(shared_dir: Path, dest: Path, numbers) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i in numbers:
        src = shared_dir / "data" / "thaumatin_grid" / f"thau_3_2_{i:04d}.cbf.bz2"
        p = dest / src.name[:-4]
        p.write_bytes(bz2.decompress(src.read_bytes()))
        out.append(p)
    return out


def test_real_thaumatin_stills_through_the_flows(topology, tmp_path, shared_dir):
    """Real PILATUS 6M stills (3 with a crystal, 1 blank) through the per-still flow and the end-of-run flow."""
    topology.up(DIFFUSE_SERVICES, {}, volume=tmp_path / "volume", log=lambda *a: None)
    topology.point_here()
    volume = Volume(tmp_path / "volume")
    images = _thaumatin(shared_dir, volume.resolve("incoming/thau"), [1, 2, 3, 16])
    cfg = DiffuseRunConfig(space_group="P 41 21 2", unit_cell=[57.8, 57.8, 150.3, 90, 90, 90], d_min=3.0,
                           symmetry="P 41 21 2", stills_nproc=2, stage_timeout_s=600)
    atomic_write_json(run_dir(volume, "thau") / "config.json", cfg.model_dump())

    async def scenario():
        recs = await asyncio.gather(*[diffuse_still_flow(volume.relative(p), "thau") for p in images])
        return recs, await diffuse_merge_flow("thau")

    with topology.prefect_settings():
        recs, summary = asyncio.run(scenario())
    by_name = {Path(r["image"]).name: r for r in recs}
    for i in (1, 2, 3):
        assert by_name[f"thau_3_2_{i:04d}.cbf"]["status"] == "ok", by_name
    blank = by_name["thau_3_2_0016.cbf"]
    assert blank["status"] == "non_hit" and blank["n_spots"] <= 1
    assert summary["stills_processed"] == 3 and summary["stills_failed"] == 1
    import h5py

    with h5py.File(volume.resolve("runs/thau/output/map.h5"), "r") as f:
        intensity = f["entry/map/intensity"][()]
        counts = f["entry/map/counts"][()]
    measured = counts > 0
    assert measured.sum() > 10_000 and np.all(np.isfinite(intensity[measured]))
    scales = read_scales(volume.resolve("runs/thau/output/scales.json"))
    assert len(scales) == 3 and all(0.2 < v < 5 for v in scales.values())
