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
"""
from __future__ import annotations

import re
import math
from pathlib import Path
from typing import List, Literal, Optional

from pydantic import BaseModel, Field, field_validator

from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__


class Params(BaseModel):
    space_group: Optional[str] = Field(None, description="known space group for indexing, e.g. P41212")
    unit_cell: Optional[List[float]] = Field(None, min_length=6, max_length=6,
                                             description="known cell a,b,c (Angstrom), alpha,beta,gamma (deg)")
    phil: List[str] = Field(default_factory=list, description="DIALS parameters KEY=VALUE")
    nproc: int = Field(0, ge=0, le=256, description="worker processes (0 = all CPUs)")
    min_spots: int = Field(16, ge=1, description="fewer strong spots: a non-hit")
    q_tolerance: float = Field(0.005, gt=0, description="validation bound, median |dq| (1/Angstrom)")
    px_tolerance: float = Field(2.0, gt=0, description="validation bound, median detector offset (px)")
    strategies: Optional[List[str]] = Field(None, description="processing strategies tried in order on a still "
                                            "(default: all of core.params.STRATEGIES)")
    relaxed_sigma_b: float = Field(0.5, ge=0, description="integrate a still whose profile sigma_b exceeds DIALS' "
                                   "0.1 deg cut-off if below this (deg; 0 = never)")
    mode: Literal["auto", "sequence", "frame_model"] = Field(
        "auto", description="auto: route the images (stills / sequences) as `run` does; sequence: the images are "
        "the frames of ONE rotation sweep, indexed and refined as one sequence; frame_model: a one-image "
        "rotation experiment for image0 from the sweep model given as input 'model'")
    scan_varying: bool = Field(False, description="mode sequence: refine static, then with a scan-varying "
                               "crystal/beam (dials.refine's default for sequences); False: scan-static only. "
                               "(mode auto keeps dials.refine's default)")
    integrate: bool = Field(False, description="mode sequence: also integrate the Bragg reflections "
                            "(not needed for diffuse extraction); mode auto always integrates")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, v):
        if v is None:
            return v
        from .core.params import check_strategies

        return list(check_strategies(v))

    @field_validator("space_group")
    @classmethod
    def _sg(cls, v):
        if v is None:
            return v
        from .core.params import check_space_group

        return check_space_group(v)

    @field_validator("unit_cell")
    @classmethod
    def _uc(cls, v):
        if v is None:
            return v
        from .core.params import parse_unit_cell

        return list(parse_unit_cell(",".join(str(x) for x in v)))

    @field_validator("phil")
    @classmethod
    def _phil(cls, v):
        from .core.params import ProcessingSettings, validate_phil

        validate_phil(ProcessingSettings(phil=tuple(v)))
        return v


def _image_inputs(ctx: JobContext):
    names = [n for n in ctx.job.inputs if re.fullmatch(r"image\d+", n)]
    if not names:
        raise BadInput(f"job {ctx.job.job_id} has no image inputs (expected image0, image1, ...; "
                       f"got {sorted(ctx.job.inputs)})")
    names.sort(key=lambda n: int(n[5:]))
    return names


def _settings(params: Params, **extra):
    from .core.params import DEFAULT_STRATEGIES, ProcessingSettings, Symmetry

    return ProcessingSettings(
        symmetry=Symmetry(params.space_group, tuple(params.unit_cell) if params.unit_cell else None),
        phil=tuple(params.phil), min_spots=params.min_spots, q_tolerance=params.q_tolerance,
        px_tolerance=params.px_tolerance,
        strategies=tuple(params.strategies) if params.strategies else DEFAULT_STRATEGIES,
        relaxed_sigma_b_cutoff=params.relaxed_sigma_b or None, **extra)


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
    }


def _register_unit_files(ctx: JobContext, out_dir: Path, row: dict, reflections: str) -> None:
    """Register a unit's DIALS files as job outputs (``reflections`` names the .refl registered under
    output 'reflections': 'refl_path' (integrated) or 'indexed_refl_path')."""
    for name, key in (("experiments", "expt_path"), ("reflections", reflections), ("indexed", "indexed_refl_path")):
        if row.get(key):
            ctx.add_output(name, out_dir / row[key])


def handle(ctx: JobContext, params: Params) -> None:
    if params.mode == "frame_model":
        return _handle_frame_model(ctx, params)
    if params.mode == "sequence":
        return _handle_sequence(ctx, params)
    return _handle_auto(ctx, params)


def _handle_auto(ctx: JobContext, params: Params) -> None:
    from .batch import default_nproc, run_job

    names = _image_inputs(ctx)
    paths = [ctx.input_path(n) for n in names]
    settings = _settings(params)
    hashes = {n: (ctx.job.inputs[n].sha256 or "") for n in names}

    def done(i, row):
        ctx.heartbeat()

    rows, summary, metrics = run_job([str(p) for p in paths], ctx.out_dir, settings,
                                     nproc=params.nproc or default_nproc(), on_done=done, persistent_pool=True,
                                     job_id=ctx.job.job_id, input_hashes=hashes)
    if metrics["n_error"] == len(rows):
        raise BadInput("no input could be read: " + "; ".join(r["reason"] for r in rows[:3]))
    ctx.add_output("summary", summary)
    if len(rows) == 1:
        _register_unit_files(ctx, ctx.out_dir, rows[0], "refl_path")
        metrics.update({k: v for k, v in _unit_metrics(rows[0]).items() if k not in metrics})
    ctx.metrics.update({k: _finite(v) for k, v in metrics.items()})


def _handle_sequence(ctx: JobContext, params: Params) -> None:
    from .batch import run_job
    from .core.routing import SEQUENCE, plan

    names = _image_inputs(ctx)
    paths = [str(ctx.input_path(n)) for n in names]
    units = plan(paths)
    if len(units) != 1 or units[0].kind != SEQUENCE:
        what = "; ".join(f"{u.kind} {u.name} ({len(u.paths)} file(s)){': ' + u.error if u.error else ''}"
                         for u in units[:4])
        raise BadInput(f"mode sequence needs the frames of ONE rotation sweep; {len(paths)} inputs "
                       f"({paths[0]} ...) give {len(units)} unit(s): {what}")
    settings = _settings(params, scan_varying=params.scan_varying, integrate_sequences=params.integrate)
    hashes = {n: (ctx.job.inputs[n].sha256 or "") for n in names}
    rows, summary, _batch = run_job(paths, ctx.out_dir, settings, nproc=1, job_id=ctx.job.job_id,
                                    input_hashes=hashes, units=units)
    row = rows[0]
    if row["status"] == "error":
        raise BadInput(row["reason"])
    ctx.add_output("summary", summary)
    _register_unit_files(ctx, ctx.out_dir, row, "indexed_refl_path")
    if row.get("refl_path"):
        ctx.add_output("integrated", ctx.out_dir / row["refl_path"])
    m = _unit_metrics(row)
    m["n_indexed"] = m["n_indexed_spots"]
    m.update(n_frames=len(paths), rmsd_phi_deg=m["rmsd_z"], seconds=round(float(row["seconds"]), 3))
    if row.get("expt_path") and row["status"] == "indexed":
        from dxtbx.model.experiment_list import ExperimentList

        e = ExperimentList.from_file(str(ctx.out_dir / row["expt_path"]), check_format=False)[0]
        m.update(image_range=list(e.scan.get_image_range()), oscillation_deg=list(e.scan.get_oscillation()),
                 scan_varying=e.crystal.num_scan_points > 0)
    ctx.metrics.update(m)


def _handle_frame_model(ctx: JobContext, params: Params) -> None:
    from diffractflow.artifacts import atomic_write_path

    from .core.sweep import FrameMismatch, frame_experiment

    names = _image_inputs(ctx)
    if "model" not in ctx.job.inputs or names != ["image0"]:
        raise BadInput(f"mode frame_model needs inputs 'model' (a sequence .expt) and 'image0' (one frame); "
                       f"got {sorted(ctx.job.inputs)}")
    model, frame = ctx.input_path("model"), ctx.input_path("image0")
    try:
        experiments, info = frame_experiment(model, frame)
    except FrameMismatch as exc:
        raise BadInput(str(exc)) from exc
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


STAGE = Stage(service="stills-processor", params_model=Params, handler=handle, version=__version__)
