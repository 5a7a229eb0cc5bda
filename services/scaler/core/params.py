"""The scaler's parameters: one pydantic model per job kind, the only place their defaults are written.

``RelativeParams`` (seed 003: one multiplicative scale per still, optional resolution smoother) and
``AbsoluteParams`` (seed 002 phase 4: Krogh-Moe / Norman scale to electron units, Compton subtraction). The bus
worker validates a job's ``params`` with :data:`ScalerParams` (``mode`` chooses the kind; ``relative`` when
absent), the CLI builds its options from the same fields, and :mod:`scaler.pipeline` and :mod:`scaler.core.model`
take their defaults from here. Unknown keys are refused (``extra="forbid"``).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, Tag, field_validator, model_validator

from diffractflow.params import job_kind

from .errors import ParameterLimitExceeded

#: seed 003: a resolution smoother with more control points is refused (ParameterLimitExceeded)
MAX_SMOOTHER_CONTROL_POINTS = 5


class RelativeParams(BaseModel):
    """Relative scaling of an observation table (``scaler run``; bus ``mode="relative"``)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["relative"] = Field("relative", description="job kind")
    smoother: bool = Field(False, description="refine the shared resolution smoother g(|s|) besides the per-still "
                           "scales (seed 003: off by default)")
    n_control_points: int = Field(3, ge=2, description="resolution smoother control points, 2..5 (more: the seed's "
                                  "'v1 model parameter limit exceeded')")
    q_range: Optional[tuple[float, float]] = Field(None, description="smoother range (|s|_min, |s|_max) in 1/Å, "
                                                   "0 <= min < max (default: the data's |s| range)")
    smoothness_weight: float = Field(1e-2, ge=0, description="second-difference restraint weight on the smoother, "
                                     "relative to the data curvature, >= 0")
    max_iterations: int = Field(30, ge=1, le=1000, description="maximum refinement cycles, 1..1000")
    convergence_tolerance: float = Field(1e-6, gt=0, description="convergence: relative R-factor change between "
                                         "cycles, > 0")
    minimizer_type: Literal["lm", "gauss_newton"] = Field("lm", description="lm (Levenberg-Marquardt) or "
                                                          "gauss_newton")
    outlier_zmax: Optional[float] = Field(6.0, gt=0, description="reject observations with |normalised deviation| "
                                          "above this (σ, > 0) between cycles; None: off")
    smoother_min_information: float = Field(1e-3, ge=0, description="refuse the smoother when the data's relative "
                                            "information on its shape is below this (>= 0; core.identifiability)")
    partiality_threshold: float = Field(0.1, ge=0, le=1, description="seed 003 P_min, 0..1: Bragg observations "
                                        "with a smaller partiality are not used")
    rlp_sigma: Optional[float] = Field(None, gt=0, description="Gaussian rocking-curve width in the excitation "
                                       "error, 1/Å, > 0 (default: estimated per still)")
    space_group: Optional[str] = Field(None, description="map Bragg Miller indices to this space group's asymmetric "
                                       "unit (default: each crystal model's)")
    sequences: Optional[dict[str, list[str]]] = Field(None, description="rotation sweeps: sweep id -> the "
                                                      "observation table's still names ('<image file>#<index>') in "
                                                      "rotation order; their frame scales are restrained to vary "
                                                      "smoothly, stills in no sweep keep free scales")
    rotation_smoothness: float = Field(1.0, ge=0, description="weight (>= 0) of the second-difference restraint on "
                                       "ln b along each sweep, relative to one frame's information on ln b (0 = free "
                                       "per-frame scales; 1 halves variations with a period of ~6 frames, 100 of "
                                       "~20 frames)")

    @field_validator("n_control_points")
    @classmethod
    def _seed_limit(cls, v: int) -> int:
        if v > MAX_SMOOTHER_CONTROL_POINTS:
            # str() is the seed's message; pydantic reports it against n_control_points
            raise ParameterLimitExceeded(f"resolution smoother has {v} control points, v1 allows <= "
                                         f"{MAX_SMOOTHER_CONTROL_POINTS}")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.q_range is not None and not (0 <= self.q_range[0] < self.q_range[1]):
            raise ValueError("q_range must be (q_min, q_max) with 0 <= q_min < q_max (1/Å)")
        return self

    def refinement(self) -> dict[str, Any]:
        """The refinement options as :meth:`core.model.DiffuseScalingModel.refine_observation_set` takes them."""
        return {"max_iterations": self.max_iterations, "convergence_tolerance": self.convergence_tolerance,
                "minimizer_type": self.minimizer_type, "outlier_zmax": self.outlier_zmax}


class AbsoluteParams(BaseModel):
    """Absolute scale of a merged map (``scaler absolute``; bus ``mode="absolute"``): exactly one of ``formula``,
    ``sequence`` or a PDB/mmCIF input gives the unit-cell contents."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["absolute"] = Field("absolute", description="job kind")
    formula: Optional[str] = Field(None, description="unit-cell contents as a formula, e.g. "
                                   "'C400H640N110O120S4(H2O)900' (per cell, x copies)")
    sequence: Optional[str] = Field(None, description="protein sequence (one-letter or a FASTA file); copies chains "
                                    "per unit cell")
    copies: float = Field(1.0, gt=0, description="copies of formula / sequence per unit cell, > 0")
    extra_formula: Optional[str] = Field(None, description="extra per-cell contents, e.g. '(H2O)1200'")
    cell_volume: Optional[float] = Field(None, gt=0, description="unit-cell volume, Å^3, > 0 (default: from the "
                                         "map or the PDB model)")
    wavelength: Optional[float] = Field(None, gt=0, description="X-ray wavelength, Å, > 0; adds f', f'' (Henke) "
                                        "and the Breit-Dirac factor to the Compton term")
    n_shells: int = Field(30, ge=3, le=1000, description="resolution shells for the sum rule, 3..1000")


class ScalerParams(RootModel):
    """A scaler job's ``params``: :class:`RelativeParams` or :class:`AbsoluteParams` by ``mode`` (default
    relative). The worker's ``params_model``; the job kind's model is ``.root``."""

    root: Annotated[Union[Annotated[RelativeParams, Tag("relative")], Annotated[AbsoluteParams, Tag("absolute")]],
                    job_kind("mode", "relative", "relative", "absolute")]


#: the defaults, for library code that takes a seed-003 configdict with keys left out
RELATIVE_DEFAULTS = RelativeParams()
ABSOLUTE_DEFAULTS = AbsoluteParams()

__all__ = ["RelativeParams", "AbsoluteParams", "ScalerParams", "RELATIVE_DEFAULTS", "ABSOLUTE_DEFAULTS",
           "MAX_SMOOTHER_CONTROL_POINTS"]
