"""Reading the scaler's inputs and writing its outputs (JSON, PNG, HDF5 with provenance).

Inputs
- observation table (voxel-merger's ``observations.h5``, :mod:`diffractflow.formats.observations`): root 1-D
  datasets ``still_id`` (int), ``voxel_id`` (int), ``q_magnitude`` (|s| = 1/d, 1/Å), ``intensity``, ``sigma``;
  version 2 also ``weight`` (exposure) and ``still_names``.
- merged map (voxel-merger's ``map.h5``, :mod:`diffractflow.formats.merged_map`), or a flat HDF5 without that
  schema holding 1-D ``q_magnitude`` (or ``d``) and ``intensity`` datasets.
- Bragg intensities: DIALS ``.refl`` or HDF5 with 1-D ``intensity`` and ``d`` (Å) or ``q_magnitude``.

Outputs (relative): ``scales.json`` {still id: b} with I_obs ~ b * I_ref (:mod:`diffractflow.formats.scales`
version 2: keyed by the table's ``still_names``; a table without names gives version 1, keyed by its integer ids),
``statistics.json``,
``scales_per_still.png``, ``r_factor_per_iteration.png``.
Outputs (absolute): ``absolute_map.h5`` (NeXus, schema ``diffractflow.scaler.absolute_map``),
``absolute.json`` and ``absolute_profile.png``.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import diffractflow.errors
import h5py
import numpy as np
from cctbx import uctbx
from dials.array_family import flex
from diffractflow.artifacts import atomic_write_json, atomic_write_path, nexus_data_group
from diffractflow.formats import merged_map, observations, write_header
from diffractflow.formats import scales as scales_format
from diffractflow.reading import reader

from . import __version__

PRODUCER = "scaler"
OBS_FIELDS = tuple(n for n, _ in observations.FIELDS_BY_VERSION[1])
ABSOLUTE_SCHEMA = "diffractflow.scaler.absolute_map"
ABSOLUTE_SCHEMA_VERSION = 1


class InputError(diffractflow.errors.InputError):
    """An input file is missing, unreadable or not in the expected layout (message names the file).

    The platform's input error: the bus rejects the job without retry; the message names the file and the
    problem."""


def _own_errors():
    """The formats' platform InputError re-raised as this service's (same message)."""
    return diffractflow.errors.reraised_as(InputError)


@contextlib.contextmanager
def _open_table(path: Path):
    """An observation table opened and checked (``diffractflow.formats.observations``: schema, version, columns
    present, numeric, 1-D, equal length, not empty)."""
    with _own_errors(), observations.open_observations(path) as f:
        yield f


def _still_names(f) -> Optional[np.ndarray]:
    if "still_names" not in f:
        return None
    return observations.decode_names(f["still_names"])


@reader("observation table (HDF5)", InputError)
def read_observations(path: str | Path, float32: Optional[bool] = None) -> dict[str, np.ndarray]:
    """The whole flat observation table in memory (tests, small tables; ``scaler run`` streams it instead);
    floats as float32 when ``float32`` (default: if > 2e7 rows)."""
    path = Path(path)
    with _open_table(path) as f:
        n = f["intensity"].shape[0]
        ft = np.float32 if (n > 20_000_000 if float32 is None else float32) else np.float64
        out = {"still_id": f["still_id"][()].astype(np.int64, copy=False),
               "voxel_id": f["voxel_id"][()].astype(np.int64, copy=False)}
        for name in ("q_magnitude", "intensity", "sigma"):
            out[name] = f[name][()].astype(ft, copy=False)
        names = _still_names(f)
    if names is not None:
        out["still_names"] = names
    return out


READ_CHUNK = 1 << 22


def _int_column(ds, lo_hi_chunks, path: Path) -> np.ndarray:
    """An integer dataset read chunk by chunk into int32 when every value fits, else int64."""
    if ds.dtype.kind not in "iu":
        raise InputError(f"{path}: dataset {ds.name.lstrip('/')} must hold integers, got {ds.dtype}")
    n = ds.shape[0]
    out = np.empty(n, dtype=np.int32)
    for lo, hi in lo_hi_chunks:
        a = ds[lo:hi]
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            wide = np.empty(n, dtype=np.int64)
            wide[:lo] = out[:lo]
            del out
            for lo2, hi2 in ((x, y) for x, y in lo_hi_chunks if x >= lo):
                wide[lo2:hi2] = ds[lo2:hi2]
            return wide
        out[lo:hi] = a
    return out


@reader("observation table (HDF5)", InputError)
def stream_observations(path: str | Path, keep_q: bool = True, float32: Optional[bool] = None,
                        chunk: int = READ_CHUNK) -> dict[str, Any]:
    """The observation table read in chunks of ``chunk`` rows, ready for indexing (bounded memory).

    Returns ``still_id``/``voxel_id`` (int32 when the ids fit, else int64), ``intensity`` and ``weight``
    = 1/sigma^2 (float32 when ``float32``, default if > 2e7 rows; rows with sigma <= 0 or a non-finite
    sigma, intensity or |q| get weight 0 and intensity 0), ``q_magnitude`` (only with ``keep_q``),
    ``q_range`` (nanmin, nanmax of |q|, 1/Å) and optional ``still_names``. Sigma is never held whole,
    and no column is converted through a full-length temporary: peak memory is the result plus a chunk.
    """
    path = Path(path)
    with _open_table(path) as f:
        return _stream_columns(f, path, keep_q, float32, chunk)


def model_weights(voxel_id: np.ndarray, intensity: np.ndarray, weight: np.ndarray, exposure: np.ndarray,
                  floor_fraction: float = 0.05) -> np.ndarray:
    """Least-squares weights from the Poisson model instead of each observation's own counts.

    An observation is one still's estimate in one voxel, I = counts / exposure (the voxel-merger's table gives the
    exposure, column ``weight``). Its Poisson variance is (expected counts) / exposure^2 = I_v / exposure with I_v
    the voxel's true level; 1/sigma^2 from the observed counts instead gives low observations high weight, which
    at a few photons per voxel drags every mean and every scale (the harmonic-mean bias). I_v is estimated by the
    voxel's pooled mean over all stills (sum of counts / sum of exposures), floored at ``floor_fraction`` of the
    mean level so that empty-looking voxels do not dominate. Unusable rows stay at weight 0, except a still-voxel
    that saw no photon (sigma 0 from its counts, intensity 0): it is data, and dropping it would bias means up.
    """
    usable = (weight > 0) | ((intensity == 0) & (exposure > 0) & np.isfinite(exposure))
    e = np.where(usable, exposure, 0).astype(np.float64)
    vid = np.asarray(voxel_id)
    if vid.size and int(vid.max()) < 50_000_000:
        inv, nv = vid, int(vid.max()) + 1
    else:
        _, inv = np.unique(vid, return_inverse=True)
        nv = int(inv.max()) + 1 if inv.size else 0
    se = np.bincount(inv, weights=e, minlength=nv)
    sn = np.bincount(inv, weights=e * intensity, minlength=nv)
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(se > 0, sn / se, 0.0)
    pos = level[se > 0]
    floor = floor_fraction * float(np.mean(np.abs(pos))) if pos.size else 1.0
    level = np.maximum(level, max(floor, 1e-12))
    return (e / level[inv]).astype(weight.dtype, copy=False)


def _stream_columns(f, path: Path, keep_q: bool, float32: Optional[bool], chunk: int) -> dict[str, Any]:
    """The columns of an open, checked observation table (see :func:`stream_observations`)."""
    n = f["intensity"].shape[0]
    if float32 is None:
        float32 = n > 20_000_000
    ft = np.float32 if float32 else np.float64
    chunks = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    out: dict[str, Any] = {"still_id": _int_column(f["still_id"], chunks, path),
                           "voxel_id": _int_column(f["voxel_id"], chunks, path)}
    inten = np.empty(n, dtype=ft)
    w = np.empty(n, dtype=ft)
    q = np.empty(n, dtype=ft) if keep_q else None
    qmin, qmax = np.inf, -np.inf
    dq, di, ds = f["q_magnitude"], f["intensity"], f["sigma"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for lo, hi in chunks:
            qc = dq[lo:hi].astype(ft, copy=False)
            ic = di[lo:hi].astype(ft, copy=False)
            sc = ds[lo:hi]
            wc = (1.0 / (sc.astype(ft, copy=False) ** 2)).astype(ft, copy=False)
            bad = ~(np.isfinite(wc) & np.isfinite(ic) & np.isfinite(qc) & (sc > 0))
            if bad.any():
                wc[bad] = 0
                ic[bad] = 0
            inten[lo:hi] = ic
            w[lo:hi] = wc
            if q is not None:
                q[lo:hi] = qc
            if np.isfinite(qc).any():
                qmin = min(qmin, float(np.nanmin(qc)))
                qmax = max(qmax, float(np.nanmax(qc)))
    if "weight" in f and f["weight"].shape == (n,):
        w = model_weights(out["voxel_id"], inten, w, f["weight"][()].astype(ft, copy=False))
    out.update(intensity=inten, weight=w, q_range=(qmin, qmax))
    if q is not None:
        out["q_magnitude"] = q
    names = _still_names(f)
    if names is not None:
        out["still_names"] = names
    return out


def write_observations(path: str | Path, still_id, voxel_id, q_magnitude, intensity, sigma,
                       still_names=None, weight=None) -> Path:
    """Write an observation table (tests, benchmarks and synthetic runs): version 1, or version 2 with ``weight``
    (exposures; then ``still_names`` too)."""
    return observations.write_observations(path, still_id, voxel_id, q_magnitude, intensity, sigma, weight=weight,
                                           still_names=still_names, producer=PRODUCER, producer_version=__version__)


def write_relative_outputs(out_dir: str | Path, refined: Mapping[int, Mapping[str, float]], statistics: Mapping[str, Any],
                           still_names: Optional[np.ndarray] = None, plots: bool = True) -> dict[str, Path]:
    """scales.json ({still id: b}, still ids from the table's ``still_names``), statistics.json and the two plots;
    returns name -> path. A table without ``still_names`` gives scales keyed by its integer still ids (the old
    version-1 form, the only names such a table has)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = sorted(refined)
    if still_names is not None:
        bad = [k for k in order if not 0 <= int(k) < len(still_names)]
        if bad:
            raise ValueError(f"still ids {bad[:5]} are outside the table's {len(still_names)} still_names")
        scales = {str(still_names[int(k)]): float(refined[k]["multiplicative_scale"]) for k in order}
        version = scales_format.VERSION
    else:
        scales = {str(k): float(refined[k]["multiplicative_scale"]) for k in order}
        version = 1
    paths = {"scales": scales_format.write_scales(out / "scales.json", scales, version=version)}
    stats = dict(statistics)
    stats["convention"] = "I_obs ~ b * g(|q|) * I_reference (DIALS convention); scales.json holds b"
    stats["producer"] = {"service": PRODUCER, "version": __version__}
    stats["scales_schema"] = {"schema": scales_format.SCHEMA, "schema_version": version}
    if still_names is not None:  # table index -> still id (the keys of scales.json), for readers of old runs
        stats["still_names"] = {str(k): str(still_names[int(k)]) for k in order}
    paths["statistics"] = atomic_write_json(out / "statistics.json", stats)
    if plots:
        paths.update(plot_relative(out, scales, stats))
    return paths


def _save_fig(fig, path: Path) -> Path:
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def plot_relative(out: Path, scales: Mapping[str, float], stats: Mapping[str, Any]) -> dict[str, Path]:
    import matplotlib  # heavy, and only for the optional PNGs: imported when a plot is made

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    vals = np.array(list(scales.values()))  # in table order
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(np.arange(vals.size), vals, ".", ms=3)
    ax.set_xlabel("still (observation-table order)")
    ax.set_ylabel("scale b (I_obs ≈ b·I_ref)")
    ax.set_title(f"per-still scales ({len(vals)} stills)")
    fig.tight_layout()
    p1 = _save_fig(fig, out / "scales_per_still.png")
    plt.close(fig)
    hist = stats.get("r_factor_history", [])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(np.arange(len(hist)), hist, "o-")
    ax.set_xlabel("iteration (0 = start)")
    ax.set_ylabel("R = Σ|I − b·g·I_ref| / Σ|I|")
    ax.set_title("R-factor per iteration")
    fig.tight_layout()
    p2 = _save_fig(fig, out / "r_factor_per_iteration.png")
    plt.close(fig)
    return {"plot_scales": p1, "plot_r_factor": p2}


# ----------------------------------------------------------------------------- absolute scaling I/O
def _s_from_fractional_hkl(unit_cell, h, k, l) -> np.ndarray:
    """|s| = 1/d (1/Å) of fractional Miller indices under the cell's reciprocal metric (cctbx uctbx)."""
    aa, bb, cc, ab, ac, bc = uctbx.unit_cell(tuple(float(x) for x in unit_cell)).reciprocal_metrical_matrix()
    s2 = h * h * aa + k * k * bb + l * l * cc + 2 * (h * k * ab + h * l * ac + k * l * bc)
    return np.sqrt(np.maximum(s2, 0.0))


@reader("merged map (HDF5)", InputError)
def read_map(path: str | Path) -> dict[str, Any]:
    """Voxel values and |s| from a voxel-merger map.h5 (:mod:`diffractflow.formats.merged_map`, told by its
    schema) or from a flat HDF5 of another schema with 1-D ``q_magnitude`` (or ``d``) and ``intensity``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: map file not found")
    if merged_map.is_map(path):
        with _own_errors():
            m = merged_map.read_map(path, ("intensity", "sigma", "h", "k", "l"))
        inten = m["intensity"]
        H, K, L = np.meshgrid(m["h"], m["k"], m["l"], indexing="ij")
        if H.shape != inten.shape:
            raise InputError(f"{path}: map shape {inten.shape} does not match its h,k,l axes {H.shape}")
        s = _s_from_fractional_hkl(m["unit_cell"], H, K, L)
        return {"intensity": inten, "s": s, "unit_cell": m["unit_cell"], "layout": "nexus", "sigma": m["sigma"]}
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not an HDF5 file ({exc})") from exc
    with f:
        if "intensity" in f and ("q_magnitude" in f or "d" in f):
            inten = f["intensity"][()]
            s = f["q_magnitude"][()] if "q_magnitude" in f else 1.0 / f["d"][()]
            cell = f.attrs.get("unit_cell")
            return {"intensity": inten, "s": np.asarray(s, dtype=float),
                    "unit_cell": None if cell is None else np.asarray(cell, dtype=float), "layout": "flat",
                    "sigma": f["sigma"][()] if "sigma" in f else None}
    raise InputError(f"{path}: expected a voxel-merger map (schema {merged_map.SCHEMA}) or a flat HDF5 with "
                     "1-D q_magnitude (or d) and intensity")


@reader("Bragg reference (HDF5)", InputError)
def read_bragg(path: str | Path) -> dict[str, np.ndarray]:
    """Bragg intensities (per unit cell, relative scale) and |s| from a DIALS .refl or an HDF5 file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: Bragg file not found")
    if path.suffix == ".refl":
        t = flex.reflection_table.from_file(str(path))
        col = "intensity.scale.value" if "intensity.scale.value" in t else "intensity.sum.value"
        if col not in t or "d" not in t:
            raise InputError(f"{path}: reflection table needs {col} and d columns")
        return {"intensity": t[col].as_numpy_array(), "s": 1.0 / t["d"].as_numpy_array()}
    try:
        with h5py.File(path, "r") as f:
            if "intensity" not in f or not ("d" in f or "q_magnitude" in f):
                raise InputError(f"{path}: expected 1-D datasets intensity and d (Å) or q_magnitude (1/Å)")
            s = f["q_magnitude"][()] if "q_magnitude" in f else 1.0 / f["d"][()]
            return {"intensity": f["intensity"][()].astype(float), "s": np.asarray(s, dtype=float)}
    except OSError as exc:
        raise InputError(f"{path}: not an HDF5 file ({exc})") from exc


def write_absolute_map(path: str | Path, values: np.ndarray, s: np.ndarray, compton: np.ndarray,
                       result: Mapping[str, Any], parameters: Mapping[str, Any], inputs: Mapping[str, str],
                       unit_cell=None, sigma=None, job_id: Optional[str] = None) -> Path:
    """NeXus HDF5: entry/absolute/{intensity (e.u./cell, Compton removed), s, compton}."""
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_header(f, schema=ABSOLUTE_SCHEMA, version=ABSOLUTE_SCHEMA_VERSION, producer=PRODUCER,
                         producer_version=__version__, job_id=job_id, parameters=parameters, inputs=inputs)
            g = nexus_data_group(f, "absolute", signal="intensity")
            e = f["entry"]
            d = g.create_dataset("intensity", data=np.asarray(values, dtype=np.float64), compression="gzip")
            d.attrs["units"] = "electron units per unit cell"
            d.attrs["long_name"] = "K * I_relative - I_Compton(|s|)"
            if sigma is not None:
                g.create_dataset("sigma", data=np.asarray(sigma, dtype=np.float64), compression="gzip")
            ds = g.create_dataset("s", data=np.asarray(s, dtype=np.float64), compression="gzip")
            ds.attrs["units"] = "1/angstrom (|s| = 1/d)"
            dc = g.create_dataset("compton", data=np.asarray(compton, dtype=np.float64), compression="gzip")
            dc.attrs["units"] = "electron units per unit cell"
            if unit_cell is not None:
                g.create_dataset("unit_cell", data=np.asarray(unit_cell, dtype=float))
            r = e.create_group("scaling")
            r.attrs["NX_class"] = "NXcollection"
            r.attrs["json"] = json.dumps(dict(result), default=str)
    return Path(path)


def plot_absolute(path: Path, edges, profile_abs, theory_coh, theory_inc) -> Path:
    import matplotlib  # heavy, and only for the optional PNGs: imported when a plot is made

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    centres = 0.5 * (edges[1:] + edges[:-1])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(centres, profile_abs, "o", ms=3, label="K × observed shell mean (Bragg + diffuse)")
    ax.plot(centres, theory_coh + theory_inc, "-", label="Σf² + Compton (theory)")
    ax.plot(centres, theory_inc, "--", label="Compton (theory)")
    ax.set_xlabel("|s| = 1/d (1/Å)")
    ax.set_ylabel("e.u. per unit cell")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
    return path


def write_bragg_merged(path: str | Path, hkl: np.ndarray, q_magnitude: np.ndarray, intensity: np.ndarray,
                       sigma: np.ndarray, n_obs: np.ndarray, partiality_threshold: float) -> Path:
    """Merged Bragg references of the relative scaling (``read_bragg`` reads it for the absolute scale).

    Root 1-D datasets ``h``, ``k``, ``l`` (asymmetric unit), ``q_magnitude`` (1/d, 1/Å), ``d`` (Å),
    ``intensity`` and ``sigma`` (|F|^2 on the diffuse map's relative scale, partiality-corrected),
    ``n_observations``.
    """
    ok = np.isfinite(intensity) & (n_obs > 0)
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_header(f, schema="diffractflow.scaler.bragg_merged", version=1, producer=PRODUCER,
                         producer_version=__version__, parameters={"partiality_threshold": partiality_threshold})
            for i, a in enumerate("hkl"):
                f.create_dataset(a, data=np.asarray(hkl, dtype=np.int32)[ok, i])
            f.create_dataset("q_magnitude", data=np.asarray(q_magnitude, dtype=float)[ok]).attrs["units"] = "1/angstrom"
            f.create_dataset("d", data=1.0 / np.asarray(q_magnitude, dtype=float)[ok]).attrs["units"] = "angstrom"
            d = f.create_dataset("intensity", data=np.asarray(intensity, dtype=float)[ok])
            d.attrs["units"] = "diffuse-map units (|F|^2 on the relative scale, I_obs ~ b * I_ref)"
            f.create_dataset("sigma", data=np.asarray(sigma, dtype=float)[ok])
            f.create_dataset("n_observations", data=np.asarray(n_obs, dtype=np.int32)[ok])
    return Path(path)
