"""diff-sim-refiner's job parameters: one pydantic model per job kind, the only place their defaults are written.

``SimulateParams`` (render a model to an HDF5 image; ``diff-sim-refiner run``) and ``RefineParams`` (refine chosen
groups of a model against a target image; ``diff-sim-refiner refine``). The bus worker validates a job's ``params``
with :class:`DiffSimRefinerParams` (``kind`` chooses the model; ``simulate`` when absent), the CLI builds its
defaults from the same fields. Unknown keys are refused (``extra="forbid"``), at the top level and, for the model
sections ``crystal``/``detector``/``beam``, against the fields of the simulator's config dataclasses.

Torch-free (the CLI imports it at start-up).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, Tag, field_validator, model_validator

from diffractflow.params import job_kind

from .config import BeamConfig, CrystalConfig, DetectorConfig

#: refinable groups (``diff_sim_refiner.refine.params.PARAM_SPECS``) -> number of components; kept here because
#: importing the refine package loads torch; a test checks the two agree
REFINABLE_GROUPS = {"cell": 6, "misset": 3, "phi": 1, "mosaic": 1, "N": 3, "distance": 1, "beam_center": 2,
                    "scale": 1}


def check_section(section: str, value: dict[str, Any], cls) -> dict[str, Any]:
    """``value`` if its keys are fields of the config dataclass ``cls``; else ValueError naming the unknown keys."""
    allowed = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(value) - allowed)
    if bad:
        raise ValueError(f"unknown key(s) in '{section}': {', '.join(bad)} (allowed: {', '.join(sorted(allowed))})")
    return value


class _ModelSections(BaseModel):
    """The model to simulate or to start from: three config sections in the Python API's units, or nanoBragg flags."""

    model_config = ConfigDict(extra="forbid")

    crystal: dict[str, Any] = Field(default_factory=dict, description="CrystalConfig fields (Å, degrees; unit "
                                    "cells for N_cells)")
    detector: dict[str, Any] = Field(default_factory=dict, description="DetectorConfig fields (mm, pixels)")
    beam: dict[str, Any] = Field(default_factory=dict, description="BeamConfig fields (Å, photons/m², mrad, %)")
    nanobragg: Optional[list[str]] = Field(None, description="nanoBragg flags instead of the three sections (its "
                                           "units; -hkl/-mat name the job's inputs)")
    max_pixels: int = Field(20_000_000, gt=0, description="refuse detectors with more pixels than this, > 0")

    @field_validator("crystal")
    @classmethod
    def _crystal(cls, v):
        return check_section("crystal", v, CrystalConfig)

    @field_validator("detector")
    @classmethod
    def _detector(cls, v):
        return check_section("detector", v, DetectorConfig)

    @field_validator("beam")
    @classmethod
    def _beam(cls, v):
        return check_section("beam", v, BeamConfig)


class SimulateParams(_ModelSections):
    """Render a simulation to ``simulation.h5`` (photons/pixel; ``diff-sim-refiner run``; bus ``kind="simulate"``)."""

    kind: Literal["simulate"] = Field("simulate", description="job kind")
    dtype: Literal["float32", "float64"] = Field("float32", description="precision of the render (the artifact "
                                                 "is float32 either way)")
    spot_cutoff: Optional[float] = Field(None, gt=0, description="evaluate only within this many fringes (1/N) of "
                                         "Bragg peaks, > 0 (default: every pixel)")


class RefineParams(_ModelSections):
    """Refine chosen parameter groups of a starting model against a target image (``diff-sim-refiner refine``; bus
    ``kind="refine"``). Units of ``lr``: each group's step (1° for angles, 0.1 Å / 0.1° for the cell, 1 unit cell
    for N, 1 mm distance, 0.1 mm beam centre, ln of the scale)."""

    kind: Literal["refine"] = Field("refine", description="job kind")
    params: list[str] = Field(default_factory=lambda: ["misset", "mosaic"], description="groups to refine: "
                              + ", ".join(REFINABLE_GROUPS))
    optimizer: Literal["adam", "lbfgs", "adam+lbfgs"] = Field("adam", description="adam, lbfgs or adam+lbfgs "
                                                              "(Adam, then an L-BFGS polish)")
    iterations: int = Field(100, ge=0, le=100_000, description="Adam iterations, 0..100000")
    lr: float = Field(0.05, gt=0, description="Adam learning rate in units of each group's step, > 0")
    lbfgs_steps: int = Field(10, ge=0, le=10_000, description="L-BFGS steps (each up to 10 evaluations), 0..10000")
    loss: Literal["mse", "poisson"] = Field("mse", description="mse or poisson (negative log-likelihood of counts)")
    init: dict[str, list[float]] = Field(default_factory=dict, description="start values overriding the model: "
                                         "group -> values in physical units (Å, degrees, unit cells, mm)")
    bounds: dict[str, list[tuple[float, float]]] = Field(default_factory=dict, description="group -> one (lower, "
                                                         "upper) pair per component, physical units")
    scale: float = Field(1.0, gt=0, description="starting multiplier of the simulated photons, > 0")
    dtype: Literal["float32", "float64"] = Field("float64", description="precision of the refinement")

    @field_validator("params")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        # the refine package owns the names and their aliases; importing it loads torch, so only here
        from ..refine.params import parse_param_list

        return parse_param_list(v)

    @model_validator(mode="after")
    def _groups(self):
        for what, d in (("init", self.init), ("bounds", self.bounds)):
            for name, vals in d.items():
                k = REFINABLE_GROUPS.get(name)
                if k is None:
                    raise ValueError(f"{what}: unknown parameter group {name!r}; choose from "
                                     f"{', '.join(REFINABLE_GROUPS)}")
                if len(vals) != k:
                    raise ValueError(f"{what}.{name} needs {k} value(s), got {len(vals)}")
        for name, pairs in self.bounds.items():
            for lo, hi in pairs:
                if not lo < hi or math.isnan(lo) or math.isnan(hi):
                    raise ValueError(f"bounds.{name}: lower {lo} must be below upper {hi}")
        return self


class DemoParams(BaseModel):
    """Seed 001's refinement demo (``diff-sim-refiner refine-demo``; not a bus job): Adam on mosaic spread and misset
    from the seed's start (0.2°, (0, 0, 0)), then an optional L-BFGS polish."""

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(120, ge=0, le=100_000, description="Adam iterations (seed 001's loop), 0..100000")
    lr: float = Field(0.05, gt=0, description="Adam learning rate, degrees per step roughly, > 0")
    lbfgs_steps: int = Field(6, ge=0, le=10_000, description="L-BFGS polish steps after Adam (0 = Adam only)")


class DiffSimRefinerParams(RootModel):
    """A diff-sim-refiner job's ``params``: :class:`SimulateParams` or :class:`RefineParams` by ``kind`` (default
    simulate). The worker's ``params_model``; the job kind's model is ``.root``."""

    root: Annotated[Union[Annotated[SimulateParams, Tag("simulate")], Annotated[RefineParams, Tag("refine")]],
                    job_kind("kind", "simulate", "simulate", "refine")]


__all__ = ["check_section", "SimulateParams", "RefineParams", "DemoParams", "DiffSimRefinerParams", "REFINABLE_GROUPS"]
