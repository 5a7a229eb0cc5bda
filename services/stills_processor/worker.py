"""Bus handler for stills-processor: the same processing as ``stills-processor run``, in three modes.

``mode="auto"`` (default): inputs ``image0``, ``image1``, ... (image files on the shared volume; a sequence
is given as its frames), routed as ``run`` does (stills one by one, oscillation frames grouped into
sequences). Outputs: ``summary`` (``summary.h5``; its table gives each unit's ``.expt`` / ``.refl`` paths
relative to it) and, for a job of one unit, its DIALS files as outputs ``experiments`` (.expt),
``reflections`` (integrated .refl) and ``indexed`` (indexed strong spots), each when present.

``mode="sequence"``: inputs ``image0..imageN`` are the frames of ONE rotation sweep (possibly only its first
frames), processed as one DIALS sequence: import, spots, indexing (known symmetry), refinement (scan-static,
or static then scan-varying with ``scan_varying``), integration only if ``integrate``. Outputs ``summary``,
and when indexed ``experiments`` (.expt), ``reflections`` and ``indexed`` (both the indexed .refl), plus
``integrated`` (.refl) if integrated. A sweep that does not index is an ``ok`` result without
``experiments`` (metrics ``status``/``reason`` say why): more frames may index later.

``mode="frame_model"``: inputs ``model`` (a sequence .expt from mode ``sequence``) and ``image0`` (one
rotation frame of that sweep, inside or beyond the refined range). Output ``experiments``: a one-image
rotation experiment for the frame (its own imageset and scan from its header, the model's refined beam,
detector and goniometer, a scan-static crystal; see :mod:`stills_processor.core.sweep`). No spot finding.

The worker keeps a persistent pool of DIALS-loaded processes across jobs, so no job pays DIALS' start-up.

The parameters are :class:`stills_processor.core.params.JobParams` (one model per mode, unknown keys
rejected). Bad input (no image inputs, nothing readable, frames that are not one sweep, a frame not of the
model's sweep) raises :class:`diffractflow.errors.InputError` subclasses and is rejected; any other exception
is a failure the runtime retries. A still with too few spots is not an error: status ``non_hit`` in the
metrics and the summary.

Metrics of a one-unit job (mode ``auto`` with one image, mode ``sequence``): ``status`` (indexed / non_hit /
failed), ``reason``, ``kind``, ``n_spots``, ``n_indexed_spots``, ``n_refined``, ``n_integrated``, ``strategy``,
``validation_passed``, ``unit_cell``, ``space_group`` and the RMSDs; every auto job also has the unit counts
(``n_units``, ``n_indexed``, ``n_non_hit``, ``n_failed``, ``n_error``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from dxtbx.model.experiment_list import ExperimentList  # the worker runs DIALS anyway: no need to defer it

from diffractflow.artifacts import atomic_write_path
from diffractflow.errors import InputError
from diffractflow.runtime import JobContext, Stage

from . import __version__
from .batch import default_nproc, run_job, warm_up
from .core.params import FrameModelJob, JobParams, SequenceJob, StillsJob
from .core.routing import SEQUENCE, plan
from .core.sweep import frame_experiment

Params = JobParams  # the worker's parameter model (kept under the name other services use)


def _image_inputs(ctx: JobContext):
    names = [n for n in ctx.job.inputs if re.fullmatch(r"image\d+", n)]
    if not names:
        raise InputError(f"job {ctx.job.job_id} has no image inputs (expected image0, image1, ...; "
                         f"got {sorted(ctx.job.inputs)})")
    names.sort(key=lambda n: int(n[5:]))
    return names


def _finite(v):
    """JSON-safe number: NaN/inf -> None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _unit_metrics(row: dict) -> dict:
    """Per-unit figures of a one-unit job (spots, RMSDs in px and deg, cell in Angstrom/deg)."""
    indexed = row["status"] == "indexed"
    return {
        "status": row["status"], "reason": row["reason"], "kind": row["kind"],
        "n_spots": int(row["n_spots"]), "n_indexed_spots": int(row["n_indexed"]),
        "n_refined": int(row["n_refined"]), "n_integrated": int(row["n_integrated"]),
        "rmsd_x_px": _finite(float(row["rmsd_x_px"])), "rmsd_y_px": _finite(float(row["rmsd_y_px"])),
        "rmsd_z": _finite(float(row["rmsd_z"])),
        "unit_cell": [float(v) for v in row["unit_cell"]] if indexed else None,
        "space_group": row["space_group"] or None,
        "validation_passed": bool(row["validation_passed"]) if indexed else None,
        "strategy": row.get("strategy") or None,
    }


def _register_unit_files(ctx: JobContext, out_dir: Path, row: dict, reflections: str) -> None:
    """Register a unit's DIALS files as job outputs (``reflections`` names the .refl registered under
    output 'reflections': 'refl_path' (integrated) or 'indexed_refl_path')."""
    for name, key in (("experiments", "expt_path"), ("reflections", reflections), ("indexed", "indexed_refl_path")):
        if row.get(key):
            ctx.add_output(name, out_dir / row[key])


def handle(ctx: JobContext, params: JobParams) -> None:
    job = params.root
    if isinstance(job, FrameModelJob):
        return _handle_frame_model(ctx, job)
    if isinstance(job, SequenceJob):
        return _handle_sequence(ctx, job)
    return _handle_auto(ctx, job)


def _handle_auto(ctx: JobContext, params: StillsJob) -> None:
    names = _image_inputs(ctx)
    paths = [ctx.input_path(n) for n in names]
    settings = params.settings()
    hashes = {n: (ctx.job.inputs[n].sha256 or "") for n in names}

    def done(i, row):
        ctx.heartbeat()

    rows, summary, metrics = run_job([str(p) for p in paths], ctx.out_dir, settings,
                                     nproc=params.nproc or default_nproc(), on_done=done, persistent_pool=True,
                                     job_id=ctx.job.job_id, input_hashes=hashes)
    if metrics["n_error"] == len(rows):
        raise InputError("no input could be read: " + "; ".join(r["reason"] for r in rows[:3]))
    ctx.add_output("summary", summary)
    if len(rows) == 1:
        _register_unit_files(ctx, ctx.out_dir, rows[0], "refl_path")
        metrics.update({k: v for k, v in _unit_metrics(rows[0]).items() if k not in metrics})
    ctx.metrics.update({k: _finite(v) for k, v in metrics.items()})


def _handle_sequence(ctx: JobContext, params: SequenceJob) -> None:
    names = _image_inputs(ctx)
    paths = [str(ctx.input_path(n)) for n in names]
    units = plan(paths)
    if len(units) != 1 or units[0].kind != SEQUENCE:
        what = "; ".join(f"{u.kind} {u.name} ({len(u.paths)} file(s)){': ' + u.error if u.error else ''}"
                         for u in units[:4])
        raise InputError(f"mode sequence needs the frames of ONE rotation sweep; {len(paths)} inputs "
                       f"({paths[0]} ...) give {len(units)} unit(s): {what}")
    settings = params.settings()
    hashes = {n: (ctx.job.inputs[n].sha256 or "") for n in names}
    rows, summary, _batch = run_job(paths, ctx.out_dir, settings, nproc=1, job_id=ctx.job.job_id,
                                    input_hashes=hashes, units=units)
    row = rows[0]
    if row["status"] == "error":
        raise InputError(row["reason"])
    ctx.add_output("summary", summary)
    _register_unit_files(ctx, ctx.out_dir, row, "indexed_refl_path")
    if row.get("refl_path"):
        ctx.add_output("integrated", ctx.out_dir / row["refl_path"])
    m = _unit_metrics(row)
    m["n_indexed"] = m["n_indexed_spots"]
    m.update(n_frames=len(paths), rmsd_phi_deg=m["rmsd_z"], seconds=round(float(row["seconds"]), 3))
    if row.get("expt_path") and row["status"] == "indexed":
        e = ExperimentList.from_file(str(ctx.out_dir / row["expt_path"]), check_format=False)[0]
        m.update(image_range=list(e.scan.get_image_range()), oscillation_deg=list(e.scan.get_oscillation()),
                 scan_varying=e.crystal.num_scan_points > 0)
    ctx.metrics.update(m)


def _handle_frame_model(ctx: JobContext, params: FrameModelJob) -> None:
    names = _image_inputs(ctx)
    if "model" not in ctx.job.inputs or names != ["image0"]:
        raise InputError(f"mode frame_model needs inputs 'model' (a sequence .expt) and 'image0' (one frame); "
                       f"got {sorted(ctx.job.inputs)}")
    model, frame = ctx.input_path("model"), ctx.input_path("image0")
    experiments, info = frame_experiment(model, frame)  # FrameMismatch is an InputError: the job is rejected
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    out = ctx.out_dir / f"{frame.name.split('.')[0] or 'frame'}.expt"
    with atomic_write_path(out) as tmp:
        experiments.as_json(str(tmp))
    ctx.add_output("experiments", out)
    xtal = experiments[0].crystal
    ctx.metrics.update(frame_number=info.frame_number, start_angle_deg=info.start_angle_deg,
                       increment_deg=info.increment_deg, phi_centre_deg=info.phi_centre_deg,
                       inside_model_scan=info.inside_model_scan, crystal_source=info.crystal_source,
                       model_image_range=list(info.model_image_range),
                       unit_cell=[float(v) for v in xtal.get_unit_cell().parameters()])


# DIALS imported when the worker starts (~4 s), not by its first job: one-still jobs (nproc 1) run in the worker's
# own process, where nothing else imports it ahead of the first image
STAGE = Stage(service="stills-processor", params_model=Params, handler=handle, version=__version__, warm_up=warm_up)
