"""Rotation sweeps arriving frame by frame, in the same run as stills (issue 17).

A rotation frame (``Angle_increment`` > 0 in its header) is recognised as it lands and grouped with the other
frames of its sweep (same directory, file-name template, size and oscillation width: ``diffractflow.frames``).
The first ``sweep_index_frames`` frames (or all of them once no new frame has come for ``sweep_settle_s``) are
indexed and refined by DIALS as one sequence (stills-processor ``mode=sequence``); every frame, those and the
later ones, then gets its own one-image rotation experiment from that model (``mode=frame_model``: cheap, no
spot finding) and goes through diffuse extraction and voxel accumulation as a still does. At the end of the run
a complete sweep is refined again with a scan-varying crystal and its frames are re-extracted with it before
the merge (``sweep_scan_varying``). A sweep already complete on disk when its first frame is handled (every
frame the run expects is there: ``process diffuse`` on a directory) is refined scan-varying over all its frames
at once, and each frame is extracted once, with that model. State lives on the volume, under ``runs/<run>/sweeps/<sweep>/``.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.frames import FrameInfo, frame_info

from .tasks import StageFailed, job_id_for, run_stage

MODEL_RECORD = "model.json"
SCAN_VARYING_RECORD = "model_scan_varying.json"


def sweep_dir(rdir: Path, info: FrameInfo) -> Path:
    d = rdir / "sweeps" / info.sweep_id
    d.mkdir(parents=True, exist_ok=True)
    return d


def sweep_frames(image_path: Path, info: FrameInfo) -> list[Path]:
    """The frames of ``info``'s sweep present on disk beside ``image_path`` (same key), in frame order."""
    template = Path(info.sweep_key.split("|")[1])
    pattern = template.name.replace("#", "?")
    frames = []
    for p in image_path.parent.glob(pattern):
        if p.name.startswith("."):
            continue
        fi = frame_info(p)
        if info.same_sweep(fi):
            frames.append((fi.frame_number or 0, p))
    return [p for _, p in sorted(frames)]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


async def _locked(lock_path: Path, body: Callable[[], Awaitable[Any]]):
    """Run ``body`` holding an exclusive file lock (flows in other processes agree on one sweep model)."""
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o640)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        return await body()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _symmetry_params(cfg) -> dict:
    params = {k: v for k, v in {"space_group": cfg.space_group, "unit_cell": cfg.unit_cell}.items() if v}
    params["nproc"] = cfg.stills_nproc
    params["phil"] = list(cfg.stills_phil)
    return params


async def index_sweep(volume: Volume, run_id: str, cfg, info: FrameInfo, frames: list[Path], *,
                      scan_varying: bool = False) -> dict:
    """DIALS on ``frames`` as one sequence; the record of the refined model (experiments, reflections)."""
    inputs = {f"image{i}": volume.relative(p) for i, p in enumerate(frames)}
    tag = "sweep-sv" if scan_varying else "sweep"
    params = {**_symmetry_params(cfg), "mode": "sequence", "scan_varying": scan_varying}
    if cfg.unit_cell and not any(x.startswith("indexing.method") for x in params["phil"]):
        # the cell is known: the 1D FFT search finds the same solution several times faster than fft3d
        params["phil"] = [*params["phil"], "indexing.method=fft1d"]
    res = await run_stage("stills-processor", inputs, params,
                          run_id, job_id_for(run_id, tag, f"{info.sweep_id}.{len(frames)}"),
                          timeout=cfg.stage_timeout_s)
    out = res["outputs"]
    if "experiments" not in out:
        raise StageFailed(f"sweep {info.sweep_id}: DIALS did not index the {len(frames)} frames "
                          f"({res.get('metrics', {})})")
    return {"sweep": info.sweep_id, "experiments": out["experiments"], "reflections": out.get("reflections"),
            "frames": [p.name for p in frames], "scan_varying": scan_varying, "metrics": res.get("metrics", {}),
            "increment_deg": info.increment_deg}


def sweep_complete(cfg, frames: list[Path]) -> bool:
    """True when ``frames`` (one sweep's frames on disk) are the whole run: the run's ``expected_stills`` are all
    there and belong to this sweep, and the run refines sweeps scan-varying. A run still landing, or mixing stills
    and sweeps, takes the live path (scan-static model from the first frames, scan-varying at the end)."""
    n = getattr(cfg, "expected_stills", None)
    return bool(cfg.sweep_scan_varying and n and len(frames) >= max(int(n), 2))


async def sweep_model(volume: Volume, run_id: str, cfg, image: str, info: FrameInfo, log) -> dict:
    """The sweep's refined (scan-static) model, indexing it first if this frame is the one that completes the
    first ``cfg.sweep_index_frames``; waits (polling the volume) while too few frames have landed."""
    from .diffuse import run_dir  # cycle: orchestration.diffuse imports this module at module level

    sdir = sweep_dir(run_dir(volume, run_id), info)
    record = sdir / MODEL_RECORD
    image_path = volume.resolve(image)
    deadline = time.monotonic() + cfg.stage_timeout_s

    async def try_build():
        if (m := _read(record)) is not None:
            return m
        frames = sweep_frames(image_path, info)
        if sweep_complete(cfg, frames):
            # the whole sweep is on disk (e.g. `process diffuse` on a directory): refine it scan-varying now and
            # extract every frame once with that model, instead of scan-static now and all frames again at the end
            log.info(f"sweep {info.sweep_id}: all {len(frames)} frames on disk; indexing and scan-varying "
                     f"refinement as one sequence")
            m = await index_sweep(volume, run_id, cfg, info, frames, scan_varying=True)
            atomic_write_json(sdir / SCAN_VARYING_RECORD, m)
            atomic_write_json(record, m)
            return m
        newest = max((p.stat().st_mtime for p in frames), default=time.time())
        settled = time.time() - newest >= cfg.sweep_settle_s
        if len(frames) < cfg.sweep_index_frames and not settled:
            return None
        frames = frames[:max(cfg.sweep_index_frames, 1)]
        log.info(f"sweep {info.sweep_id}: indexing {len(frames)} frames as one sequence")
        m = await index_sweep(volume, run_id, cfg, info, frames)
        atomic_write_json(record, m)
        return m

    while True:
        if (m := _read(record)) is not None:
            return m
        m = await _locked(sdir / ".model.lock", try_build)
        if m is not None:
            return m
        if time.monotonic() > deadline:
            raise StageFailed(f"sweep {info.sweep_id}: fewer than {cfg.sweep_index_frames} frames landed within "
                              f"{cfg.stage_timeout_s:.0f} s; nothing to index")
        await asyncio.sleep(1.0)


async def frame_experiment(volume: Volume, run_id: str, cfg, image: str, model: dict, tag: str = "") -> dict:
    """A one-image rotation experiment for ``image`` from the sweep's model (stills-processor frame_model)."""
    stem = Path(image).stem
    res = await run_stage("stills-processor", {"model": model["experiments"], "image0": image},
                          {"mode": "frame_model"}, run_id, job_id_for(run_id, f"frame-model{tag}", stem),
                          timeout=cfg.stage_timeout_s)
    return res["outputs"]["experiments"]


async def rotation_frame(volume: Volume, run_id: str, cfg, image: str, info: FrameInfo, record: dict, log,
                         extract_and_accumulate) -> dict:
    """One rotation frame: the sweep's model, the frame's own experiment, then extraction and accumulation."""
    t0 = time.monotonic()
    model = await sweep_model(volume, run_id, cfg, image, info, log)
    varying = bool(model.get("scan_varying"))
    expt = await frame_experiment(volume, run_id, cfg, image, model, tag=".sv" if varying else "")
    record["stage_seconds"]["stills-processor"] = round(time.monotonic() - t0, 2)
    phi = (info.start_angle_deg or 0.0) + 0.5 * (info.increment_deg or 0.0)
    record.update(sweep=info.sweep_id, frame=info.frame_number, phi_deg=phi, experiments=expt, kind="rotation",
                  model="scan_varying" if varying else "scan_static")
    await extract_and_accumulate({"experiments": expt})
    return record


async def refine_complete_sweeps(volume: Volume, run_id: str, cfg, records: list[dict], log,
                                 reprocess: Callable[[dict, dict], Awaitable[dict]]) -> dict:
    """End of run: each sweep with merged frames is refined again with a scan-varying crystal over all its frames,
    and its frames are re-extracted and re-accumulated with that model (``reprocess(record, model)``).
    A sweep whose scan-varying refinement fails keeps its scan-static frames (reported)."""
    from .diffuse import run_dir  # cycle: orchestration.diffuse imports this module at module level

    rdir = run_dir(volume, run_id)
    by_sweep: dict[str, list[dict]] = {}
    done: dict[str, int] = {}
    for r in records:
        if r.get("kind") == "rotation" and r["status"] == "ok":
            if r.get("model") != "scan_varying":
                by_sweep.setdefault(r["sweep"], []).append(r)
            else:
                done[r["sweep"]] = done.get(r["sweep"], 0) + 1
    report = {s: f"scan-varying model from the start (sweep complete on disk); {n} frames extracted once"
              for s, n in done.items() if s not in by_sweep}
    for sweep, recs in by_sweep.items():
        recs.sort(key=lambda r: r.get("frame") or 0)
        frames = [volume.resolve(r["image"]) for r in recs]
        info = frame_info(frames[0])
        if len(frames) < 2:
            report[sweep] = "one frame: scan-static model kept"
            continue
        try:
            model = _read(rdir / "sweeps" / sweep / SCAN_VARYING_RECORD)
            if model is None:
                log.info(f"sweep {sweep}: scan-varying refinement over {len(frames)} frames")
                model = await index_sweep(volume, run_id, cfg, info, frames, scan_varying=True)
                atomic_write_json(rdir / "sweeps" / sweep / SCAN_VARYING_RECORD, model)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the scan-static result, reported
            report[sweep] = f"scan-varying refinement failed, scan-static model kept: {exc}"
            log.warning(f"sweep {sweep}: {report[sweep]}")
            continue
        sem = asyncio.Semaphore(2)

        async def one(r):
            async with sem:
                return await reprocess(r, model)

        results = await asyncio.gather(*(one(r) for r in recs), return_exceptions=True)
        n_ok = sum(1 for x in results if isinstance(x, dict) and x.get("model") == "scan_varying")
        report[sweep] = f"scan-varying model; {n_ok}/{len(recs)} frames re-extracted"
    return report
