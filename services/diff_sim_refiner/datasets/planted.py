"""What a generated dataset planted, read back from its truth dict (``truth.json``) for judging a run against it.

Both generators (:mod:`.stills`, :mod:`.sweep`) write a truth dict; these helpers turn either into what a
comparison needs: the detector/crystal spec (for the pixels' true q) and, per image file, the planted scale
and the true orientation(s) U B.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

import numpy as np

from .stills import StillsSpec
from .sweep import SweepSpec, oscillation_orientations

SWEEP_GENERATOR = "diff_sim_refiner.datasets.sweep"
#: a rotation frame's truth is averaged over at least this many sub-steps of its oscillation
MIN_PHI_STEPS = 4


def is_sweep(truth: Mapping[str, Any]) -> bool:
    """True for the truth dict of a rotation sweep (:func:`.sweep.generate_sweep`)."""
    return truth.get("generator") == SWEEP_GENERATOR


def _spec(cls, d: Mapping[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def stills_spec(truth: Mapping[str, Any]) -> StillsSpec:
    """The stills generator's spec (detector, crystal, levels) of a dataset: a sweep's through
    :meth:`.sweep.SweepSpec.stills_spec`."""
    if is_sweep(truth):
        return _spec(SweepSpec, truth["spec"]).stills_spec()
    return _spec(StillsSpec, truth["spec"])


def planted_images(truth: Mapping[str, Any]) -> dict[str, dict]:
    """Image file name -> {``scale``: planted per-image scale, ``A``: true U B (3x3, 1/Angstrom) for a still, or a
    list of them at the midpoints of max(phi_steps, :data:`MIN_PHI_STEPS`) sub-steps of a rotation frame's
    oscillation (a frame's pixels sweep through it)}."""
    out = {s["file"]: {"scale": float(s["scale"]), "A": s["A"]} for s in truth.get("stills", [])}
    if is_sweep(truth):
        spec = _spec(SweepSpec, truth["spec"])
        A0 = np.asarray(truth["A0"], float)
        n = max(int(spec.phi_steps), MIN_PHI_STEPS)
        for fr in truth["frames"]:
            out[fr["file"]] = {"scale": float(fr["scale"]),
                               "A": oscillation_orientations(A0, fr["phi_start_deg"], fr["phi_end_deg"], n)}
    return out
