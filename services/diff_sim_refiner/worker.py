"""Bus handler (``serve``): ``kind="simulate"`` renders a model to an HDF5 artifact, ``kind="refine"`` refines a model
against a target image (:mod:`diff_sim_refiner.refine.worker`). Parameters: :mod:`diff_sim_refiner.core.params`.

Simulate: the model as ``crystal``/``detector``/``beam`` sections in API units, or ``nanobragg`` flags; optional
inputs ``hkl`` (h k l F text) and ``mat`` (MOSFLM A.mat) from the volume. Output ``image``: ``simulation.h5``
(schema diffractflow.diff_sim_refiner.simulation v1).

Errors: a config the simulator refuses, a bad flag or an unreadable ``hkl``/``mat`` is an input error
(:class:`~diff_sim_refiner.artifacts.ConfigError`, :class:`~diff_sim_refiner.nbargs.FlagError`): the job is rejected.
Anything else (a bug) is a failure that the runtime retries and then dead-letters with its traceback.
"""
from __future__ import annotations

import time

import torch

from diffractflow.runtime import JobContext, Stage

from . import __version__
from .artifacts import job_from_params, write_simulation
from .core.params import DiffSimRefinerParams, RefineParams, SimulateParams
from .core.simulator import prepare, render
from .nbrun import tune_malloc
from .refine.worker import handle_refine

#: the worker's parameter model (kept under the old name for callers)
Params = DiffSimRefinerParams


def handle_simulate(ctx: JobContext, params: SimulateParams) -> None:
    inputs = {name: ctx.input_path(name) for name in ("hkl", "mat") if name in ctx.job.inputs}
    job = job_from_params(params, inputs, base=ctx.out_dir)
    dtype = torch.float64 if params.dtype == "float64" else torch.float32
    t0 = time.perf_counter()
    last = [0.0]

    def beat(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 5.0:
            last[0] = now
            ctx.heartbeat()

    with torch.no_grad():
        p = prepare(job.crystal, job.detector, job.beam, job.hkl, dtype=dtype, spot_cutoff=params.spot_cutoff)
        img = render(p, job.detector, progress=beat)
    seconds = time.perf_counter() - t0
    arr = img.to(torch.float32).numpy()
    out = ctx.out_dir / "simulation.h5"
    write_simulation(out, arr, job, job_id=ctx.job.job_id, extra_metrics={"render_seconds": seconds})
    ctx.add_output("image", out)
    ctx.metrics.update(fpixels=job.detector.fpixels, spixels=job.detector.spixels, sum_photons=float(arr.sum()),
                       max_photons=float(arr.max()), render_seconds=round(seconds, 3),
                       orientations=p.n_orient, oversample=p.oversample)


def handle(ctx: JobContext, params: DiffSimRefinerParams | SimulateParams | RefineParams) -> None:
    p = params.root if isinstance(params, DiffSimRefinerParams) else params
    tune_malloc()  # chunk buffers re-used instead of re-faulted, as in `nanobragg` (idempotent)
    if isinstance(p, RefineParams):
        return handle_refine(ctx, p)
    return handle_simulate(ctx, p)


STAGE = Stage(service="diff-sim-refiner", params_model=DiffSimRefinerParams, handler=handle, version=__version__)

__all__ = ["STAGE", "Params", "handle", "handle_simulate"]
