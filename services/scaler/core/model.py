"""``DiffuseScalingModel``: the v1 parameter-guarded relative scaling model of seed 003.

A DIALS ``ScalingModelBase`` subclass with two components: one multiplicative scale per still
(:class:`PerStillMultiplierComponent`) and an optional shared resolution smoother
(:class:`ResolutionSmootherComponent`). Convention as in DIALS: I_obs ~ b_still * g(|q|) * I_reference.
Panel, spatial and additive-offset components are hard-disabled; the additive offset is always 0.0.
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from dials.algorithms.scaling.model.model import ScalingModelBase
from dials.array_family import flex

from .components import (
    DiffuseActiveParameterManager,
    PerStillMultiplierComponent,
    ResolutionSmootherComponent,
    _column,
)
from . import kernels
from .errors import DisabledComponentAccess, ParameterLimitExceeded, RefinementFailure, SmootherNotIdentifiable
from .identifiability import smoother_information
from .params import MAX_SMOOTHER_CONTROL_POINTS
from .params import RELATIVE_DEFAULTS as _D
from .refine import (
    DEFAULT_THREADS,
    RotationRestraint,
    ObservationSet,
    ScalingProblem,
    SmootherSetup,
    count_per_index,
    refine,
    reorder_for_locality,
    run_parallel,
    split_ranges,
)

log = logging.getLogger(__name__)

DISABLED_COMPONENTS = ("panel_scale", "spatial_scale", "additive_offset")
DEFAULT_REFINEMENT = {**_D.refinement(), "n_outlier_cycles": 2}


# ----------------------------------------------------------------------------- input adaptation
def compact_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, keys): dense 0..K-1 index for integer ids; O(n) via bincount when ids are compact."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    if np.issubdtype(ids.dtype, np.integer) and (ids.dtype.kind == "i" or ids.dtype.itemsize <= 4) \
            and kernels.available():  # (uint64 - int64 is float in numba: numpy path)
        ranges = split_ranges(ids.size, DEFAULT_THREADS)
        mm = np.array(run_parallel(lambda a, b: kernels.min_max(ids[a:b]), ranges))
        lo, hi = int(mm[:, 0].min()), int(mm[:, 1].max())
        if hi - lo < 4 * ids.size + (1 << 20):
            # O(n) in two threaded passes, no temporaries of the table's length except the int32 result
            # (the threads of the first pass may set the same flag: they only ever write True)
            present = np.zeros(hi - lo + 1, dtype=bool)
            run_parallel(lambda a, b: kernels.mark_present(ids[a:b], lo, present), ranges)
            keys = np.flatnonzero(present) + lo
            idt = np.int32 if len(keys) < 2**31 else np.int64
            lut = (np.cumsum(present, dtype=np.int64) - 1).astype(idt)
            idx = np.empty(ids.shape, dtype=idt)
            run_parallel(lambda a, b: kernels.lut_gather(ids[a:b], lo, lut, idx[a:b]), ranges)
            return idx, keys.astype(np.int64)
    if np.issubdtype(ids.dtype, np.integer):
        lo, hi = int(ids.min()), int(ids.max())
        if lo >= 0 and hi < 4 * ids.size + (1 << 20):
            present = np.bincount(ids, minlength=hi + 1) > 0
            keys = np.flatnonzero(present)
            lut = np.cumsum(present) - 1
            idx = lut[ids]
            return idx.astype(np.int32 if len(keys) < 2**31 else np.int64), keys
    keys, idx = np.unique(ids, return_inverse=True)
    return idx.astype(np.int32 if len(keys) < 2**31 else np.int64), keys


def flatten_diffuse(binned_pixel_data: Any) -> dict[str, np.ndarray]:
    """Flat arrays still_id, voxel_id, q_magnitude (1/Å), intensity, sigma from any accepted form.

    Accepts a mapping of 1-D arrays (the observation table: still_id, voxel_id, q_magnitude or
    q_vector (n,3), intensity, sigma) or the seed's voxel-organised form
    ``{voxel_idx: {"observations": [{"intensity", "sigma", "still_id", "q_vector_lab" | "q_magnitude"}]}}``.
    """
    if isinstance(binned_pixel_data, Mapping) and "intensity" in binned_pixel_data:
        d = binned_pixel_data
        if "q_magnitude" in d:
            q = np.asarray(d["q_magnitude"], dtype=float)
        elif "q_vector" in d or "q_vector_lab" in d:
            q = np.linalg.norm(np.asarray(d.get("q_vector", d.get("q_vector_lab")), dtype=float), axis=1)
        else:
            raise ValueError("observation table needs a q_magnitude (or q_vector) column")
        out = {"still_id": np.asarray(d["still_id"]), "voxel_id": np.asarray(d["voxel_id"]),
               "q_magnitude": q, "intensity": np.asarray(d["intensity"]), "sigma": np.asarray(d["sigma"])}
    elif isinstance(binned_pixel_data, Mapping):
        cols = {k: [] for k in ("still_id", "voxel_id", "q_magnitude", "intensity", "sigma")}
        for vox, entry in binned_pixel_data.items():
            obs_list = entry["observations"] if isinstance(entry, Mapping) else entry
            for ob in obs_list:
                cols["voxel_id"].append(vox)
                cols["still_id"].append(int(ob["still_id"]))
                cols["intensity"].append(float(ob["intensity"]))
                cols["sigma"].append(float(ob["sigma"]))
                if "q_magnitude" in ob:
                    cols["q_magnitude"].append(float(ob["q_magnitude"]))
                else:
                    cols["q_magnitude"].append(float(np.linalg.norm(ob.get("q_vector_lab", ob.get("q_vector")))))
        out = {k: np.asarray(v) for k, v in cols.items()}
        if out["voxel_id"].dtype == object:
            raise ValueError("voxel keys must be integers")
    else:
        raise TypeError(f"unsupported binned_pixel_data type {type(binned_pixel_data).__name__}")
    n = len(out["intensity"])
    for k, v in out.items():
        if v.shape != (n,):
            raise ValueError(f"column {k} has shape {v.shape}, expected ({n},)")
    return out


def _first_column(table, names):
    for name in names:
        try:
            return _column(table, name)
        except (KeyError, RuntimeError):
            continue
    return None


def flatten_bragg(bragg_reflections: Any, min_partiality: float) -> Optional[dict[str, np.ndarray]]:
    """Bragg observations with partiality >= ``min_partiality``, corrected to full (I/P, sigma/P).

    Accepts a mapping still_id -> reflection table (flex.reflection_table or mapping of arrays) or one
    table with a ``still_id`` column. Columns: ``miller_index`` (ASU indices; ``miller_index_asu``
    preferred if present), ``intensity.sum.value``/``intensity``, ``intensity.sum.variance`` or
    ``sigma``, ``partiality`` (default 1), ``d`` (Å) or ``q_magnitude`` (1/Å).
    """
    if bragg_reflections is None or (isinstance(bragg_reflections, Mapping) and len(bragg_reflections) == 0):
        return None
    if isinstance(bragg_reflections, Mapping) and not any(
            k in bragg_reflections for k in ("miller_index", "miller_index_asu")):
        tables = [(sid, tab) for sid, tab in bragg_reflections.items()]
    else:
        tables = [(None, bragg_reflections)]
    parts = []
    for sid, tab in tables:
        hkl = _first_column(tab, ("miller_index_asu", "miller_index"))
        if hkl is None:
            raise ValueError("Bragg reflection table has no miller_index column")
        hkl = np.asarray(list(hkl) if not isinstance(hkl, np.ndarray) else hkl, dtype=np.int64).reshape(-1, 3)
        inten = _first_column(tab, ("intensity.sum.value", "intensity.prf.value", "intensity"))
        var = _first_column(tab, ("intensity.sum.variance", "intensity.prf.variance"))
        sig = np.sqrt(var) if var is not None else _first_column(tab, ("sigma",))
        if inten is None or sig is None:
            raise ValueError("Bragg reflection table needs intensity and variance/sigma columns")
        part = _first_column(tab, ("partiality",))
        part = np.ones(len(inten)) if part is None else np.asarray(part, dtype=float)
        q = _first_column(tab, ("q_magnitude",))
        if q is None:
            d = _first_column(tab, ("d",))
            if d is None:
                raise ValueError("Bragg reflection table needs a d (Å) or q_magnitude (1/Å) column")
            q = 1.0 / np.asarray(d, dtype=float)
        still = np.full(len(inten), sid) if sid is not None else _first_column(tab, ("still_id", "id"))
        keep = (part >= min_partiality) & (part > 0) & (np.asarray(sig) > 0)
        parts.append({"still_id": np.asarray(still, dtype=np.int64)[keep], "hkl": hkl[keep],
                      "q_magnitude": np.asarray(q, dtype=float)[keep],
                      "intensity": np.asarray(inten, dtype=float)[keep] / part[keep],
                      "sigma": np.asarray(sig, dtype=float)[keep] / part[keep]})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------- the model
class DiffuseScalingModel(ScalingModelBase):
    """Per-still multiplicative scales (+ optional shared resolution smoother) for diffuse data."""

    id_ = "diffuse_v1"

    def __init__(self, configdict: dict, is_scaled: bool = False, still_ids: Optional[list[int]] = None):
        cfg = copy.deepcopy(dict(configdict or {}))
        self._validate_disabled(cfg)
        cfg.setdefault("per_still_scale", {"enabled": True, "initial_values": {}})
        cfg.setdefault("resolution_smoother", {"enabled": False})
        cfg.setdefault("experimental_components", {k: {"enabled": False} for k in DISABLED_COMPONENTS})
        cfg.setdefault("partiality_threshold", _D.partiality_threshold)
        ps = cfg["per_still_scale"]
        rs = cfg["resolution_smoother"]
        cfg["corrections"] = [n for n, on in (("per_still_scale", ps.get("enabled", True)),
                                              ("resolution_smoother", rs.get("enabled", False))) if on]
        if not cfg["corrections"]:
            raise ValueError("No model components enabled: per_still_scale must be enabled in v1")
        super().__init__(cfg, is_scaled)
        self.partiality_threshold = float(cfg["partiality_threshold"])
        self.active_parameter_manager = DiffuseActiveParameterManager()
        # the smoother is validated first so that > 5 control points raises whatever the stills
        self._smoother_cfg = None
        if rs.get("enabled", False):
            ncp = int(rs.get("n_control_points", _D.n_control_points))
            if ncp > MAX_SMOOTHER_CONTROL_POINTS:
                raise ParameterLimitExceeded(f"resolution smoother has {ncp} control points, v1 allows <= 5")
            if "resolution_range" not in rs or rs["resolution_range"] is None:
                raise ValueError("resolution_smoother.resolution_range (q_min, q_max) in 1/Å is required")
            self._smoother_cfg = rs
        ids = still_ids if still_ids is not None else ps.get("still_ids")
        if ids is None and ps.get("initial_values"):
            ids = sorted(int(k) for k in ps["initial_values"])
        self.per_still = None
        self.smoother = None
        self.MAX_FREE_PARAMS = None
        self.statistics: dict = {}
        self.refined_parameters: dict = {}
        if ids is not None:
            self._build_components(list(ids))

    # ---------------------------------------------------------------- configuration guards
    @staticmethod
    def _validate_disabled(cfg: dict) -> None:
        exp = cfg.get("experimental_components", {}) or {}
        for name, sub in exp.items():
            enabled = sub.get("enabled", False) if isinstance(sub, Mapping) else bool(sub)
            if enabled:
                raise DisabledComponentAccess(f"experimental component {name!r} requested")
        for name in DISABLED_COMPONENTS:
            if name in cfg:
                sub = cfg[name]
                if (sub.get("enabled", True) if isinstance(sub, Mapping) else bool(sub)):
                    raise DisabledComponentAccess(f"component {name!r} requested")
        if cfg.get("experimental", False) or cfg.get("allow_experimental", False):
            raise DisabledComponentAccess("experimental components cannot be enabled in v1")

    def _build_components(self, still_ids: list[int]) -> None:
        n_stills = len(still_ids)
        self.MAX_FREE_PARAMS = 5 + n_stills
        ps = self.configdict["per_still_scale"]
        n_free = (n_stills if ps.get("enabled", True) else 0)
        if self._smoother_cfg is not None:
            n_free += int(self._smoother_cfg.get("n_control_points", _D.n_control_points))
        if n_free > self.MAX_FREE_PARAMS:
            raise ParameterLimitExceeded(f"{n_free} free parameters > MAX_FREE_PARAMS = {self.MAX_FREE_PARAMS}")
        apm = self.active_parameter_manager
        init = {int(k): v for k, v in (ps.get("initial_values") or {}).items()}
        # a disabled per-still component keeps fixed scales (registered, but not refined)
        self.per_still = PerStillMultiplierComponent(apm if ps.get("enabled", True) else None, still_ids, init)
        self._components["per_still_scale"] = self.per_still
        if self._smoother_cfg is not None:
            rs = self._smoother_cfg
            self.smoother = ResolutionSmootherComponent(
                apm, int(rs.get("n_control_points", _D.n_control_points)), tuple(rs["resolution_range"]),
                smoothness_weight=float(rs.get("smoothness_weight", _D.smoothness_weight)),
                ridge_weight=float(rs.get("ridge_weight", 1e-4)))
            self._components["resolution_smoother"] = self.smoother

    def get_component(self, name: str):
        """A model component by name; the v1-disabled ones raise DisabledComponentAccess."""
        if name in DISABLED_COMPONENTS:
            raise DisabledComponentAccess(f"component {name!r} is hard-disabled")
        return self._components[name]

    panel_scale = property(lambda self: self.get_component("panel_scale"))
    spatial_scale = property(lambda self: self.get_component("spatial_scale"))
    additive_offset = property(lambda self: self.get_component("additive_offset"))

    def consecutive_refinement_order(self):
        return [list(self._components)]

    @property
    def n_free_parameters(self) -> int:
        return int(self.active_parameter_manager.n_active_params)

    # ---------------------------------------------------------------- data assembly
    def observation_set(self, binned_pixel_data, bragg_reflections=None) -> tuple[ObservationSet, dict]:
        """Flatten diffuse (+ Bragg, partiality-filtered) observations into one indexed set."""
        diff = flatten_diffuse(binned_pixel_data)
        bragg = flatten_bragg(bragg_reflections, self.partiality_threshold)
        still = diff["still_id"].astype(np.int64)
        if bragg is not None:
            still = np.concatenate([still, bragg["still_id"]])
        if self.per_still is None:
            self._build_components(np.unique(still).tolist())
        sidx = self.per_still.index_of(still).astype(np.int32)
        vidx, vkeys = compact_ids(diff["voxel_id"])
        n_vox = len(vkeys)
        keys = list(vkeys.tolist())
        gidx = vidx
        q, inten, sig = diff["q_magnitude"], diff["intensity"], diff["sigma"]
        if bragg is not None and len(bragg["intensity"]):
            hkl_keys, hidx = np.unique(bragg["hkl"], axis=0, return_inverse=True)
            gidx = np.concatenate([gidx, n_vox + hidx.reshape(-1)])
            keys += [tuple(int(v) for v in h) for h in hkl_keys]
            q = np.concatenate([q, bragg["q_magnitude"]])
            inten = np.concatenate([inten, bragg["intensity"]])
            sig = np.concatenate([sig, bragg["sigma"]])
        sig = np.asarray(sig, dtype=float)
        good = np.isfinite(sig) & (sig > 0) & np.isfinite(inten) & np.isfinite(q)
        with np.errstate(divide="ignore"):
            w = np.where(good, 1.0 / np.where(good, sig, 1.0) ** 2, 0.0)
        inten = np.where(good, inten, 0.0)
        q = np.where(np.isfinite(q), q, 0.0)
        obs = ObservationSet(sidx, gidx, np.asarray(q, dtype=float), np.asarray(inten, dtype=float), w,
                             self.per_still.still_ids, len(keys), keys, n_vox)
        return obs, {"n_diffuse": int(len(diff["intensity"])),
                     "n_bragg": 0 if bragg is None else int(len(bragg["intensity"])),
                     "n_invalid_sigma": int((~good).sum())}

    def rotation_restraint(self) -> tuple[Optional[RotationRestraint], dict]:
        """The configured rotation sweeps as a :class:`RotationRestraint` on parameter indices, and a report.

        Config ``rotation_restraint = {"sequences": {sweep id: [still id, ...] in rotation order},
        "weight": float}``; still ids absent from the data (or None) leave a gap (their place in the list is kept);
        a still in two sweeps is an error; sweeps with < 3 stills present are not restrained.
        """
        rr = self.configdict.get("rotation_restraint") or {}
        seqs = rr.get("sequences") or {}
        weight = float(rr.get("weight", _D.rotation_smoothness))
        if weight < 0:
            raise ValueError(f"rotation smoothness weight must be >= 0, got {weight}")
        if not seqs:
            return None, {}
        known = {int(k): i for i, k in enumerate(self.per_still.still_ids.tolist())}
        seen: dict[int, str] = {}
        out, report = {}, {}
        for name, ids in seqs.items():
            idx, pos, missing = [], [], []
            for p, sid in enumerate(ids):
                if sid is None:  # a frame the caller could not match to the data: a gap
                    missing.append(None)
                    continue
                sid = int(sid)
                if sid in seen:
                    raise ValueError(f"still {sid} is listed in rotation sequences {seen[sid]!r} and {name!r}")
                seen[sid] = str(name)
                if sid in known:
                    idx.append(known[sid])
                    pos.append(float(p))
                else:
                    missing.append(sid)
            report[str(name)] = {"n_frames_listed": len(ids), "n_frames_in_data": len(idx),
                                 "restrained": len(idx) >= 3}
            if missing:
                report[str(name)]["frames_without_data"] = [m for m in missing if m is not None][:20]
                report[str(name)]["n_frames_without_data"] = len(missing)
            if len(idx) >= 3:
                out[str(name)] = (np.asarray(idx, dtype=np.int64), np.asarray(pos))
        if not out:
            return None, report
        return RotationRestraint(out, weight), report

    def _smoother_setup(self) -> Optional[SmootherSetup]:
        if self.smoother is None:
            return None
        return SmootherSetup(self.smoother.smoother, self.smoother.smoothness_weight, self.smoother.ridge_weight)

    # ---------------------------------------------------------------- refinement
    def refine_parameters(self, binned_pixel_data, bragg_reflections=None,
                          refinement_config: Optional[dict] = None, progress=None) -> tuple[dict, dict]:
        """Refine b (and g) by Levenberg-Marquardt; returns (refined_parameters, refinement_statistics)."""
        cfg = dict(DEFAULT_REFINEMENT)
        cfg.update(refinement_config or {})
        obs, counts = self.observation_set(binned_pixel_data, bragg_reflections)
        if obs.n_obs == 0:
            raise RefinementFailure("no observations to refine against")
        return self.refine_observation_set(obs, cfg, counts, progress=progress, reorder_inplace=True)

    def refine_observation_set(self, obs: ObservationSet, cfg: dict, counts: Optional[dict] = None,
                               progress=None, reorder_inplace: bool = False) -> tuple[dict, dict]:
        """Refinement on an already indexed :class:`ObservationSet` (used by the CLI for big tables).

        With ``reorder_inplace`` the arrays of ``obs`` are permuted in place (cache locality, no copy).
        """
        full = dict(DEFAULT_REFINEMENT)
        full.update(cfg)
        cfg = full
        if self.per_still is None:
            raise ValueError("model has no still ids: build it with still_ids or call refine_parameters")
        refine_b = bool(self.configdict["per_still_scale"].get("enabled", True))
        b0 = self.per_still.values.copy()
        c0 = None if self.smoother is None else self.smoother.values.copy()
        if not refine_b and c0 is None:
            raise ValueError("nothing to refine: per-still scales disabled and no smoother")
        sm = self._smoother_setup()
        if sm is not None and obs.q is None:
            raise ValueError("the resolution smoother needs |q| (q_magnitude) of every observation")
        identifiability = None
        if sm is not None and self._smoother_cfg.get("check_identifiability", True):
            identifiability = smoother_information(obs, sm)
            need = float(self._smoother_cfg.get("min_information", _D.smoother_min_information))
            identifiability["min_information"] = need
            if not identifiability["relative_information"] >= need:
                log.warning("resolution smoother refused: relative information %.3g < %.3g",
                            identifiability["relative_information"], need)
                raise SmootherNotIdentifiable(
                    f"relative information on the smoother's shape {identifiability['relative_information']:.3g} "
                    f"< {need:g} (1 = as if the references were known; the |q| spread inside voxels/reflections "
                    f"across stills determines g); median per-still |q| coverage "
                    f"{identifiability['still_q_coverage_median']:.2f} of the smoother range. Run without the "
                    "smoother (the default)")
        rotation, rotation_report = self.rotation_restraint()
        obs = reorder_for_locality(obs, inplace=reorder_inplace)
        b, c = b0, c0
        n_iter, history, n_rejected = 0, [], 0
        keep = np.ones(obs.n_obs, dtype=bool)
        cur = obs
        res = None
        n_cycles = 1 + (int(cfg["n_outlier_cycles"]) if cfg.get("outlier_zmax") else 0)
        try:
            for cycle in range(n_cycles):
                problem = ScalingProblem(cur, sm)
                res = refine(problem, b, c, max_iterations=int(cfg["max_iterations"]),
                             convergence_tolerance=float(cfg["convergence_tolerance"]),
                             minimizer=str(cfg["minimizer_type"]), refine_b=refine_b, progress=progress,
                             rotation=rotation)
                n_iter += res.n_iterations
                history += res.r_factor_history if not history else res.r_factor_history[1:]
                b, c = res.b, res.c
                if cycle == n_cycles - 1:
                    break
                bad = outlier_mask(problem, b, c, res.reference, res.reference_var, float(cfg["outlier_zmax"]))
                if not bad.any():
                    break
                n_rejected += int(bad.sum())
                del problem
                # with reorder_inplace the caller gave up the table: compact it in place (no second copy)
                cur = cur.drop_inplace(bad) if reorder_inplace else cur.select(~bad)
                del bad
        except RefinementFailure:
            raise
        except (FloatingPointError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as exc:
            raise RefinementFailure(f"{type(exc).__name__}: {exc}") from exc
        if not np.all(np.isfinite(b)) or np.any(b <= 0):
            raise RefinementFailure("refined per-still scales are not finite and positive")
        ne = res.final_normal_equations
        if refine_b and ne is not None:
            # unconstrained per-still optimum given the final references: b + (J^T W r)_s / (J^T W J)_ss
            Ass, rs = ne["Ass"], ne["rs"]
            has = Ass > 0
            b_opt = np.where(has, b + rs / np.where(has, Ass, 1.0), 1.0)
            invalid = has & ((b_opt <= 0) | (b < 1e-6 * np.median(b[has]) if has.any() else False))
            if invalid.any():
                bad_ids = obs.still_ids[invalid][:10].tolist()
                raise RefinementFailure(f"scale of still(s) {bad_ids} would have to be <= 0 (data anti-correlated "
                                        "with the reference)")
        x = []
        if refine_b:
            x.append(b)
        if c is not None:
            x.append(c)
        self.active_parameter_manager.set_param_vals(flex.double(np.concatenate(x)))
        if not refine_b:
            self.per_still.parameters = flex.double(b)
        self.set_scaling_model_as_scaled()
        self.refined_parameters = {int(s): {"multiplicative_scale": float(v), "additive_offset": 0.0}
                                   for s, v in zip(self.per_still.still_ids, b)}
        shifts = {"per_still_scale": float(np.max(np.abs(b - b0))) if refine_b else 0.0,
                  "additive_offset": 0.0}
        if c is not None:
            shifts["resolution_smoother"] = float(np.max(np.abs(c - c0)))
        n_per_still = count_per_index(cur.still_index, obs.n_stills)
        self.statistics = {
            "n_iterations": int(n_iter),
            "final_r_factor": float(history[-1]),
            "convergence_achieved": bool(res.converged),
            "parameter_shifts": shifts,
            "r_factor_history": [float(v) for v in history],
            "n_observations": int(cur.n_obs),
            "n_outliers_rejected": int(n_rejected),
            "n_stills": int(obs.n_stills),
            "n_stills_without_data": int((n_per_still == 0).sum()),
            "n_groups": int(obs.n_groups),
            "n_free_parameters": self.n_free_parameters,
            "max_free_parameters": int(self.MAX_FREE_PARAMS),
            "minimizer_type": str(cfg["minimizer_type"]),
            "scale_normalisation": "mean of per-still scales = 1",
        }
        if counts:
            self.statistics.update(counts)
        if rotation_report:
            rs = {"weight": float(rotation.weight) if rotation is not None else None,
                  "model": "sum_sweeps lambda * sum (second difference of ln b along the rotation)^2, "
                           "lambda = weight * median per-frame information on ln b",
                  "sequences": rotation_report}
            if rotation is not None:
                lams = res.rotation_lambdas or [0.0] * len(rotation.sequences)
                for (name, (idx, _pos)), lam in zip(rotation.sequences.items(), lams):
                    d2 = np.diff(np.log(b[idx]), 2)
                    rotation_report[name].update({"lambda": float(lam),
                                                  "rms_second_difference_ln_b": float(np.sqrt(np.mean(d2 ** 2)))})
            self.statistics["rotation_restraint"] = rs
        if c is not None:
            self.statistics["resolution_smoother"] = {
                "control_q": self.smoother.smoother.control_q().tolist(),
                "control_values": [float(v) for v in c], "identifiability": identifiability}
        self._last_obs = cur
        self._last_reference = (res.reference, res.reference_var)
        return self.refined_parameters, self.statistics

    # ---------------------------------------------------------------- application
    def get_scales_for_observation(self, still_id: int, q_magnitude: float, **kwargs) -> tuple[float, float]:
        """(multiplicative scale b_still * g(|q|), additive offset = 0.0) for one observation."""
        if self.per_still is None:
            raise ValueError("model has no stills yet (refine first or pass still_ids)")
        q = float(q_magnitude)
        if not (np.isfinite(q) and q > 0):
            raise ValueError(f"q_magnitude must be positive, got {q_magnitude}")
        b = float(self.per_still.values[self.per_still.index_of([int(still_id)])[0]])
        if self.smoother is not None:
            b *= float(self.smoother.scale_at(np.array([q]))[0])
        return b, 0.0

    def scales_for(self, still_id: np.ndarray, q_magnitude: np.ndarray) -> np.ndarray:
        """Vectorised multiplicative scales for many observations."""
        t = self.per_still.values[self.per_still.index_of(still_id)]
        if self.smoother is not None:
            t = t * self.smoother.scale_at(q_magnitude)
        return t

    def reference_arrays(self, obs: ObservationSet, zmax: Optional[float] = _D.outlier_zmax):
        """Per-group reference (I, sigma, n) from observations scaled by the current model (exact g)."""
        t = self.per_still.values[obs.still_index]
        if self.smoother is not None:
            t = t * self.smoother.scale_at(obs.q)
        w = obs.weight.copy()

        def merge(wv):
            num = np.bincount(obs.group_index, wv * t * obs.intensity, minlength=obs.n_groups)
            den = np.bincount(obs.group_index, wv * t * t, minlength=obs.n_groups)
            n = np.bincount(obs.group_index, (wv > 0).astype(float), minlength=obs.n_groups)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(den > 0, num / den, np.nan), np.where(den > 0, 1 / np.sqrt(den), np.nan), n, den

        ih, sig, n, den = merge(w)
        if zmax:
            var_ref = np.where(den > 0, 1 / np.where(den > 0, den, 1), np.inf)[obs.group_index]
            with np.errstate(divide="ignore", invalid="ignore"):
                s2 = np.where(w > 0, 1 / np.where(w > 0, w, 1), np.inf)
                z = (obs.intensity - t * ih[obs.group_index]) / np.sqrt(s2 + t * t * var_ref)
            w = np.where((np.abs(z) > zmax) & (n[obs.group_index] > 2), 0.0, w)
            ih, sig, n, den = merge(w)
        return ih, sig, n.astype(int)

    def generate_references(self, binned_pixel_data, bragg_reflections=None) -> tuple[dict, dict]:
        """Bragg (P >= P_min_thresh) and diffuse references from the current scales, with z > 6 rejection."""
        obs, _ = self.observation_set(binned_pixel_data, bragg_reflections)
        ih, sig, n = self.reference_arrays(obs)
        nd = obs.n_diffuse_groups
        diffuse, bragg = {}, {}
        for g in range(obs.n_groups):
            if n[g] < 1 or not np.isfinite(ih[g]):
                continue
            entry = {"intensity": float(ih[g]), "sigma": float(sig[g]), "n_observations": int(n[g])}
            (diffuse if g < nd else bragg)[obs.group_keys[g]] = entry
        return bragg, diffuse


def outlier_mask(problem: ScalingProblem, b, c, ih, var, zmax: float) -> np.ndarray:
    """|I - t I_h| / sqrt(sigma^2 + t^2 var(I_h)) > zmax, for groups with >= 3 observations (chunked)."""
    o = problem.obs
    gb = problem.g_bins(c)
    n = problem.group_counts()
    out = np.zeros(o.n_obs, dtype=bool)
    if problem.use_kernels:
        bb = np.ascontiguousarray(b, dtype=np.float64)
        ihc = np.ascontiguousarray(ih, dtype=np.float64)
        varc = np.ascontiguousarray(var, dtype=np.float64)

        def part(lo, hi):
            kb, gbv, _, _ = problem._kernel_smoother_args(gb, lo, hi)
            return kernels.outlier_flags(problem._s[lo:hi], problem._g[lo:hi], problem._I[lo:hi], problem._w[lo:hi],
                                         bb, ihc, varc, n, kb, gbv, gb is not None, float(zmax), out[lo:hi])

        problem._run(part)
        return out
    for sl in problem._slices():
        gi = o.group_index[sl]
        t = b[o.still_index[sl]]
        if gb is not None:
            t = t * gb[problem.qbin[sl]]
        w = o.weight[sl]
        with np.errstate(divide="ignore", invalid="ignore"):
            s2 = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), np.inf)
            z = (o.intensity[sl] - t * ih[gi]) / np.sqrt(s2 + t * t * var[gi])
        out[sl] = np.isfinite(z) & (np.abs(z) > zmax) & (n[gi] >= 3)
    return out
