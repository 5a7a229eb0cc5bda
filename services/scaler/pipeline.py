"""File-level steps shared by the CLI and the worker: relative scaling and absolute scaling."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from cctbx import uctbx
from diffractflow.artifacts import atomic_write_json

from . import artifacts
from .core import absolute as ab
from .core import bragg as bragg_mod
from .core.model import DiffuseScalingModel, compact_ids
from .core.params import RELATIVE_DEFAULTS as _D
from .core.params import AbsoluteParams, RelativeParams
from .core.refine import ObservationSet

log = logging.getLogger(__name__)


def observation_set_from_table(table: Mapping[str, np.ndarray]) -> ObservationSet:
    """Index a flat observation table (still_id, voxel_id, q_magnitude, intensity, sigma) without copies of Python objects."""
    sidx, skeys = compact_ids(table["still_id"])
    gidx, gkeys = compact_ids(table["voxel_id"])
    sig = table["sigma"]
    inten = table["intensity"]
    ft = sig.dtype if np.issubdtype(sig.dtype, np.floating) else np.float64
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (1.0 / (sig.astype(ft, copy=False) ** 2)).astype(ft, copy=False)
    bad = ~(np.isfinite(w) & np.isfinite(inten) & np.isfinite(table["q_magnitude"]) & (sig > 0))
    if bad.any():
        w[bad] = 0
        inten = np.where(bad, 0, inten).astype(inten.dtype, copy=False)
    return ObservationSet(sidx, gidx, table["q_magnitude"], inten, w, skeys, len(gkeys), None, len(gkeys))


def load_observation_set(path: str | Path, keep_q: bool = True) -> tuple[ObservationSet, dict[str, Any]]:
    """Stream OBS.h5 (chunked read, see :func:`artifacts.stream_observations`) into an indexed set.

    Without ``keep_q`` (no resolution smoother) |q| is only checked for validity and not kept
    (the set's ``q`` is None). Returns the set and {"still_names", "q_range"}.
    """
    table = artifacts.stream_observations(path, keep_q=keep_q)
    sidx, skeys = compact_ids(table.pop("still_id"))
    gidx, gkeys = compact_ids(table.pop("voxel_id"))
    obs = ObservationSet(sidx, gidx, table.pop("q_magnitude", None), table.pop("intensity"), table.pop("weight"),
                         skeys, len(gkeys), None, len(gkeys))
    return obs, {"still_names": table.get("still_names"), "q_range": table["q_range"]}


def append_bragg(obs: ObservationSet, bragg: Mapping[str, np.ndarray], min_partiality: float) -> tuple[ObservationSet, dict]:
    """``obs`` plus the Bragg rows with partiality >= ``min_partiality`` (full intensity I/P, sigma/P), one group
    per asymmetric-unit Miller index after the diffuse groups; rows of stills the table lacks are dropped."""
    key_of = {int(k): i for i, k in enumerate(obs.still_ids.tolist())}
    sidx = np.array([key_of.get(int(s), -1) for s in bragg["still_id"]], dtype=np.int64)
    P = np.asarray(bragg["partiality"], dtype=float)
    sig = np.asarray(bragg["sigma"], dtype=float)
    keep = (sidx >= 0) & (P >= min_partiality) & (P > 0) & (sig > 0) & np.isfinite(bragg["intensity"])
    info: dict[str, Any] = {"n_bragg_input": int(len(P)), "n_bragg_below_partiality_threshold": int(((P < min_partiality) & (sidx >= 0)).sum()),
            "n_bragg": int(keep.sum())}
    if not keep.any():
        return obs, {**info, "n_bragg_groups": 0}
    hkl_keys, hidx = np.unique(np.asarray(bragg["miller_index_asu"])[keep], axis=0, return_inverse=True)
    n0 = int(obs.n_groups)
    inten = np.asarray(bragg["intensity"], dtype=float)[keep] / P[keep]
    w = (P[keep] / sig[keep]) ** 2
    ft = obs.intensity.dtype
    cat = lambda a, b, dt: np.concatenate([a, np.asarray(b, dtype=dt)])  # noqa: E731
    q = None if obs.q is None else cat(obs.q, np.asarray(bragg["q_magnitude"])[keep], obs.q.dtype)
    keys = (list(obs.group_keys) if obs.group_keys is not None else list(range(n0))) + \
        [tuple(int(v) for v in h) for h in hkl_keys]
    out = ObservationSet(cat(obs.still_index, sidx[keep], obs.still_index.dtype),
                         cat(obs.group_index, n0 + hidx.reshape(-1), np.int64 if n0 + len(hkl_keys) >= 2**31 else obs.group_index.dtype),
                         q, cat(obs.intensity, inten, ft), cat(obs.weight, w, obs.weight.dtype), obs.still_ids,
                         n0 + len(hkl_keys), keys, n0)
    qk = np.asarray(bragg["q_magnitude"], dtype=float)[keep]
    group_q = np.bincount(hidx.reshape(-1), qk) / np.maximum(np.bincount(hidx.reshape(-1)), 1)
    return out, {**info, "n_bragg_groups": int(len(hkl_keys)), "group_q": group_q}


def build_config(smoother: bool = _D.smoother, n_control_points: int = _D.n_control_points,
                 q_range: Optional[tuple[float, float]] = None, smoothness_weight: float = _D.smoothness_weight,
                 partiality_threshold: float = _D.partiality_threshold,
                 q_values: Optional[np.ndarray] = None, min_information: Optional[float] = None) -> dict:
    """A seed-003 configdict (smoother range from the data's |q| range when not given); defaults: those of
    :class:`core.params.RelativeParams`."""
    cfg = {"per_still_scale": {"enabled": True, "initial_values": {}},
           "resolution_smoother": {"enabled": bool(smoother)},
           "experimental_components": {"panel_scale": {"enabled": False}, "spatial_scale": {"enabled": False},
                                       "additive_offset": {"enabled": False}},
           "partiality_threshold": float(partiality_threshold)}
    if smoother:
        if q_range is None:
            if q_values is None:
                raise ValueError("resolution smoother needs a q range")
            q_range = (float(np.nanmin(q_values)), float(np.nanmax(q_values)))
            if q_range[1] <= q_range[0]:
                q_range = (q_range[0], q_range[0] + 1e-3)
        cfg["resolution_smoother"].update({"n_control_points": int(n_control_points),
                                           "resolution_range": [float(q_range[0]), float(q_range[1])],
                                           "smoothness_weight": float(smoothness_weight)})
        if min_information is not None:
            cfg["resolution_smoother"]["min_information"] = float(min_information)
    return cfg


def resolve_sequences(sequences: Optional[Mapping[str, list]], still_names: Optional[np.ndarray],
                      source: str | Path = "observation table") -> tuple[dict[str, list], dict[str, list[str]]]:
    """Rotation sweeps keyed by the table's still names -> the table's integer still ids (None for a frame
    not in the table: a gap in the sweep). Keys are matched to ``still_names`` (``<image file>#<index>``, as the
    voxel-merger names stills); a table without ``still_names`` takes integer still ids. Returns (ids per sweep,
    unmatched keys per sweep)."""
    if not sequences:
        return {}, {}
    index = {str(n): i for i, n in enumerate(still_names)} if still_names is not None else None
    out, unmatched = {}, {}
    for sweep, keys in sequences.items():
        if isinstance(keys, (str, bytes)) or not hasattr(keys, "__iter__"):
            raise artifacts.InputError(f"rotation sequence {sweep!r}: expected a list of still keys in rotation order")
        ids, miss = [], []
        for k in keys:
            if index is not None:
                i = index.get(str(k))
            else:
                i = int(k) if str(k).lstrip("-").isdigit() else None
            if i is None:
                miss.append(str(k))
            ids.append(i)
        if index is None and miss:
            raise artifacts.InputError(f"{source}: no still_names in the observation table, so rotation sequences "
                                       f"must list integer still ids; got {miss[:3]} in sweep {sweep!r}")
        out[str(sweep)] = ids
        if miss:
            unmatched[str(sweep)] = miss
    return out, unmatched


def _params(model: type, params, fields: dict):
    """``params`` (or the model's defaults) with ``fields`` applied, validated by the model."""
    if params is None:
        return model(**fields)
    return model.model_validate({**params.model_dump(), **fields}) if fields else params


def run_relative(observations: str | Path, out_dir: str | Path, params: Optional[RelativeParams] = None, *,
                 plots: bool = True, progress: Optional[Callable[[int, float], None]] = None,
                 bragg: Optional[list[tuple[str | Path, Optional[str | Path]]]] = None,
                 **fields: Any) -> tuple[dict[str, Path], dict]:
    """Read OBS.h5 (+ the stills-processor's ``(refl, expt)`` units as Bragg references), refine the v1 model,
    write scales.json / statistics.json / plots (and bragg_merged.h5 with Bragg references).

    ``params`` (:class:`core.params.RelativeParams`; or its fields as keywords, e.g. ``smoother=True``).
    ``params.sequences``: rotation sweeps, sweep id -> still names of the table (``still_names``) in rotation order;
    their frame scales are tied by a second-difference restraint on ln b of weight ``rotation_smoothness`` (relative
    to one frame's information, see :class:`core.refine.RotationRestraint`); other stills keep free scales."""
    p = _params(RelativeParams, params, fields)
    smoother, partiality_threshold = p.smoother, p.partiality_threshold
    t0 = time.perf_counter()
    obs, extra = load_observation_set(observations, keep_q=smoother)
    t_read = time.perf_counter() - t0
    # rows with sigma <= 0 or a NaN/Inf value carry weight 0: excluded, and said so
    n_excluded = int(np.count_nonzero(obs.weight == 0))
    names = extra["still_names"]
    bragg_info: dict[str, Any] = {}
    if bragg:
        if names is None:
            raise artifacts.InputError(f"{observations}: no still_names in the observation table; Bragg reflections "
                                       "are matched to stills by name")
        table = bragg_mod.read_reflections(bragg, space_group=p.space_group, rlp_sigma=p.rlp_sigma,
                                           error=artifacts.InputError)
        cols, n_unmatched = table.for_model({str(n): i for i, n in enumerate(names)})
        obs, bragg_info = append_bragg(obs, cols, partiality_threshold)
        bragg_q = bragg_info.pop("group_q", None)
        bragg_info.update({"n_bragg_unmatched_stills": n_unmatched, "partiality_threshold": partiality_threshold,
                           "bragg_per_still": table.per_still,
                           "bragg_units": "full intensity x V_cell sqrt(2 pi) sigma_eps Omega_ref / lambda^2 "
                                          "(|F|^2 on the diffuse map's scale)"})
    cfg = build_config(smoother, p.n_control_points, p.q_range, p.smoothness_weight, partiality_threshold,
                       q_values=np.asarray(extra["q_range"]) if smoother else None,
                       min_information=p.smoother_min_information)
    seq_ids, seq_unmatched = resolve_sequences(p.sequences, names, observations)
    if seq_ids:
        cfg["rotation_restraint"] = {"sequences": seq_ids, "weight": float(p.rotation_smoothness)}
    model = DiffuseScalingModel(cfg, still_ids=obs.still_ids.tolist())
    refined, stats = model.refine_observation_set(obs, p.refinement(), progress=progress,
                                                  reorder_inplace=not bragg)
    stats = dict(stats)
    stats.update(bragg_info)
    stats["timing_s"] = {"read_and_index": round(t_read, 3), "total": round(time.perf_counter() - t0, 3)}
    stats["input"] = str(observations)
    stats["n_excluded"] = n_excluded
    if seq_unmatched and "rotation_restraint" in stats:
        for sweep, miss in seq_unmatched.items():
            stats["rotation_restraint"]["sequences"].setdefault(sweep, {})["keys_not_in_table"] = miss[:20]
    paths = artifacts.write_relative_outputs(out_dir, refined, stats, names, plots=plots)
    if bragg_info.get("n_bragg_groups"):
        cur = model._last_obs
        ih, var = model._last_reference
        nd = cur.n_diffuse_groups
        g = cur.group_index.astype(np.int64)
        n = np.bincount(g[g >= nd] - nd, minlength=cur.n_groups - nd)
        hkl = np.array(cur.group_keys[nd:], dtype=np.int64).reshape(-1, 3)
        paths["bragg_merged"] = artifacts.write_bragg_merged(Path(out_dir) / "bragg_merged.h5", hkl, bragg_q, ih[nd:],
                                                             np.sqrt(var[nd:]), n, partiality_threshold)
    return paths, stats


def run_absolute(map_path: str | Path, out_dir: str | Path, params: Optional[AbsoluteParams] = None, *,
                 pdb: Optional[str | Path] = None, bragg: Optional[str | Path] = None, s_max: Optional[float] = None,
                 job_id: Optional[str] = None, inputs_hashes: Optional[Mapping[str, str]] = None,
                 **fields: Any) -> tuple[dict[str, Path], dict[str, Any]]:
    """Scale a relatively scaled map to e.u. per unit cell (Krogh-Moe / Norman) and subtract Compton.

    ``params``: :class:`core.params.AbsoluteParams` (or its fields as keywords); the contents come from exactly
    one of ``params.formula``, ``params.sequence`` or ``pdb``."""
    p = _params(AbsoluteParams, params, fields)
    formula, sequence, copies, extra_formula = p.formula, p.sequence, p.copies, p.extra_formula
    cell_volume, wavelength, n_shells = p.cell_volume, p.wavelength, p.n_shells
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = artifacts.read_map(map_path)
    try:
        comp, vol_pdb = ab.composition_from_spec(formula, sequence, pdb, copies, extra_formula)
    except (ValueError, OSError) as exc:  # the user's formula, sequence or model file
        raise artifacts.InputError(f"unit-cell contents ({pdb or 'formula/sequence'}): {exc}") from exc
    vol = cell_volume or vol_pdb
    if vol is None and m.get("unit_cell") is not None:
        vol = float(uctbx.unit_cell(tuple(m["unit_cell"])).volume())
    if vol is None:
        raise artifacts.InputError(f"{map_path}: no unit cell in the map; give --cell-volume or a PDB model")
    vals = np.asarray(m["intensity"], dtype=float)
    s = np.asarray(m["s"], dtype=float)
    ok = np.isfinite(vals) & (s > 0)
    br = artifacts.read_bragg(bragg) if bragg is not None else None
    smax = s_max or float(np.max(s[ok]))
    edges = ab.shell_edges(smax, n_shells, 0.0)
    prof, nd, nb = ab.shell_profile(edges, s[ok], vals[ok], None if br is None else br["s"],
                                    None if br is None else br["intensity"])
    res = ab.krogh_moe_scale(edges, prof, comp, vol, wavelength)
    k = res["scale"]
    compton = ab.incoherent_scattering(s, comp, wavelength)
    absolute = np.where(np.isfinite(vals), k * vals - compton, np.nan)
    sigma = None if m.get("sigma") is None else k * np.asarray(m["sigma"], dtype=float)
    res.update({"composition": comp, "wavelength": wavelength, "n_shells": n_shells,
                "bragg_included": br is not None, "n_voxels_used": int(ok.sum()),
                "compton_model": "incoherent scattering functions S(x, Z) of Hubbell et al. (1975) from xraylib "
                                 "SF_Compt, x = sin(theta)/lambda = |s|/2"
                                 + (" x Breit-Dirac recoil (lambda/lambda')^2 (photon counting)" if wavelength else ""),
                "f0_table": "cctbx.eltbx.xray_scattering.wk1995"})
    params = {"formula": formula, "sequence": sequence is not None, "pdb": str(pdb) if pdb else None, "copies": copies,
              "extra_formula": extra_formula, "cell_volume": vol, "wavelength": wavelength, "n_shells": n_shells}
    paths = {"absolute_map": artifacts.write_absolute_map(out / "absolute_map.h5", absolute, s, compton, res, params,
                                                          dict(inputs_hashes or {}), m.get("unit_cell"), sigma, job_id)}
    centres = 0.5 * (edges[1:] + edges[:-1])
    res["profile"] = {"s_centre": centres.tolist(), "observed_scaled": (k * prof).tolist(),
                      "theory_coherent": ab.coherent_sum_f2(centres, comp, wavelength).tolist(),
                      "theory_compton": ab.incoherent_scattering(centres, comp, wavelength).tolist()}
    paths["absolute"] = atomic_write_json(out / "absolute.json", res)
    paths["plot_profile"] = artifacts.plot_absolute(out / "absolute_profile.png", edges, k * prof,
                                                    np.array(res["profile"]["theory_coherent"]),
                                                    np.array(res["profile"]["theory_compton"]))
    return paths, res
