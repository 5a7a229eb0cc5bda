"""Bus handler of the voxel merger: 'accumulate' one still, 'merge' partials, or 'run' end to end."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__


#: merge mode's threshold when ``reject_sigma`` is not given and the stills are scaled (see ``Params``)
MERGE_REJECT_SIGMA = 5.0


class Params(BaseModel):
    """Stage parameters. Inputs: accumulate: 'still' + 'grid' (JSON), or the ``grid`` / ``grid_spec`` param;
    merge: 'partial*' (+ optional 'scales', and 'observations' whose still_names map integer scale keys);
    run: 'still*' (+ optional 'scales')."""

    mode: Literal["accumulate", "merge", "run"] = "run"
    subdivisions: int = Field(3, ge=1, le=15, description="sub-voxels per reciprocal cell unit (odd)")
    symmetry: Optional[str] = Field(None, description="space group symbol, 'auto', or None for no symmetry merging")
    reject_sigma: Optional[float] = Field(
        None, ge=0, description="outlier threshold in σ; 0 = off. Not given (None): off in run mode; in merge "
        f"mode {MERGE_REJECT_SIGMA} when scales are given, off without (unscaled stills differ by their scale "
        "factors, which a per-voxel test would take for outliers)")
    reject_min_count: int = Field(3, ge=2, description="only voxels with at least this many observations "
                                  "(merge mode: stills) are tested")
    reject_rounds: int = Field(2, ge=1, le=5, description="iterated rejection rounds (each one more pass over "
                                "the stills or partials)")
    d_min: Optional[float] = Field(None, gt=0, description="grid resolution limit, Å")
    half_seed: int = 0
    n_shells: int = Field(10, ge=1, le=100)
    backend: Literal["memory", "hdf5"] = Field("hdf5", description="work accumulators of merge/run (partials are "
                                               "always HDF5); hdf5 keeps memory bounded, as the CLI's default")
    cache_mb: int = Field(256, ge=16)
    grid: Optional[dict] = Field(None, description="grid definition (GlobalGrid.to_dict) for accumulate mode")
    exclude_bragg_voxels: bool = Field(False, description="merge mode: leave out the voxel centred on each integer "
                                       "hkl (Bragg spot plus halo centre; what the Bragg mask misses lands there)")
    grid_spec: Optional[dict] = Field(None, description="accumulate mode: {unit_cell (Å, deg), space_group, d_min (Å), "
                                      "subdivisions}; the merger builds the grid (reference setting, sphere 1/d_min)")


def handle(ctx: JobContext, params: Params) -> None:
    from .artifacts import InputError, read_grid
    from .core.grid import GlobalGrid
    from .pipeline import MergeOptions, accumulate_one, merge_partials, run

    if params.subdivisions % 2 == 0:
        raise BadInput(f"subdivisions must be odd, got {params.subdivisions}")
    reject = params.reject_sigma
    if reject is None and params.mode == "merge" and "scales" in ctx.job.inputs:
        reject = MERGE_REJECT_SIGMA
    opt = MergeOptions(subdivisions=params.subdivisions, symmetry=params.symmetry, reject_sigma=reject or None,
                       reject_min_count=params.reject_min_count, reject_rounds=params.reject_rounds,
                       d_min=params.d_min, half_seed=params.half_seed, n_shells=params.n_shells,
                       backend=params.backend, cache_mb=params.cache_mb,
                       exclude_bragg_voxels=params.exclude_bragg_voxels)
    hashes = {n: ref.sha256 for n, ref in ctx.job.inputs.items() if getattr(ref, "sha256", None)}
    try:
        if params.mode == "accumulate":
            still = ctx.input_path("still")
            if params.grid is not None:
                grid = GlobalGrid.from_dict(params.grid)
            elif params.grid_spec is not None:
                from .core.grid import grid_from_spec

                try:
                    grid = grid_from_spec(params.grid_spec)
                except ValueError as exc:
                    raise BadInput(str(exc)) from exc
                if opt.d_min is None:  # the run's resolution limit also cuts the observations, not only the box
                    opt.d_min = float(params.grid_spec["d_min"])
            elif "grid" in ctx.job.inputs:
                grid = read_grid(ctx.input_path("grid"))
            else:
                raise BadInput("accumulate mode needs a 'grid' input (JSON) or the grid or grid_spec parameter")
            out = ctx.out_dir / "partial.h5"
            info = accumulate_one(still, grid, out, opt, input_hashes=hashes, job_id=ctx.job.job_id,
                                  heartbeat=ctx.heartbeat)
            ctx.add_output("partial", out)
            ctx.metrics.update({k: v for k, v in info.items()})
            return
        scales = ctx.input_path("scales") if "scales" in ctx.job.inputs else None
        if params.mode == "merge":
            partials = ctx.input_paths("partial")
            if not partials:
                raise BadInput("merge mode needs inputs named 'partial*'")
            table = ctx.input_path("observations") if "observations" in ctx.job.inputs else None
            outputs, stats = merge_partials(partials, ctx.out_dir, opt, scales_path=scales, input_hashes=hashes,
                                            job_id=ctx.job.job_id, heartbeat=ctx.heartbeat, table_path=table)
        else:
            stills = ctx.input_paths("still")
            if not stills:
                raise BadInput("run mode needs inputs named 'still*'")
            outputs, stats = run(stills, ctx.out_dir, opt, scales_path=scales, input_hashes=hashes,
                                 job_id=ctx.job.job_id)
    except InputError as exc:
        raise BadInput(str(exc)) from exc
    for name, path in outputs.items():
        ctx.add_output(name, path)
    cc = (stats.get("cc_half") or {}).get("overall")
    ctx.metrics.update({"n_stills": stats.get("n_stills"), "n_observations": stats.get("n_observations"),
                        "n_voxels_measured": stats.get("n_voxels_measured"), "n_rejected": stats.get("n_rejected"),
                        "reject_sigma": opt.reject_sigma, "average_unit_cell": stats.get("average_unit_cell"),
                        "cc_half_overall": cc if cc is not None and cc == cc else None})


STAGE = Stage(service="voxel-merger", params_model=Params, handler=handle, version=__version__)
