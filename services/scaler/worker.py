"""Bus handler: ``mode="relative"`` (input ``observations``; optional Bragg references as pairs of inputs
``refl_<key>`` (a stills-processor ``<name>.refl``) and ``expt_<key>`` (its ``<name>.expt``; default: the
``.expt`` beside the ``.refl``)) or ``mode="absolute"`` (input ``map``, optional ``bragg`` (the relative
mode's ``bragg_merged`` output) and ``pdb``)."""
from __future__ import annotations

from typing import Literal, Optional

from diffractflow.runtime import BadInput, JobContext, Stage
from pydantic import BaseModel, Field, model_validator

from . import __version__


class Params(BaseModel):
    mode: Literal["relative", "absolute"] = "relative"
    # relative
    smoother: bool = False
    n_control_points: int = Field(3, ge=2, le=5)
    q_range: Optional[tuple[float, float]] = None
    smoothness_weight: float = Field(1e-2, ge=0)
    max_iterations: int = Field(30, ge=1, le=1000)
    convergence_tolerance: float = Field(1e-6, gt=0)
    minimizer_type: Literal["lm", "gauss_newton"] = "lm"
    outlier_zmax: Optional[float] = Field(6.0, gt=0)
    smoother_min_information: float = Field(1e-3, ge=0, description="refuse the smoother below this relative "
                                            "information on its shape (core.identifiability)")
    partiality_threshold: float = Field(0.1, ge=0, le=1, description="seed 003 P_min: Bragg observations with a "
                                        "smaller partiality are not used")
    rlp_sigma: Optional[float] = Field(None, gt=0, description="Gaussian rocking-curve width in the excitation "
                                       "error, 1/Å (default: estimated per still)")
    space_group: Optional[str] = Field(None, description="map Miller indices to this space group's asymmetric unit "
                                       "(default: each crystal model's)")
    sequences: Optional[dict[str, list[str]]] = Field(None, description="rotation sweeps: sweep id -> the observation "
                                                      "table's still names (still_names, '<image file>#<index>') in "
                                                      "rotation order; their frame scales are restrained to vary "
                                                      "smoothly, stills in no sweep keep free scales")
    rotation_smoothness: float = Field(1.0, ge=0, description="weight of the second-difference restraint on ln b "
                                       "along each sweep, relative to one frame's information on ln b (0 = free "
                                       "per-frame scales; 1 halves variations with a period of ~6 frames, 100 of "
                                       "~20 frames)")
    # absolute
    formula: Optional[str] = None
    sequence: Optional[str] = None
    copies: float = Field(1.0, gt=0)
    extra_formula: Optional[str] = None
    cell_volume: Optional[float] = Field(None, gt=0)
    wavelength: Optional[float] = Field(None, gt=0)
    n_shells: int = Field(30, ge=3, le=1000)

    @model_validator(mode="after")
    def _check(self):
        if self.q_range is not None and not (0 <= self.q_range[0] < self.q_range[1]):
            raise ValueError("q_range must be (q_min, q_max) with 0 <= q_min < q_max (1/Å)")
        return self


def handle(ctx: JobContext, params: Params) -> None:
    from .artifacts import InputError
    from .core.errors import (DisabledComponentAccess, ParameterLimitExceeded, RefinementFailure,
                              SmootherNotIdentifiable)
    from .pipeline import run_absolute, run_relative

    try:
        if params.mode == "relative":
            path = ctx.input_path("observations")
            refl_names = sorted(n for n in ctx.job.inputs if n.startswith("refl_"))
            bragg = [(ctx.input_path(n), ctx.input_path("expt_" + n[5:]) if "expt_" + n[5:] in ctx.job.inputs else None)
                     for n in refl_names]
            paths, stats = run_relative(
                path, ctx.out_dir, smoother=params.smoother, n_control_points=params.n_control_points,
                q_range=params.q_range, smoothness_weight=params.smoothness_weight,
                refinement={"max_iterations": params.max_iterations,
                            "convergence_tolerance": params.convergence_tolerance,
                            "minimizer_type": params.minimizer_type, "outlier_zmax": params.outlier_zmax},
                progress=lambda it, r: ctx.heartbeat(), bragg=bragg or None,
                partiality_threshold=params.partiality_threshold, rlp_sigma=params.rlp_sigma,
                space_group=params.space_group, min_information=params.smoother_min_information,
                sequences=params.sequences, rotation_smoothness=params.rotation_smoothness)
            for name, p in paths.items():
                ctx.add_output(name, p)
            for k in ("n_iterations", "final_r_factor", "convergence_achieved", "n_stills", "n_observations",
                      "n_excluded"):
                ctx.metrics[k] = stats[k]
            for k in ("n_bragg", "n_bragg_groups", "n_bragg_below_partiality_threshold", "n_bragg_unmatched_stills"):
                if k in stats:
                    ctx.metrics[k] = stats[k]
        else:
            map_path = ctx.input_path("map")
            bragg = ctx.input_path("bragg") if "bragg" in ctx.job.inputs else None
            pdb = ctx.input_path("pdb") if "pdb" in ctx.job.inputs else None
            if sum(x is not None for x in (params.formula, params.sequence, pdb)) != 1:
                raise BadInput("absolute mode needs exactly one of params.formula, params.sequence or input 'pdb'")
            hashes = {n: r.sha256 for n, r in ctx.job.inputs.items() if getattr(r, "sha256", None)}
            paths, res = run_absolute(map_path, ctx.out_dir, formula=params.formula, sequence=params.sequence, pdb=pdb,
                                      copies=params.copies, extra_formula=params.extra_formula,
                                      cell_volume=params.cell_volume, wavelength=params.wavelength, bragg=bragg,
                                      n_shells=params.n_shells, job_id=ctx.job.job_id, inputs_hashes=hashes)
            for name, p in paths.items():
                ctx.add_output(name, p)
            ctx.metrics["absolute_scale"] = res["scale"]
            ctx.metrics["F000"] = res["F000"]
    except (InputError, ParameterLimitExceeded, DisabledComponentAccess, SmootherNotIdentifiable) as exc:
        raise BadInput(exc.describe() if hasattr(exc, "describe") else str(exc)) from exc
    except RefinementFailure as exc:
        # deterministic for the given data: retrying will not help
        raise BadInput(exc.describe()) from exc
    except ValueError as exc:
        raise BadInput(str(exc)) from exc


STAGE = Stage(service="scaler", params_model=Params, handler=handle, version=__version__)
