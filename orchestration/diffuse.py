"""The diffuse-scattering pipeline as Prefect flows over the bus.

Per still, as each file lands (flow ``diffuse-still``):
    stills-processor -> diffuse-extractor -> voxel-merger (accumulate this still onto the run's grid)
At the end of the run (flow ``diffuse-merge``):
    voxel-merger (merge the partial accumulators; observation table)
    -> scaler (relative scales) -> voxel-merger (merge again with the scales applied)
    -> scaler (absolute scale, Compton subtraction)
and the merged map, its figures and a summary land in ``runs/<run_id>/output/``.

State lives on the volume, not in the flow: each still's outcome is a small JSON file under
``runs/<run_id>/stills/``, so the end-of-run flow (or a re-run) sees every still, whichever
process handled it. A still that fails after its retries is recorded with the reason and the
run completes with the others.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from diffractflow.artifacts import Volume, atomic_write_json
from diffractflow.config import Settings
from diffractflow.frames import ROTATION, frame_info
from diffractflow.messages import ArtifactRef, DataEvent

from .report import write_report
from .sweep import frame_experiment, refine_complete_sweeps, rotation_frame
from .tasks import JobRejected, StageFailed, job_id_for, run_stage


class DiffuseRunConfig(BaseModel):
    """What a run needs to know (``runs/<run_id>/config.json``; defaults otherwise)."""

    space_group: str | None = None
    unit_cell: list[float] | None = None
    d_min: float = Field(2.0, gt=0, description="grid resolution limit, Angstrom")
    subdivisions: int = Field(3, ge=1, le=15)
    symmetry: str | None = None  # merge onto the asymmetric unit of this space group
    formula: str | None = None  # unit-cell contents for the absolute scale, e.g. "C400H600N100O120S4"
    smoother: bool = Field(False, description="refine the scaler's resolution smoother (seed 003: off by default; "
                           "a run of partial observations rarely identifies it)")
    extractor: dict[str, Any] = Field(default_factory=dict, description="diffuse-extractor parameters for every still")
    background_frames: list[str] = Field(default_factory=list, description="background-only frames (volume-relative "
                                         "paths): averaged, smoothed and subtracted from every still")
    bragg_in_scaling: bool = Field(True, description="use the stills' integrated Bragg reflections as scaling "
                                   "references besides the diffuse voxels (seed 003)")
    partiality_threshold: float = Field(0.1, ge=0, le=1, description="seed 003's P_min: Bragg reflections of lower "
                                        "partiality are not used as references")
    bragg_radius_px: float | None = Field(6.0, gt=0, description="Bragg-mask disk radius (pixels) around every "
                                          "predicted reflection, the same for every still of the run (observed spots "
                                          "are masked by their own bounding boxes besides); None: each still's own "
                                          "estimate from its spots, which grows with the still's brightness")
    hot_dead_pixels: bool = Field(True, description="mask hot and dead pixels found from running per-pixel "
                                  "statistics over the run's stills (from the 3rd still on). The one mask rule "
                                  "that depends on the extraction order: a still is masked with the statistics "
                                  "of the stills extracted before it (the run's first two with none)")
    exclude_bragg_voxels: bool = Field(True, description="leave the voxel centred on each integer hkl out of the map "
                                       "(the Bragg spot and the halo's centre share it; what the Bragg mask misses of a "
                                       "spot lands there, and how much a dose-dependent outlier test catches of it "
                                       "varies); needs subdivisions >= 3")
    reject_sigma: float | None = Field(5.0, gt=0, description="drop a still's voxel estimate deviating from the "
                                       "others by more than this many sigma (None: keep all)")
    stills_nproc: int = Field(1, ge=0, description="DIALS processes per stills-processor replica (0 = all CPUs)")
    stills_phil: list[str] = Field(default_factory=list, description="DIALS parameters for the stills-processor")
    sweep_index_frames: int = Field(10, ge=1, description="rotation sweeps: frames indexed together as one DIALS "
                                    "sequence before any frame is extracted (fewer once the sweep stops growing)")
    sweep_settle_s: float = Field(20.0, gt=0, description="rotation sweeps: a sweep with fewer frames than "
                                  "sweep_index_frames is indexed once no new frame has landed for this long (s)")
    sweep_scan_varying: bool = Field(True, description="rotation sweeps: at the end of the run, refine each sweep "
                                     "with a scan-varying crystal over all its frames and re-extract them with it")
    rotation_smoothness: float | None = Field(None, ge=0, description="rotation sweeps: weight of the scaler's "
                                              "smoothness restraint on frame scales along phi (None: its default)")
    stage_timeout_s: float = 900.0
    expected_stills: int | None = None
    run_report: bool = Field(True, description="write runs/<run>/report.html at the end of the run (`process diffuse` "
                                               "writes its page into --out instead)")


def run_dir(volume: Volume, run_id: str) -> Path:
    d = volume.resolve(f"runs/{run_id}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_config(volume: Volume, run_id: str) -> DiffuseRunConfig:
    f = run_dir(volume, run_id) / "config.json"
    return DiffuseRunConfig.model_validate_json(f.read_text()) if f.exists() else DiffuseRunConfig()


def grid_spec(cfg: DiffuseRunConfig) -> dict:
    """What the voxel-merger needs to build the run's grid itself (fixed up front, so each still can be
    accumulated as it lands): cell, space group, resolution limit, subdivisions."""
    if not cfg.unit_cell:
        raise ValueError("the diffuse pipeline needs the run's unit cell (config.json: unit_cell)")
    return {"unit_cell": list(cfg.unit_cell), "space_group": cfg.space_group or "P 1", "d_min": cfg.d_min,
            "subdivisions": cfg.subdivisions}


BACKGROUND_RECORD = "background.json"
#: the run's auto-detected beamstop shadow (diffuse-extractor ``beamstop_record``): one for every still
BEAMSTOP_RECORD = "beamstop.npz"


def background_ref(volume: Volume, run_id: str) -> dict | None:
    """The run's smoothed background artifact (made once by :func:`diffuse_background_flow`), if any."""
    f = run_dir(volume, run_id) / BACKGROUND_RECORD
    return json.loads(f.read_text())["artifact"] if f.exists() else None


@flow(name="diffuse-background", flow_run_name="background-{run_id}")
async def diffuse_background_flow(run_id: str) -> dict:
    """Background-only frames of the run -> one binned, smoothed background (diffuse-extractor), recorded in
    ``runs/<run>/background.json`` for every extraction of the run to subtract; with an auto-detected beamstop,
    the shadow on the frames' mean is the run's beamstop record (``runs/<run>/beamstop.npz``), written before any
    still is extracted."""
    volume = Volume(Settings().volume)
    cfg = load_config(volume, run_id)
    if not cfg.background_frames:
        raise ValueError(f"run {run_id}: config.json names no background_frames")
    inputs = {f"frame{i:04d}": p for i, p in enumerate(cfg.background_frames)}
    params: dict[str, Any] = {"mode": "background"}
    if cfg.extractor.get("beamstop", "auto") == "auto":  # the run's one shadow, found on the mean frame
        params["beamstop_record"] = f"runs/{run_id}/{BEAMSTOP_RECORD}"
    res = await run_stage("diffuse-extractor", inputs, params, run_id,
                          job_id_for(run_id, "background", "frames"), timeout=cfg.stage_timeout_s)
    record = {"artifact": res["outputs"]["background"], "n_frames": len(cfg.background_frames),
              "metrics": res.get("metrics", {})}
    atomic_write_json(run_dir(volume, run_id) / BACKGROUND_RECORD, record)
    return record


def _still_outcome(result: dict) -> dict:
    """A one-still stills-processor result as the flow needs it: status, reason and counts from its metrics, its
    DIALS files as the job's declared (hashed) outputs ``experiments``, ``reflections`` (integrated) and
    ``indexed`` (indexed strong spots), each an artifact reference or None."""
    m, out = result.get("metrics", {}), result.get("outputs", {})
    return {"status": m.get("status", "failed"), "reason": m.get("reason") or "",
            "n_spots": int(m.get("n_spots") or 0), "n_indexed": int(m.get("n_indexed_spots") or 0),
            "strategy": m.get("strategy") or None, "validation_passed": m.get("validation_passed") is not False,
            **{k: out.get(k) for k in ("experiments", "reflections", "indexed")}}


async def extract_and_accumulate(volume: Volume, run_id: str, cfg: DiffuseRunConfig, image: str, inputs: dict,
                                 record: dict, tag: str = "") -> dict:
    """diffuse-extractor then voxel-merger accumulate for one still or rotation frame (``inputs``: its
    ``experiments`` and, for stills, the observed ``reflections``); fills ``record`` (status ok, partial)."""
    stem = Path(image).stem
    t1 = time.monotonic()
    inputs = dict(inputs)
    bkg = background_ref(volume, run_id)
    if bkg is not None:
        inputs["background"] = bkg
    ex_params = {**cfg.extractor, "pngs": False}
    ex_params.setdefault("d_min", cfg.d_min)  # pixels beyond the map's resolution limit are not extracted
    if cfg.hot_dead_pixels and not tag:  # a re-extraction must not count its pixels twice in the run statistics
        ex_params.setdefault("pixel_stats", f"runs/{run_id}/pixel_stats.h5")
    # the same mask rules for every still, whichever is extracted first and by which process: one Bragg radius
    # from the configuration (not estimated on the run's first still) and one recorded beamstop shadow
    if cfg.bragg_radius_px is not None:
        ex_params.setdefault("bragg_radius_px", cfg.bragg_radius_px)
    if ex_params.get("beamstop", "auto") == "auto":
        ex_params.setdefault("beamstop_record", f"runs/{run_id}/{BEAMSTOP_RECORD}")
    res = await run_stage("diffuse-extractor", inputs, ex_params, run_id, job_id_for(run_id, f"extract{tag}", stem),
                          timeout=cfg.stage_timeout_s)
    record["bragg_radius_px"] = res.get("metrics", {}).get("bragg_radius_px")
    record["stage_seconds"]["diffuse-extractor"] = round(time.monotonic() - t1, 2)
    still_ref = res["outputs"][res["metrics"]["tables"][0]]  # the extractor names its tables in its metrics
    t2 = time.monotonic()
    res = await run_stage("voxel-merger", {"still": ArtifactRef(**still_ref)},
                          {"mode": "accumulate", "grid_spec": grid_spec(cfg)},
                          run_id, job_id_for(run_id, f"accumulate{tag}", stem), timeout=cfg.stage_timeout_s)
    record["stage_seconds"]["voxel-merger"] = round(time.monotonic() - t2, 2)
    record.update(status="ok", reason="", diffuse=still_ref, partial=res["outputs"]["partial"])
    return record


async def _still(volume: Volume, run_id: str, cfg: DiffuseRunConfig, image: str, record: dict, log) -> dict:
    """A still: stills-processor (index, refine, integrate, validate), then extraction and accumulation."""
    stem = Path(image).stem
    t0 = time.monotonic()
    params = {k: v for k, v in {"space_group": cfg.space_group, "unit_cell": cfg.unit_cell}.items() if v}
    params["nproc"] = cfg.stills_nproc
    params["phil"] = list(cfg.stills_phil)
    res = await run_stage("stills-processor", {"image0": image}, params, run_id,
                          job_id_for(run_id, "index", stem), timeout=cfg.stage_timeout_s)
    record["stage_seconds"]["stills-processor"] = round(time.monotonic() - t0, 2)
    row = _still_outcome(res)
    record.update(n_spots=row["n_spots"], n_indexed=row["n_indexed"], strategy=row["strategy"],
                  reflections=row["reflections"], experiments=row["experiments"], kind="still")
    if row["status"] != "indexed":
        record.update(status=row["status"], reason=row["reason"] or "not indexed")
        log.warning(f"{image}: {record['status']} ({record['reason']})")
        return record
    if not row["validation_passed"]:
        record.update(status="validation_failed",
                      reason="q-vector consistency check failed: the crystal model does not map the indexed "
                             "spots onto their observed positions; the still is not merged")
        log.warning(f"{image}: {record['reason']}")
        return record
    inputs = {"experiments": row["experiments"]}
    # the observed (strong) spots: their positions are masked as well as the predictions, and their extent
    # sizes the Bragg mask; the integrated reflections go to the scaler
    spots = row["indexed"] or row["reflections"]
    if spots:
        inputs["reflections"] = spots
    return await extract_and_accumulate(volume, run_id, cfg, image, inputs, record)


@flow(name="diffuse-still", flow_run_name="still-{run_id}-{image}")
async def diffuse_still_flow(image: str, run_id: str) -> dict:
    """One still (or one rotation frame, see :mod:`orchestration.sweep`) through the stills-processor,
    diffuse-extractor and per-still voxel accumulation."""
    log = get_run_logger()
    volume = Volume(Settings().volume)
    cfg = load_config(volume, run_id)
    stem = Path(image).stem
    record = {"image": image, "status": "failed", "reason": "", "stage_seconds": {}}
    out_file = run_dir(volume, run_id) / "stills" / f"{stem}.json"
    t0 = time.monotonic()
    try:
        info = frame_info(volume.resolve(image))
        if info.kind == ROTATION:
            async def extract(inputs):
                return await extract_and_accumulate(volume, run_id, cfg, image, inputs, record)

            return await rotation_frame(volume, run_id, cfg, image, info, record, log, extract)
        return await _still(volume, run_id, cfg, image, record, log)
    except (JobRejected, StageFailed) as exc:
        record["reason"] = str(exc)
        log.error(f"{image}: {exc}")
        return record
    finally:
        record["seconds"] = round(time.monotonic() - t0, 2)
        atomic_write_json(out_file, record)


async def _rerun_frame_scan_varying(volume: Volume, run_id: str, cfg: DiffuseRunConfig, record: dict,
                                    model: dict) -> dict:
    """Re-extract one merged rotation frame with the sweep's scan-varying model; the record is replaced only when
    every stage succeeded (else the scan-static result stands)."""
    image = record["image"]
    new = {**record, "stage_seconds": dict(record.get("stage_seconds", {}))}
    expt = await frame_experiment(volume, run_id, cfg, image, model, tag=".sv")
    new.update(experiments=expt)
    await extract_and_accumulate(volume, run_id, cfg, image, {"experiments": expt}, new, tag=".sv")
    new["model"] = "scan_varying"
    atomic_write_json(run_dir(volume, run_id) / "stills" / f"{Path(image).stem}.json", new)
    return new


@flow(name="diffuse-merge", flow_run_name="merge-{run_id}")
async def diffuse_merge_flow(run_id: str) -> dict:
    """End of run: merge, relative scaling, merge with scales, absolute scale; outputs to runs/<run>/output."""
    log = get_run_logger()
    volume = Volume(Settings().volume)
    cfg = load_config(volume, run_id)
    rdir = run_dir(volume, run_id)
    records = [json.loads(p.read_text()) for p in sorted((rdir / "stills").glob("*.json"))]
    ok = [r for r in records if r["status"] == "ok"]
    summary: dict[str, Any] = {"run_id": run_id, "stills_total": len(records), "stills_processed": len(ok),
                               "stills_failed": len(records) - len(ok),
                               "failed": {r["image"]: f"{r['status']}: {r['reason']}" for r in records if r["status"] != "ok"},
                               "stage_seconds": {},
                               "background": {"method": "frames" if cfg.background_frames else
                                              "isotropic" if cfg.extractor.get("isotropic_background") else "none",
                                              "n_frames": len(cfg.background_frames)}}
    if not ok:
        raise RuntimeError(f"run {run_id}: no still was processed ({len(records)} failed)")
    if cfg.sweep_scan_varying and any(r.get("kind") == "rotation" for r in ok):
        t = time.monotonic()

        async def rerun(rec, model):
            return await _rerun_frame_scan_varying(volume, run_id, cfg, rec, model)

        summary["sweeps"] = await refine_complete_sweeps(volume, run_id, cfg, ok, log, rerun)
        summary["stage_seconds"]["sweeps_scan_varying"] = round(time.monotonic() - t, 2)
        records = [json.loads(p.read_text()) for p in sorted((rdir / "stills").glob("*.json"))]
        ok = [r for r in records if r["status"] == "ok"]
    summary["frames_processed"] = sum(1 for r in ok if r.get("kind") == "rotation")
    partials = {f"partial{i:05d}": ArtifactRef(**r["partial"]) for i, r in enumerate(ok)}
    # outliers are judged only once the stills are on one scale (unscaled, a bright still is all "outliers")
    merge_params = {"mode": "merge", "symmetry": cfg.symmetry, "reject_sigma": cfg.reject_sigma,
                    "exclude_bragg_voxels": cfg.exclude_bragg_voxels and cfg.subdivisions >= 3}
    t = time.monotonic()
    # the unscaled merge is an intermediate: only its observation table feeds the scaler (no map, statistics, figures)
    first = await run_stage("voxel-merger", partials, {**merge_params, "reject_sigma": None, "figures": False,
                                                       "table_only": True}, run_id,
                            job_id_for(run_id, "merge", "unscaled"),
                            timeout=cfg.stage_timeout_s)
    summary["stage_seconds"]["merge_unscaled"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    # seed 003's references: diffuse voxels and the stills' integrated Bragg reflections (partiality >= P_min)
    scale_inputs: dict[str, Any] = {"observations": ArtifactRef(**first["outputs"]["observations"])}
    if cfg.bragg_in_scaling:
        for i, r in enumerate(ok):
            if r.get("reflections") and r.get("experiments"):
                scale_inputs[f"refl_{i:05d}"] = r["reflections"]
                scale_inputs[f"expt_{i:05d}"] = r["experiments"]
    scale_params = {"mode": "relative", "smoother": cfg.smoother, "partiality_threshold": cfg.partiality_threshold}
    sequences = sweep_sequences(ok)
    if sequences:  # frame scales of a sweep tied along phi; stills keep free scales
        scale_params["sequences"] = sequences
        if cfg.rotation_smoothness is not None:
            scale_params["rotation_smoothness"] = cfg.rotation_smoothness
    if cfg.symmetry or cfg.space_group:
        scale_params["space_group"] = cfg.symmetry or cfg.space_group
    scaled = await run_stage("scaler", scale_inputs, scale_params, run_id,
                             job_id_for(run_id, "scale", "relative"), timeout=cfg.stage_timeout_s)
    summary["stage_seconds"]["scale_relative"] = round(time.monotonic() - t, 2)
    summary["scaling"] = scaled["metrics"]
    t = time.monotonic()
    # scales are keyed by still id (diffractflow.formats.scales): the merge needs no observation table to apply them
    final = await run_stage("voxel-merger", {**partials, "scales": ArtifactRef(**scaled["outputs"]["scales"])},
                            merge_params, run_id, job_id_for(run_id, "merge", "scaled"), timeout=cfg.stage_timeout_s)
    summary["stage_seconds"]["merge_scaled"] = round(time.monotonic() - t, 2)
    summary["merging"] = final["metrics"]
    out = rdir / "output"
    out.mkdir(exist_ok=True)
    if cfg.formula:
        t = time.monotonic()
        abs_inputs = {"map": ArtifactRef(**final["outputs"]["map"])}
        if "bragg_merged" in scaled["outputs"]:
            abs_inputs["bragg"] = ArtifactRef(**scaled["outputs"]["bragg_merged"])
        absolute = await run_stage("scaler", abs_inputs,
                                   {"mode": "absolute", "formula": cfg.formula}, run_id,
                                   job_id_for(run_id, "scale", "absolute"), timeout=cfg.stage_timeout_s)
        summary["stage_seconds"]["scale_absolute"] = round(time.monotonic() - t, 2)
        summary["absolute"] = absolute["metrics"]
        _copy_outputs(volume, absolute["outputs"], out)
    _copy_outputs(volume, final["outputs"], out)
    _copy_outputs(volume, {k: v for k, v in scaled["outputs"].items()}, out)
    summary["outputs"] = sorted(p.name for p in out.iterdir())
    atomic_write_json(out / "run_summary.json", summary)
    log.info(f"run {run_id}: {len(ok)}/{len(records)} stills merged; outputs in {out}")
    if cfg.run_report:
        try:  # the run's page (runs/<run>/report.html) for live runs too; a failure must not fail the run
            log.info(f"run {run_id}: report {await asyncio.to_thread(write_report, rdir)}")
        except Exception as exc:  # noqa: BLE001
            log.warning(f"run {run_id}: report not written ({exc})")
    return summary


def sweep_sequences(records: list[dict]) -> dict[str, list[str]]:
    """Sweep id -> its merged frames in rotation order, named as the observation table names stills
    (``<file name>#<image index>``; each frame is a one-image experiment)."""
    by_sweep: dict[str, list[tuple[int, str]]] = {}
    for r in records:
        if r.get("kind") == "rotation":
            by_sweep.setdefault(r["sweep"], []).append((r.get("frame") or 0, f"{Path(r['image']).name}#0"))
    return {k: [name for _, name in sorted(v)] for k, v in by_sweep.items()}


def _copy_outputs(volume: Volume, outputs: dict, dest: Path) -> None:
    for ref in outputs.values():
        src = volume.open_ref(ArtifactRef(**ref) if isinstance(ref, dict) else ref)
        shutil.copy2(src, dest / src.name)


async def diffuse_on_file(ev: DataEvent) -> Any:
    return await diffuse_still_flow(ev.path, ev.run_id)


async def diffuse_on_end(ev: DataEvent) -> Any:
    return await diffuse_merge_flow(ev.run_id)
