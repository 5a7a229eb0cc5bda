"""Refinable parameters: which config fields each named group drives, their units, steps and bounds.

A refinement optimises unit-less variables ``u``; the physical value of a group is
``init + step * u`` (or ``init * exp(step * u)`` for the overall scale, which keeps it positive).
``step`` is the typical change per unit of ``u`` (so Adam's learning rate is in units of ``step``:
with the default 1 degree for angles, ``lr=0.05`` moves angles by about 0.05 degree per iteration,
as in seed 001).  Bounds are enforced by projecting ``u`` back into range after every optimiser step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

#: group name -> (component labels, config section, config field, index into the field or None,
#:                default step, default (lower, upper) bound, unit)
@dataclass(frozen=True)
class ParamSpec:
    name: str
    labels: tuple[str, ...]
    section: str               # "crystal", "detector", "beam" or "model"
    fields: tuple[str, ...]    # config fields, one per component, or one vector field
    vector: bool               # True: one field holding all components (misset_deg, N_cells)
    step: tuple[float, ...]
    bounds: tuple[tuple[float, float], ...]
    unit: str
    log: bool = False          # multiplicative parametrisation (scale)


INF = math.inf

PARAM_SPECS: dict[str, ParamSpec] = {
    "cell": ParamSpec("cell", ("cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma"), "crystal",
                      ("cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma"), False,
                      (0.1, 0.1, 0.1, 0.1, 0.1, 0.1),
                      ((1.0, INF),) * 3 + ((10.0, 170.0),) * 3, "Angstrom, degrees"),
    "misset": ParamSpec("misset", ("misset_x", "misset_y", "misset_z"), "crystal", ("misset_deg",), True,
                        (1.0, 1.0, 1.0), ((-180.0, 180.0),) * 3, "degrees"),
    "phi": ParamSpec("phi", ("phi",), "crystal", ("phi_start_deg",), False, (1.0,), ((-360.0, 360.0),), "degrees"),
    "mosaic": ParamSpec("mosaic", ("mosaic_spread",), "crystal", ("mosaic_spread_deg",), False, (1.0,),
                        ((0.01, 5.0),), "degrees"),
    "N": ParamSpec("N", ("N_a", "N_b", "N_c"), "crystal", ("N_cells",), True, (1.0, 1.0, 1.0),
                   ((1.0, 10000.0),) * 3, "unit cells"),
    "distance": ParamSpec("distance", ("distance",), "detector", ("distance_mm",), False, (1.0,),
                          ((1.0, INF),), "mm"),
    "beam_center": ParamSpec("beam_center", ("beam_center_f", "beam_center_s"), "detector",
                             ("beam_center_f", "beam_center_s"), False, (0.1, 0.1), ((-INF, INF),) * 2, "mm"),
    "scale": ParamSpec("scale", ("scale",), "model", ("scale",), False, (1.0,), ((1e-12, 1e12),),
                       "multiplier of the simulated photons", log=True),
}


def parse_param_list(text: str | Sequence[str]) -> list[str]:
    """'cell,misset,mosaic' -> ['cell', 'misset', 'mosaic'] (validated, order kept, no duplicates)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    items = [t for t in items if t]
    aliases = {"orientation": "misset", "mosaic_spread": "mosaic", "ncells": "N", "n": "N", "beam_centre": "beam_center",
               "beamcenter": "beam_center", "phi_start": "phi"}
    out: list[str] = []
    for t in items:
        key = aliases.get(t.lower(), t)
        if key not in PARAM_SPECS:
            raise ValueError(f"unknown parameter {t!r}; choose from {', '.join(PARAM_SPECS)}")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError("no parameters to refine")
    return out


def resolve_bounds(spec: ParamSpec, override: Optional[Sequence[Optional[tuple[float, float]]]] = None):
    """Per-component (lower, upper) bounds, optionally overridden."""
    b = list(spec.bounds)
    if override is not None:
        if len(override) != len(b):
            raise ValueError(f"bounds for {spec.name} need {len(b)} (lower, upper) pairs, got {len(override)}")
        b = [tuple(o) if o is not None else d for o, d in zip(override, b)]
    for lo, hi in b:
        if not lo < hi:
            raise ValueError(f"bad bounds for {spec.name}: lower {lo} >= upper {hi}")
    return b


__all__ = ["ParamSpec", "PARAM_SPECS", "parse_param_list", "resolve_bounds"]
