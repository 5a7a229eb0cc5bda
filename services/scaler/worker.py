"""Bus handler: ``mode="relative"`` (input ``observations``; optional Bragg references as pairs of inputs
``refl_<key>`` (a stills-processor ``<name>.refl``) and ``expt_<key>`` (its ``<name>.expt``; default: the
``.expt`` beside the ``.refl``)) or ``mode="absolute"`` (input ``map``, optional ``bragg`` (the relative
mode's ``bragg_merged`` output) and ``pdb``). Parameters: :mod:`scaler.core.params`.

Errors: an input error (:class:`scaler.artifacts.InputError`, and the seed's parameter-limit, disabled-component
and smoother-identifiability errors) rejects the job; anything else (a refinement failure, a bug) is a failure
that the runtime retries and then dead-letters with its traceback."""
from __future__ import annotations

from diffractflow.report_page import warm_up_figures
from diffractflow.runtime import JobContext, Stage

from . import __version__
from .artifacts import InputError
from .core.errors import DisabledComponentAccess, ParameterLimitExceeded, SmootherNotIdentifiable
from .core.params import AbsoluteParams, RelativeParams, ScalerParams
from .pipeline import run_absolute, run_relative

#: the worker's parameter model (kept under the old name for callers)
Params = ScalerParams

RELATIVE_METRICS = ("n_iterations", "final_r_factor", "convergence_achieved", "n_stills", "n_observations",
                    "n_excluded")
BRAGG_METRICS = ("n_bragg", "n_bragg_groups", "n_bragg_below_partiality_threshold", "n_bragg_unmatched_stills")


def _relative(ctx: JobContext, params: RelativeParams) -> None:
    path = ctx.input_path("observations")
    refl_names = sorted(n for n in ctx.job.inputs if n.startswith("refl_"))
    bragg = [(ctx.input_path(n), ctx.input_path("expt_" + n[5:]) if "expt_" + n[5:] in ctx.job.inputs else None)
             for n in refl_names]
    paths, stats = run_relative(path, ctx.out_dir, params, progress=lambda it, r: ctx.heartbeat(),
                                bragg=bragg or None)
    for name, p in paths.items():
        ctx.add_output(name, p)
    for k in RELATIVE_METRICS:
        ctx.metrics[k] = stats[k]
    for k in BRAGG_METRICS:
        if k in stats:
            ctx.metrics[k] = stats[k]


def _absolute(ctx: JobContext, params: AbsoluteParams) -> None:
    map_path = ctx.input_path("map")
    bragg = ctx.input_path("bragg") if "bragg" in ctx.job.inputs else None
    pdb = ctx.input_path("pdb") if "pdb" in ctx.job.inputs else None
    if sum(x is not None for x in (params.formula, params.sequence, pdb)) != 1:
        raise InputError("absolute mode needs exactly one of params.formula, params.sequence or input 'pdb'")
    hashes = {n: r.sha256 for n, r in ctx.job.inputs.items() if getattr(r, "sha256", None)}
    paths, res = run_absolute(map_path, ctx.out_dir, params, pdb=pdb, bragg=bragg, job_id=ctx.job.job_id,
                              inputs_hashes=hashes)
    for name, p in paths.items():
        ctx.add_output(name, p)
    ctx.metrics["absolute_scale"] = res["scale"]
    ctx.metrics["F000"] = res["F000"]


def handle(ctx: JobContext, params: ScalerParams) -> None:
    p = params.root
    try:
        if isinstance(p, RelativeParams):
            _relative(ctx, p)
        else:
            _absolute(ctx, p)
    except (ParameterLimitExceeded, DisabledComponentAccess, SmootherNotIdentifiable) as exc:
        # input errors already; re-raised with the specific reason (their str() is only the seed's message)
        raise InputError(exc.describe()) from exc


# matplotlib's one-time costs (the scales and R-factor figures) at the worker's start, not in the first run's end
STAGE = Stage(service="scaler", params_model=ScalerParams, handler=handle, version=__version__,
              warm_up=warm_up_figures)
