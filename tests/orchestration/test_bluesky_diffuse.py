"""A diffuse run driven by Bluesky: a RunEngine 'acquires' 3 stills rendered with nanoBragg's physics (an ophyd
detector writing one CBF per trigger onto the shared volume), publishes its documents through bluesky-nats with a
publish-only NATS user, and the dispatcher runs the diffuse pipeline from those documents: the run configuration
from the start document's metadata, a per-still flow as each frame is complete, the end-of-run merge after stop."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from diffractflow.artifacts import Volume
from orchestration.bluesky import BlueskyTranslator, START_HOOKS, frame_file_detector

SERVICES = ["stills-processor", "diffuse-extractor", "voxel-merger", "scaler"]


def test_bluesky_run_is_processed_into_a_diffuse_map(tmp_path, nats_server, volume, settings, bus_env, workers,
                                                    prefect_server):
    from bluesky import RunEngine
    from bluesky.plans import count

    from diff_sim_refiner.datasets.stills import StillsSpec, generate_stills
    from diffractflow import bus
    from orchestration.bluesky import connect_publisher
    from orchestration.demo import demo_run_config
    from orchestration.flows import FLOWS
    from orchestration.watcher import dispatch

    n = 3
    truth = generate_stills(tmp_path / "rendered", StillsSpec(n_stills=n, n_background_frames=0, seed=5))
    stills = sorted((tmp_path / "rendered").glob("still_*.cbf"))
    assert len(stills) == n
    for s in SERVICES:
        workers.start(s)
    det = frame_file_detector("pilatus", stills, volume / "incoming" / "bs-diffuse", prefix="still")
    cfg = {**demo_run_config(truth, n), "stage_timeout_s": 600}
    cfg.pop("expected_stills")  # taken from the plan's num_points
    on_file, on_end = FLOWS["diffuse-pipeline"]
    summary = {}

    async def end(ev):
        summary["result"] = await on_end(ev)

    async def scenario():
        stop = asyncio.Event()
        tr = BlueskyTranslator(Volume(volume), settle_s=0.5, frame_timeout_s=60,
                               on_start=START_HOOKS["diffuse-pipeline"])
        disp = asyncio.create_task(dispatch(settings, on_file, end, stop, bluesky=tr, max_concurrent=3))
        nc = await bus.connect(settings)
        await bus.ensure_streams(nc.jetstream())
        await nc.drain()

        def acquire():
            pub = connect_publisher(nats_server.url, "bluesky", nats_server.creds.users["bluesky"], source="bl")
            RE = RunEngine({}, context_managers=[])
            RE.subscribe(pub)
            try:
                RE(count([det], num=n), diffractflow={"run_id": "bs-diffuse", "config": cfg})
            finally:
                assert pub.close()

        await asyncio.to_thread(acquire)
        while "result" not in summary:
            await asyncio.sleep(0.5)
        stop.set()
        await disp

    asyncio.run(asyncio.wait_for(scenario(), timeout=1200))
    rdir = volume / "runs" / "bs-diffuse"
    stored = json.loads((rdir / "config.json").read_text())
    assert stored["expected_stills"] == n and stored["unit_cell"] == list(truth["unit_cell"])
    records = [json.loads(p.read_text()) for p in sorted((rdir / "stills").glob("*.json"))]
    assert [Path(r["image"]).name for r in records] == [f"still_{i:06d}.cbf" for i in range(n)]
    assert all(r["status"] == "ok" for r in records), records
    run_summary = json.loads((rdir / "output" / "run_summary.json").read_text())
    assert run_summary["stills_processed"] == n, run_summary
    assert (rdir / "output" / "map.h5").is_file()
    assert (rdir / "report.html").is_file()  # a live run's page, written by the end-of-run flow
    rec = json.loads((rdir / "bluesky.json").read_text())
    assert rec["status"] == "ended" and len(rec["frames"]) == n and rec["exit_status"] == "success"
