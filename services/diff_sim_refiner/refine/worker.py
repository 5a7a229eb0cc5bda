"""Bus handler for refinement jobs: refine a simulator model against a target image.

Job inputs: ``target`` (image: .npy / .h5 / .tif / .img / raw .bin, photons, slow x fast), optional
``mask`` (non-zero = use), ``hkl`` (h k l F text) and ``mat`` (MOSFLM A.mat).  Parameters:
:class:`RefineParams` (the starting model as crystal/detector/beam sections or nanoBragg flags,
the groups to refine and optimiser settings).  Output ``model``: ``refined_model.h5`` (schema
``diffractflow.diff_sim_refiner.refinement`` v1), plus ``history`` (JSON) and ``plot`` (PNG).

Hook-up: at the top of ``diff_sim_refiner.worker.handle`` (whose ``Params`` ignores unknown keys):
``if ctx.job.params.get("kind") == "refine": from .refine.worker import handle_refine_job; return
handle_refine_job(ctx)``; or serve the separate stage ``REFINE_STAGE`` defined below.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, field_validator

from diffractflow.runtime import BadInput, JobContext, Stage

from .. import __version__


class RefineParams(BaseModel):
    kind: Literal["refine"] = "refine"
    crystal: dict[str, Any] = Field(default_factory=dict, description="starting CrystalConfig fields (A, deg)")
    detector: dict[str, Any] = Field(default_factory=dict, description="starting DetectorConfig fields (mm)")
    beam: dict[str, Any] = Field(default_factory=dict, description="BeamConfig fields (A, photons/m^2)")
    nanobragg: Optional[list[str]] = Field(None, description="nanoBragg flags instead of the three sections")
    params: list[str] = Field(default_factory=lambda: ["misset", "mosaic"],
                              description="groups: cell, misset, phi, mosaic, N, distance, beam_center, scale")
    optimizer: Literal["adam", "lbfgs", "adam+lbfgs"] = "adam"
    iterations: int = Field(100, ge=0, le=100_000)
    lr: float = Field(0.05, gt=0)
    lbfgs_steps: int = Field(10, ge=0, le=10_000)
    loss: Literal["mse", "poisson"] = "mse"
    init: dict[str, list[float]] = Field(default_factory=dict, description="start values (physical units)")
    bounds: dict[str, list[tuple[float, float]]] = Field(default_factory=dict)
    scale: float = Field(1.0, gt=0, description="starting multiplier of the simulated photons")
    dtype: Literal["float32", "float64"] = "float64"
    max_pixels: int = Field(20_000_000, gt=0, description="refuse detectors larger than this")

    @field_validator("params")
    @classmethod
    def _known(cls, v):
        from .params import parse_param_list

        return parse_param_list(v)


def handle_refine(ctx: JobContext, params: RefineParams) -> None:
    import time

    import numpy as np
    import torch

    from diffractflow.artifacts import sha256_file

    from ..artifacts import job_from_mapping
    from ..core.io import FormatError
    from ..nbargs import FlagError
    from .artifacts import plot_convergence, write_history, write_refinement
    from .images import read_image, read_mask
    from .refiner import Refiner, RefinementError, RefineSettings

    target_path = ctx.input_path("target")
    inputs = {n: ctx.input_path(n) for n in ("hkl", "mat", "mask") if n in ctx.job.inputs}
    if params.nanobragg is not None:
        argv = list(params.nanobragg)
        for i, tok in enumerate(argv[:-1]):
            if tok in ("-hkl", "-mat"):
                if tok[1:] not in inputs:
                    raise BadInput(f"flag {tok} needs the job input {tok[1:]!r}")
                argv[i + 1] = str(inputs[tok[1:]])
        cfg: dict = {"nanobragg": argv}
    else:
        cfg = {"crystal": params.crystal, "detector": params.detector, "beam": params.beam}
    try:
        job = job_from_mapping(cfg, base=ctx.out_dir, inputs={k: v for k, v in inputs.items() if k != "mask"})
    except (FlagError, FormatError, ValueError, TypeError) as exc:
        raise BadInput(f"bad model config: {exc}") from exc
    shape = (job.detector.spixels, job.detector.fpixels)
    if shape[0] * shape[1] > params.max_pixels:
        raise BadInput(f"detector has {shape[0] * shape[1]} pixels, more than max_pixels={params.max_pixels}")
    try:
        target = read_image(target_path, shape).astype(np.float64)
        mask = read_mask(inputs["mask"], shape) if "mask" in inputs else None
        settings = RefineSettings(optimizer=params.optimizer, iterations=params.iterations, lr=params.lr,
                                  lbfgs_steps=params.lbfgs_steps)
        refiner = Refiner(job.crystal, job.detector, job.beam, target, params.params, hkl=job.hkl, mask=mask,
                          init=params.init, bounds={k: [tuple(b) for b in v] for k, v in params.bounds.items()},
                          scale=params.scale, loss=params.loss,
                          dtype=torch.float64 if params.dtype == "float64" else torch.float32)
    except (FormatError, ValueError) as exc:
        raise BadInput(str(exc)) from exc
    last = [time.perf_counter()]

    def beat(it, loss, values):
        now = time.perf_counter()
        if now - last[0] > 5.0:
            last[0] = now
            ctx.heartbeat()

    try:
        result = refiner.run(settings, callback=beat)
    except RefinementError as exc:
        raise BadInput(f"refinement failed: {exc}") from exc
    out = ctx.out_dir
    hashes = {"target": sha256_file(target_path), **{k: sha256_file(v) for k, v in inputs.items()}}
    write_refinement(out / "refined_model.h5", result, refiner.model_image(), target, refiner.mask.numpy(),
                     job_id=ctx.job.job_id, inputs=hashes)
    write_history(out / "history.json", result.history)
    plot_convergence(result, out / "convergence.png")
    ctx.add_output("model", out / "refined_model.h5")
    ctx.add_output("history", out / "history.json")
    ctx.add_output("plot", out / "convergence.png")
    ctx.metrics.update(loss_initial=result.loss_initial, loss_final=result.loss_final,
                       iterations=result.iterations, evaluations=result.evaluations,
                       wall_seconds=round(result.wall_seconds, 3), refined=result.final)


def handle_refine_job(ctx: JobContext) -> None:
    """Validate ``ctx.job.params`` as :class:`RefineParams` (bad params -> BadInput) and run the refinement."""
    from pydantic import ValidationError

    try:
        params = RefineParams.model_validate(ctx.job.params)
    except ValidationError as exc:
        raise BadInput(f"bad refinement parameters: {exc}") from exc
    handle_refine(ctx, params)


REFINE_STAGE = Stage(service="diff-sim-refiner-refine", params_model=RefineParams, handler=handle_refine,
                     version=__version__)

__all__ = ["RefineParams", "handle_refine", "handle_refine_job", "REFINE_STAGE"]
