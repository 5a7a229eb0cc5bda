"""Bus handler for stills-processor: the same processing as ``stills-processor run``.

A job is one image or a batch: inputs named ``image0``, ``image1``, ... (each an image file on the
shared volume; a sequence is given as its frames). Outputs in the job directory: ``summary.h5``
(registered as output ``summary``; its table gives each unit's ``.expt`` / ``.refl`` paths relative
to it) plus the per-unit DIALS files. The worker keeps a persistent pool of DIALS-loaded processes
across jobs, so no job pays DIALS' start-up.
"""
from __future__ import annotations

import re
from typing import List, Optional

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


def handle(ctx: JobContext, params: Params) -> None:
    from .batch import default_nproc, run_job
    from .core.params import DEFAULT_STRATEGIES, ProcessingSettings, Symmetry

    names = _image_inputs(ctx)
    paths = [ctx.input_path(n) for n in names]
    settings = ProcessingSettings(
        symmetry=Symmetry(params.space_group, tuple(params.unit_cell) if params.unit_cell else None),
        phil=tuple(params.phil), min_spots=params.min_spots, q_tolerance=params.q_tolerance,
        px_tolerance=params.px_tolerance,
        strategies=tuple(params.strategies) if params.strategies else DEFAULT_STRATEGIES,
        relaxed_sigma_b_cutoff=params.relaxed_sigma_b or None)
    hashes = {n: (ctx.job.inputs[n].sha256 or "") for n in names}

    def done(i, row):
        ctx.heartbeat()

    rows, summary, metrics = run_job([str(p) for p in paths], ctx.out_dir, settings,
                                     nproc=params.nproc or default_nproc(), on_done=done, persistent_pool=True,
                                     job_id=ctx.job.job_id, input_hashes=hashes)
    if metrics["n_error"] == len(rows):
        raise BadInput("no input could be read: " + "; ".join(r["reason"] for r in rows[:3]))
    ctx.add_output("summary", summary)
    ctx.metrics.update(metrics)


STAGE = Stage(service="stills-processor", params_model=Params, handler=handle, version=__version__)
