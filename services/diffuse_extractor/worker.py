"""Bus handler: ``mode="extract"`` (one .expt (+ optional .refl / background) -> one HDF5 per selected still) or
``mode="background"`` (background-only frames -> one background artifact). Parameters: :mod:`.core.params`.

Errors: an input error (:class:`diffuse_extractor.artifacts.InputError`, a bad volume path) rejects the job; anything
else (a bug, a DIALS failure) is a failure that the runtime retries and then dead-letters with its traceback."""
from __future__ import annotations

from diffractflow.artifacts import VolumeError
from diffractflow.runtime import JobContext, Stage

from . import __version__, pipeline
from .artifacts import InputError, load_experiments
from .core.params import BackgroundJob, ExtractJob, ExtractorParams, extraction_params

#: the worker's parameter model (kept under the old name for callers)
Params = ExtractorParams


def _frame_order(name: str) -> int:
    try:
        return int(name[len("frame"):])
    except ValueError:
        return 10 ** 9


def _run_record(ctx: JobContext, name: str, ref: str | None):
    """The run-level record ``ref`` (parameter ``name``, relative to the volume) as a path, or None; outside the
    volume: bad input naming the parameter."""
    if not ref:
        return None
    try:
        return ctx.volume.resolve(ref)
    except VolumeError as exc:
        raise InputError(f"{name}: {exc}") from exc


def _background(ctx: JobContext, job: BackgroundJob) -> None:
    names = sorted((n for n in ctx.job.inputs if n.startswith("frame")), key=_frame_order)
    if not names:
        raise InputError("mode=background needs inputs frame0, frame1, ... (background-only frames)")
    path, info = pipeline.make_background([ctx.input_path(n) for n in names], ctx.out_dir / "background.h5", job,
                                          job_id=ctx.job.job_id,
                                          beamstop_record=_run_record(ctx, "beamstop_record", job.beamstop_record))
    ctx.add_output("background", path)
    ctx.metrics["n_frames"] = len(names)
    ctx.metrics["background_mean_counts_per_frame"] = float(info["mean_counts_per_frame"])


def handle(ctx: JobContext, params: ExtractorParams) -> None:
    """Inputs: ``experiments`` (.expt, required), ``reflections`` (.refl), ``background`` (image or background
    artifact); with ``mode="background"``: ``frame0``, ``frame1``, ... (background-only frames)."""
    job = params.root
    if isinstance(job, BackgroundJob):
        _background(ctx, job)
        return
    _extract(ctx, job)


def _extract(ctx: JobContext, job: ExtractJob) -> None:
    if "experiments" not in ctx.job.inputs:
        raise InputError("mode=extract needs the input 'experiments' (.expt)")
    expt = ctx.input_path("experiments")
    refl = ctx.input_path("reflections") if "reflections" in ctx.job.inputs else None
    bkg = ctx.input_path("background") if "background" in ctx.job.inputs else None
    indices = list(range(len(load_experiments(expt)))) if job.all_images else job.image_indices
    stats_path = _run_record(ctx, "pixel_stats", job.pixel_stats)
    results = pipeline.process(expt, ctx.out_dir, refl_path=refl, image_indices=indices, params=extraction_params(job),
                               background_path=bkg, hot_dead=job.hot_dead, pngs=job.pngs, job_id=ctx.job.job_id,
                               progress=ctx.heartbeat,
                               run_key=ctx.job.run_id if job.beamstop_per_run and ctx.job.run_id != "adhoc" else None,
                               pixel_stats=stats_path, pixel_stats_min_stills=job.pixel_stats_min_stills,
                               beamstop_record=_run_record(ctx, "beamstop_record", job.beamstop_record))
    for r in results:
        ctx.add_output(f"still_{r['index']:04d}", r["artifact"])
        for name, p in r.get("pngs", {}).items():
            ctx.add_output(f"still_{r['index']:04d}_{name}_png", p)
    #: the per-still tables among the outputs, in order (the rest are figures): what a flow passes on
    ctx.metrics["tables"] = [f"still_{r['index']:04d}" for r in results]
    ctx.metrics["n_stills"] = len(results)
    ctx.metrics["n_pixels"] = int(sum(r["n_pixels"] for r in results))
    ctx.metrics["n_masked_bragg"] = int(sum(r.get("n_masked_bragg", 0) for r in results))
    ctx.metrics["background_method"] = results[0].get("background_method", "none") if results else "none"
    radii = [r["bragg_radius_px"] for r in results if r.get("bragg_radius_px") is not None]
    if radii:
        ctx.metrics["bragg_radius_px"] = float(max(radii))


def warm_up() -> None:
    """Import the extraction stack and load its compiled kernels once, when the worker starts (``serve``), so
    that the first job does not pay for it: the kernels (~0.6 s) and what the first experiment list, Bragg
    prediction and background statistics import (dxtbx models, DIALS' reflection table, scipy.stats: ~4 CPU-s
    of the first job of a fresh process on a sweep frame, 0.23 CPU-s for the next ones)."""
    pipeline.warm_up()
    import dials.array_family.flex  # noqa: F401
    import dxtbx.model.experiment_list  # noqa: F401
    import scipy.stats  # noqa: F401


STAGE = Stage(service="diffuse-extractor", params_model=Params, handler=handle, version=__version__,
              warm_up=warm_up)
