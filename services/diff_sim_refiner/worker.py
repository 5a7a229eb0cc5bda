"""Bus handler: render a simulation job to an HDF5 artifact (``serve``).

Job parameters: the simulation config (``crystal``/``detector``/``beam`` sections in API units, or
``nanobragg`` flags); optional inputs ``hkl`` (h k l F text) and ``mat`` (MOSFLM A.mat) from the volume.
Output ``image``: ``simulation.h5`` (schema diffractflow.diff_sim_refiner.simulation v1).
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field

from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__


class Params(BaseModel):
    kind: Literal["simulate", "refine"] = Field(
        "simulate", description="simulate: render to HDF5; refine: refine a model against a target image "
                                "(parameters as diff_sim_refiner.refine.worker.RefineParams)")
    crystal: dict[str, Any] = Field(default_factory=dict, description="CrystalConfig fields (Angstrom, degrees)")
    detector: dict[str, Any] = Field(default_factory=dict, description="DetectorConfig fields (mm)")
    beam: dict[str, Any] = Field(default_factory=dict, description="BeamConfig fields (Angstrom, photons/m^2)")
    nanobragg: Optional[list[str]] = Field(None, description="nanoBragg flags instead of the three sections "
                                                           "(file flags refer to the job's inputs)")
    dtype: Literal["float32", "float64"] = "float32"
    spot_cutoff: Optional[float] = Field(None, gt=0, description="evaluate only within this many fringes of peaks")
    max_pixels: int = Field(20_000_000, gt=0, description="refuse detectors larger than this")


def handle(ctx: JobContext, params: Params) -> None:
    from .nbrun import tune_malloc

    tune_malloc()  # chunk buffers re-used instead of re-faulted, as in `nanobragg` (idempotent)
    if params.kind == "refine":
        from .refine.worker import handle_refine_job

        return handle_refine_job(ctx)
    import torch

    from .artifacts import job_from_mapping, write_simulation
    from .core.io import FormatError
    from .core.simulator import prepare, render
    from .nbargs import FlagError

    inputs = {}
    for name in ("hkl", "mat"):
        if name in ctx.job.inputs:
            inputs[name] = ctx.input_path(name)
    cfg: dict[str, Any]
    if params.nanobragg is not None:
        argv = list(params.nanobragg)
        # file flags name job inputs
        for i, tok in enumerate(argv[:-1]):
            if tok in ("-hkl", "-mat"):
                key = tok[1:]
                if key not in inputs:
                    raise BadInput(f"flag {tok} needs the job input {key!r}")
                argv[i + 1] = str(inputs[key])
        cfg = {"nanobragg": argv}
    else:
        cfg = {"crystal": params.crystal, "detector": params.detector, "beam": params.beam}
    try:
        job = job_from_mapping(cfg, base=ctx.out_dir, inputs=inputs)
    except (FlagError, FormatError, ValueError, TypeError) as exc:
        raise BadInput(f"bad simulation config: {exc}") from exc
    npx = job.detector.fpixels * job.detector.spixels
    if npx > params.max_pixels:
        raise BadInput(f"detector has {npx} pixels, more than max_pixels={params.max_pixels}")
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


STAGE = Stage(service="diff-sim-refiner", params_model=Params, handler=handle, version=__version__)
