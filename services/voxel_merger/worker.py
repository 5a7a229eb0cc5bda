"""Bus handler of the voxel merger: 'accumulate' one still, 'merge' partials, or 'run' end to end."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field

from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__


class Params(BaseModel):
    """Stage parameters. Inputs: accumulate: 'still' + 'grid' (JSON) or ``grid`` param;
    merge: 'partial*' (+ optional 'scales', and 'observations' whose still_names map integer scale keys);
    run: 'still*' (+ optional 'scales')."""

    mode: Literal["accumulate", "merge", "run"] = "run"
    subdivisions: int = Field(3, ge=1, le=15, description="sub-voxels per reciprocal cell unit (odd)")
    symmetry: Optional[str] = Field(None, description="space group symbol, 'auto', or None for no symmetry merging")
    reject_sigma: Optional[float] = Field(None, gt=0, description="outlier threshold in σ (run mode only)")
    d_min: Optional[float] = Field(None, gt=0, description="grid resolution limit, Å")
    half_seed: int = 0
    n_shells: int = Field(10, ge=1, le=100)
    backend: Literal["memory", "hdf5"] = "hdf5"
    cache_mb: int = Field(256, ge=16)
    grid: Optional[dict] = Field(None, description="grid definition (GlobalGrid.to_dict) for accumulate mode")


def handle(ctx: JobContext, params: Params) -> None:
    from .artifacts import InputError, read_grid
    from .core.grid import GlobalGrid
    from .pipeline import MergeOptions, accumulate_one, merge_partials, run

    if params.subdivisions % 2 == 0:
        raise BadInput(f"subdivisions must be odd, got {params.subdivisions}")
    opt = MergeOptions(subdivisions=params.subdivisions, symmetry=params.symmetry, reject_sigma=params.reject_sigma,
                       d_min=params.d_min, half_seed=params.half_seed, n_shells=params.n_shells,
                       backend=params.backend, cache_mb=params.cache_mb)
    hashes = {n: ref.sha256 for n, ref in ctx.job.inputs.items() if getattr(ref, "sha256", None)}
    try:
        if params.mode == "accumulate":
            still = ctx.input_path("still")
            if params.grid is not None:
                grid = GlobalGrid.from_dict(params.grid)
            elif "grid" in ctx.job.inputs:
                grid = read_grid(ctx.input_path("grid"))
            else:
                raise BadInput("accumulate mode needs a 'grid' input (JSON) or the grid parameter")
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
                        "n_voxels_measured": stats.get("n_voxels_measured"),
                        "cc_half_overall": cc if cc is not None and cc == cc else None})


STAGE = Stage(service="voxel-merger", params_model=Params, handler=handle, version=__version__)
