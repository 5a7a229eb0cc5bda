"""Bus handler: one job = one .expt (+ optional .refl / background) -> one HDF5 per selected still."""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator

from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__


class Params(BaseModel):
    """Stage parameters (units as in ``diffuse-extractor run --help``).

    ``mode``: "extract" (inputs ``experiments`` [+ ``reflections``, ``background``]: one artifact per
    still) or "background" (inputs ``frame0``, ``frame1``, ...: background-only frames -> one
    background artifact, output ``background``, to pass as the ``background`` input of extractions).
    """

    mode: Literal["extract", "background"] = "extract"
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
    #: "isotropic": subtract the per-still isotropic B(|q|) (always computed and reported); "none":
    #: nothing unless a ``background`` input (image or background artifact) is given
    background: Literal["none", "isotropic"] = "none"
    #: DIALS' Lorentz factor for rotation frames (off: diffuse pixels need none; stills never get one)
    lorentz: bool = False
    #: with beamstop="auto": the beamstop found in a run's first still (on this worker) serves the run's later
    #: stills (jobs with the same run_id), as within a multi-still job; False searches every still
    beamstop_per_run: bool = True
    #: the run's running pixel statistics file, relative to the volume root (e.g. "runs/RUN/pixel_stats.h5"):
    #: each still is added to it and, from the pixel_stats_min_stills-th still on, hot/dead pixels are masked
    pixel_stats: Optional[str] = None
    pixel_stats_min_stills: int = Field(3, ge=2)
    background_bin_px: int = Field(8, ge=1, le=256, description="mode=background: bin size (pixels)")
    background_smooth_bins: float = Field(0.5, ge=0, le=50, description="mode=background: Gaussian sigma (bins)")
    background_outlier_nsigma: float = Field(6.0, gt=0, description="mode=background: outlier cut (Poisson sigmas)")
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


def _frame_order(name: str) -> int:
    try:
        return int(name[len("frame"):])
    except ValueError:
        return 10 ** 9


def handle(ctx: JobContext, params: Params) -> None:
    """Inputs: ``experiments`` (.expt, required), ``reflections`` (.refl), ``background`` (image or background
    artifact); with ``mode="background"``: ``frame0``, ``frame1``, ... (background-only frames)."""
    from . import pipeline
    from .artifacts import InputError, load_experiments
    from .core.extract import ExtractionParams
    from .core.masks import Shape

    if params.mode == "background":
        names = sorted((n for n in ctx.job.inputs if n.startswith("frame")), key=_frame_order)
        if not names:
            raise BadInput("mode=background needs inputs frame0, frame1, ... (background-only frames)")
        bs = params.beamstop if isinstance(params.beamstop, str) else [Shape.parse(t) for t in params.beamstop]
        ep = ExtractionParams(beamstop=bs, detect_arm=params.detect_arm,
                              user_shapes=[Shape.parse(t) for t in params.mask_shapes], gain=params.gain)
        try:
            path, info = pipeline.make_background([ctx.input_path(n) for n in names], ctx.out_dir / "background.h5",
                                                  bin_px=params.background_bin_px,
                                                  smooth_bins=params.background_smooth_bins,
                                                  outlier_nsigma=params.background_outlier_nsigma, gain=params.gain,
                                                  params=ep, job_id=ctx.job.job_id)
        except (InputError, ValueError) as exc:
            raise BadInput(str(exc)) from exc
        ctx.add_output("background", path)
        ctx.metrics["n_frames"] = len(names)
        ctx.metrics["background_mean_counts_per_frame"] = float(info["mean_counts_per_frame"])
        return
    if "experiments" not in ctx.job.inputs:
        raise BadInput("mode=extract needs the input 'experiments' (.expt)")
    expt = ctx.input_path("experiments")
    refl = ctx.input_path("reflections") if "reflections" in ctx.job.inputs else None
    bkg = ctx.input_path("background") if "background" in ctx.job.inputs else None
    bs = params.beamstop if isinstance(params.beamstop, str) else [Shape.parse(t) for t in params.beamstop]
    ep = ExtractionParams(beamstop=bs, detect_arm=params.detect_arm,
                          user_shapes=[Shape.parse(t) for t in params.mask_shapes],
                          bragg_radius_px=params.bragg_radius_px, bragg_delpsi_max=params.bragg_delpsi_max,
                          outlier_nsigma=params.outlier_nsigma, gain=params.gain,
                          air_path_fraction=params.air_path_fraction, background_scale=params.background_scale,
                          lorentz=params.lorentz, isotropic_background=params.background == "isotropic")
    try:
        indices = list(range(len(load_experiments(expt)))) if params.all_images else params.image_indices
        stats_path = None
        if params.pixel_stats:
            try:
                stats_path = ctx.volume.resolve(params.pixel_stats)
            except Exception as exc:  # noqa: BLE001 - VolumeError: outside the volume
                raise BadInput(f"pixel_stats: {exc}") from exc
        results = pipeline.process(expt, ctx.out_dir, refl_path=refl, image_indices=indices, params=ep,
                                   background_path=bkg, hot_dead=params.hot_dead, pngs=params.pngs,
                                   job_id=ctx.job.job_id, progress=ctx.heartbeat,
                                   run_key=ctx.job.run_id if params.beamstop_per_run and ctx.job.run_id != "adhoc"
                                   else None, pixel_stats=stats_path,
                                   pixel_stats_min_stills=params.pixel_stats_min_stills)
    except (InputError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    for r in results:
        ctx.add_output(f"still_{r['index']:04d}", r["artifact"])
        for name, p in r.get("pngs", {}).items():
            ctx.add_output(f"still_{r['index']:04d}_{name}_png", p)
    ctx.metrics["n_stills"] = len(results)
    ctx.metrics["n_pixels"] = int(sum(r["n_pixels"] for r in results))
    ctx.metrics["n_masked_bragg"] = int(sum(r.get("n_masked_bragg", 0) for r in results))
    ctx.metrics["background_method"] = results[0].get("background_method", "none") if results else "none"
    radii = [r["bragg_radius_px"] for r in results if r.get("bragg_radius_px") is not None]
    if radii:
        ctx.metrics["bragg_radius_px"] = float(max(radii))


def warm_up() -> None:
    """Import the extraction stack and load its compiled kernels once, when the worker starts (``serve``), so
    that the first job does not pay for it (~0.6 s)."""
    from . import pipeline

    pipeline.warm_up()


STAGE = Stage(service="diffuse-extractor", params_model=Params, handler=handle, version=__version__,
              warm_up=warm_up)
