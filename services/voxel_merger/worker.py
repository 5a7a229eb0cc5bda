"""Bus handler of the voxel merger: ``accumulate`` one still, ``merge`` partials, or ``run`` end to end.

Parameters: :mod:`voxel_merger.core.params` (one model per job kind, chosen by ``mode``). Inputs: accumulate:
``still`` + ``grid`` (JSON), or the ``grid`` / ``grid_spec`` parameter; merge: ``partial*`` (+ optional ``scales``,
and ``observations`` whose still_names map integer scale keys); run: ``still*`` (+ optional ``scales``).

Errors: :class:`voxel_merger.artifacts.InputError` (the platform's input error) rejects the job; anything else is
a failure that the runtime retries and then dead-letters with its traceback."""
from __future__ import annotations

import numpy as np

from diffractflow import figure_process
from diffractflow.runtime import JobContext, Stage

from . import __version__
from .core import accumulate, kernels
from .artifacts import InputError, read_grid
from .core.grid import GlobalGrid, grid_from_spec
from .core.params import (AccumulateParams, MergeParams, RunParams, VoxelMergerParams, merge_options,
                          merge_reject_sigma)
from .pipeline import accumulate_one, check_subdivisions, merge_partials, run

#: the worker's parameter model (kept under the old name for callers)
Params = VoxelMergerParams


def _accumulate(ctx: JobContext, params: AccumulateParams, hashes: dict) -> None:
    check_subdivisions(params.subdivisions)
    opt = merge_options(params)
    still = ctx.input_path("still")
    if params.grid is not None:
        try:
            grid = GlobalGrid.from_dict(params.grid)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"params.grid is not a grid definition (GlobalGrid.to_dict): {exc}") from exc
    elif params.grid_spec is not None:
        try:
            grid = grid_from_spec(params.grid_spec)
        except ValueError as exc:  # grid_from_spec checks the spec and names it
            raise InputError(str(exc)) from exc
        if opt.d_min is None:  # the run's resolution limit also cuts the observations, not only the box
            opt.d_min = float(params.grid_spec["d_min"])
    elif "grid" in ctx.job.inputs:
        grid = read_grid(ctx.input_path("grid"))
    else:
        raise InputError("accumulate mode needs a 'grid' input (JSON) or the grid or grid_spec parameter")
    out = ctx.out_dir / "partial.h5"
    info = accumulate_one(still, grid, out, opt, input_hashes=hashes, job_id=ctx.job.job_id, heartbeat=ctx.heartbeat)
    ctx.add_output("partial", out)
    ctx.metrics.update(info)


def handle(ctx: JobContext, params: VoxelMergerParams) -> None:
    p = params.root
    hashes = {n: ref.sha256 for n, ref in ctx.job.inputs.items() if getattr(ref, "sha256", None)}
    if isinstance(p, AccumulateParams):
        return _accumulate(ctx, p, hashes)
    scales = ctx.input_path("scales") if "scales" in ctx.job.inputs else None
    if isinstance(p, MergeParams):
        opt = merge_options(p, reject_sigma=merge_reject_sigma(p.reject_sigma, scaled=scales is not None))
        partials = ctx.input_paths("partial")
        if not partials:
            raise InputError("merge mode needs inputs named 'partial*'")
        table = ctx.input_path("observations") if "observations" in ctx.job.inputs else None
        outputs, stats = merge_partials(partials, ctx.out_dir, opt, scales_path=scales, input_hashes=hashes,
                                        job_id=ctx.job.job_id, heartbeat=ctx.heartbeat, table_path=table)
    else:
        assert isinstance(p, RunParams)
        check_subdivisions(p.subdivisions)
        opt = merge_options(p, reject_sigma=p.reject_sigma or None)
        stills = ctx.input_paths("still")
        if not stills:
            raise InputError("run mode needs inputs named 'still*'")
        outputs, stats = run(stills, ctx.out_dir, opt, scales_path=scales, input_hashes=hashes,
                             job_id=ctx.job.job_id)
    for name, path in outputs.items():
        ctx.add_output(name, path)
    cc = (stats.get("cc_half") or {}).get("overall")
    ctx.metrics.update({"n_stills": stats.get("n_stills"), "n_observations": stats.get("n_observations"),
                        "n_voxels_measured": stats.get("n_voxels_measured"), "n_rejected": stats.get("n_rejected"),
                        "reject_sigma": opt.reject_sigma, "average_unit_cell": stats.get("average_unit_cell"),
                        "cc_half_overall": cc if cc is not None and cc == cc else None})


def warm_up() -> None:
    """Load what the first accumulate job would otherwise load when the worker starts (``serve``): the compiled
    accumulation kernels (numba's cache); the still-table reader comes with this module's imports (together
    ~0.27 CPU-s of a fresh process's first job), torch for the final merge, and the figure process."""
    if kernels.available():
        kernels.sparse_ids(np.zeros(1, np.int64), np.ones(1), np.ones(1), 1)
        kernels.accumulate_ids(np.zeros((1, 4)), np.zeros(1, np.int64), np.ones(1), np.ones(1))
    # torch (~2.5 CPU-s; the merges' scatter-add) at start, not in the end of the first run after `up`, which the
    # user waits for; the map's figures are drawn by a helper process (matplotlib warm in it) while the map is written
    accumulate.optional_torch()
    figure_process.start()


STAGE = Stage(service="voxel-merger", params_model=VoxelMergerParams, handler=handle, version=__version__,
              warm_up=warm_up)
