"""Bus handler: one job = one .expt (+ optional .refl / background) -> one HDF5 per selected still."""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__


class Params(BaseModel):
    """Stage parameters (units as in ``diffuse-extractor run --help``)."""

    image_indices: List[int] = Field(default_factory=lambda: [0], description="experiment indices in the .expt")
    all_images: bool = False
    beamstop: Union[Literal["auto", "none"], List[str]] = "auto"
    detect_arm: bool = True
    mask_shapes: List[str] = Field(default_factory=list)
    bragg_radius_px: Optional[float] = Field(None, gt=0)
    bragg_delpsi_max: float = Field(0.003, gt=0, le=0.1)
    outlier_nsigma: Optional[float] = Field(8.0, gt=0)
    gain: float = Field(1.0, gt=0)
    air_path_fraction: float = Field(1.0, ge=0, le=1)
    background_scale: float = 1.0
    hot_dead: bool = True
    pngs: bool = True

    @field_validator("mask_shapes")
    @classmethod
    def _shapes_parse(cls, v):
        from .core.masks import Shape

        for t in v:
            Shape.parse(t)
        return v

    @field_validator("beamstop")
    @classmethod
    def _bs_parse(cls, v):
        from .core.masks import Shape

        if isinstance(v, list):
            for t in v:
                Shape.parse(t)
        return v


def handle(ctx: JobContext, params: Params) -> None:
    """Inputs: ``experiments`` (.expt, required), ``reflections`` (.refl), ``background`` (image)."""
    from . import pipeline
    from .artifacts import InputError, load_experiments
    from .core.extract import ExtractionParams
    from .core.masks import Shape

    expt = ctx.input_path("experiments")
    refl = ctx.input_path("reflections") if "reflections" in ctx.job.inputs else None
    bkg = ctx.input_path("background") if "background" in ctx.job.inputs else None
    bs = params.beamstop if isinstance(params.beamstop, str) else [Shape.parse(t) for t in params.beamstop]
    ep = ExtractionParams(beamstop=bs, detect_arm=params.detect_arm,
                          user_shapes=[Shape.parse(t) for t in params.mask_shapes],
                          bragg_radius_px=params.bragg_radius_px, bragg_delpsi_max=params.bragg_delpsi_max,
                          outlier_nsigma=params.outlier_nsigma, gain=params.gain,
                          air_path_fraction=params.air_path_fraction, background_scale=params.background_scale)
    try:
        indices = list(range(len(load_experiments(expt)))) if params.all_images else params.image_indices
        results = pipeline.process(expt, ctx.out_dir, refl_path=refl, image_indices=indices, params=ep,
                                   background_path=bkg, hot_dead=params.hot_dead, pngs=params.pngs,
                                   job_id=ctx.job.job_id, progress=ctx.heartbeat)
    except (InputError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    for r in results:
        ctx.add_output(f"still_{r['index']:04d}", r["artifact"])
        for name, p in r.get("pngs", {}).items():
            ctx.add_output(f"still_{r['index']:04d}_{name}_png", p)
    ctx.metrics["n_stills"] = len(results)
    ctx.metrics["n_pixels"] = int(sum(r["n_pixels"] for r in results))
    ctx.metrics["n_masked_bragg"] = int(sum(r.get("n_masked_bragg", 0) for r in results))


def warm_up() -> None:
    """Import the extraction stack and load its compiled kernels once, when the worker starts (``serve``), so
    that the first job does not pay for it (~0.6 s)."""
    from . import pipeline

    pipeline.warm_up()


STAGE = Stage(service="diffuse-extractor", params_model=Params, handler=handle, version=__version__,
              warm_up=warm_up)
