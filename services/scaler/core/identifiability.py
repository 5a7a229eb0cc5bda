"""Is the shared resolution smoother g(|q|) identifiable from these observations? (seed 003: off by default)

g(|q|) multiplies every observation of a group (voxel or reflection) whose reference is free, so a change of
g that is constant across each group is absorbed by the references; per-still scales absorb what is constant
across each still. What is left to determine g is the spread of |q| inside groups, across stills. The
measure: the data's information (J^T W J) on the smoother's shape after (1) projecting out the references
(variable projection, as in the refinement), (2) eliminating the per-still scales (Schur complement) and
(3) removing the overall level of g (an exact gauge with the references), relative to the information the
same observations would carry if the references were known. 1 = as if the references were known,
0 = not identifiable. Computed at b = 1, g = 1 from the current observations (one reference pass and one
normal-equations pass).
"""
from __future__ import annotations

import numpy as np

from .params import RELATIVE_DEFAULTS
from .refine import ObservationSet, ScalingProblem, SmootherSetup

DEFAULT_MIN_INFORMATION = RELATIVE_DEFAULTS.smoother_min_information


def smoother_information(obs: ObservationSet, setup: SmootherSetup) -> dict:
    """{"relative_information": min over shape directions, "per_direction": [...], "still_q_coverage": ...}."""
    prob = ScalingProblem(obs, setup)
    N, M = prob.N, prob.M
    b = np.ones(N)
    c = np.ones(M)
    gb = prob.g_bins(c)
    ih, var = prob.reference(b, gb)
    known = prob.normal_equations(b, c, gb, ih, None, True)  # references held fixed
    proj = prob.normal_equations(b, c, gb, ih, var, True)  # references projected out
    Ass = proj["Ass"]
    has = Ass > 0
    inv = np.where(has, 1.0 / np.where(has, Ass, 1.0), 0.0)
    schur = proj["Acc"] - (proj["Asc"].T * inv) @ proj["Asc"]
    # shape directions: orthonormal basis of the complement of the constant vector (g level is a gauge)
    basis = np.linalg.svd(np.eye(M) - np.full((M, M), 1.0 / M))[0][:, :M - 1]
    full = basis.T @ known["Acc"] @ basis
    left = basis.T @ schur @ basis
    # generalized eigenvalues of (left, full): fraction of the known-reference information that remains
    w, v = np.linalg.eigh(full)
    w = np.where(w > 1e-300 * max(w.max(), 1e-300), w, np.inf)
    white = v / np.sqrt(w)
    ratio = np.linalg.eigvalsh(white.T @ left @ white)
    ratio = np.clip(ratio, 0.0, None)
    rel = float(ratio.min()) if ratio.size else 0.0
    # per still: fraction of the smoother's |q| range covered by its observations (diagnostic)
    cover = np.zeros(N)
    if obs.q is not None:
        qlo = np.full(N, np.inf)
        qhi = np.full(N, -np.inf)
        ok = obs.weight > 0
        np.minimum.at(qlo, obs.still_index[ok], obs.q[ok])
        np.maximum.at(qhi, obs.still_index[ok], obs.q[ok])
        span = setup.smoother.x1 - setup.smoother.x0
        cover = np.clip((qhi - qlo) / span, 0.0, 1.0)
        cover[~np.isfinite(cover)] = 0.0
    return {"relative_information": rel, "per_direction": [float(x) for x in np.sort(ratio)],
            "still_q_coverage_median": float(np.median(cover)) if N else 0.0,
            "still_q_coverage_min": float(np.min(cover)) if N else 0.0}
