"""Gradient-based refinement on top of the differentiable simulator.

- :mod:`.refiner`: the general refiner (any subset of cell, misset, phi, mosaic, N, distance,
  beam centre, scale; Adam / L-BFGS; bounds; history).
- :mod:`.demo`: seed 001's mosaic + misset recovery demo.
- :mod:`.dials_geometry`: DIALS experiment (dxtbx detector, beam, crystal) -> simulator configs.
- :mod:`.stills`: per-still refinement against the measured pixels near indexed spots.
"""
from .params import PARAM_SPECS, parse_param_list
from .refiner import RefinementError, RefineResult, Refiner, RefineSettings, refine

__all__ = ["PARAM_SPECS", "parse_param_list", "Refiner", "RefineSettings", "RefineResult", "RefinementError",
           "refine"]
