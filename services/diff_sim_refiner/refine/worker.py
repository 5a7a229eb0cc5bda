"""Bus handler for refinement jobs (``kind="refine"`` of the service's one stage): refine a simulator model against a
target image.

Job inputs: ``target`` (image: .npy / .h5 / .tif / .img / raw .bin, photons, slow x fast), optional ``mask``
(non-zero = use), ``hkl`` (h k l F text) and ``mat`` (MOSFLM A.mat). Parameters:
:class:`~diff_sim_refiner.core.params.RefineParams`. Output ``model``: ``refined_model.h5`` (schema
``diffractflow.diff_sim_refiner.refinement`` v1), plus ``history`` (JSON) and ``plot`` (PNG).

Errors: an unusable model config, an unreadable or mis-shaped target or mask, and a choice of groups the model
cannot refine are input errors (rejected). A refinement whose loss or gradient turns non-finite
(:class:`~.refiner.RefinementError`) is a failure: it may come from the data (a start far from the truth, a large
``lr``) as well as from a numerical bug, so it is retried and then dead-lettered with its traceback, not taken as bad
input.
"""
from __future__ import annotations

import time

import numpy as np

from diffractflow.artifacts import sha256_file
from diffractflow.errors import InputError
from diffractflow.runtime import JobContext

from ..artifacts import job_from_params
from ..core.io import FormatError
from ..core.params import RefineParams
from .artifacts import plot_convergence, write_history, write_refinement
from .images import read_image, read_mask
from .refiner import Refiner, RefineSettings


class RefineInputError(InputError):
    """The target, mask or chosen groups cannot be refined as given (message names the file or the group)."""


def handle_refine(ctx: JobContext, params: RefineParams) -> None:
    target_path = ctx.input_path("target")
    inputs = {n: ctx.input_path(n) for n in ("hkl", "mat", "mask") if n in ctx.job.inputs}
    job = job_from_params(params, inputs, base=ctx.out_dir)
    shape = (job.detector.spixels, job.detector.fpixels)
    try:
        target = read_image(target_path, shape).astype(np.float64)
        mask = read_mask(inputs["mask"], shape) if "mask" in inputs else None
    except FormatError as exc:   # core.io's reader error is not an InputError subclass; the message names the file
        raise RefineInputError(str(exc)) from exc
    # ranges and choices are already the model's (RefineParams), so the settings cannot refuse them
    settings = RefineSettings.from_params(params)
    try:
        refiner = Refiner.from_params(job.crystal, job.detector, job.beam, target, params, hkl=job.hkl, mask=mask)
    except ValueError as exc:
        # The constructor only checks its arguments against the model (nothing is rendered yet) and raises
        # ValueError for each refusal: a mask selecting no pixel, a start outside its bounds, cell refinement of a
        # MOSFLM-matrix crystal, mosaic refinement with one domain...
        raise RefineInputError(f"cannot refine {', '.join(params.params)}: {exc}") from exc
    last = [time.perf_counter()]

    def beat(it, loss, values):
        now = time.perf_counter()
        if now - last[0] > 5.0:
            last[0] = now
            ctx.heartbeat()

    result = refiner.run(settings, callback=beat)   # RefinementError: a failure (see the module's docstring)
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


__all__ = ["RefineParams", "RefineInputError", "handle_refine"]
