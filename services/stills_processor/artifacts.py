"""Outputs of stills-processor: per-image DIALS files and the per-job HDF5 summary.

Per work unit (one still image, or one rotation sequence) under the output directory:

- ``<name>.expt``          refined (and integrated) experiment list; its imageset path is the input file;
- ``<name>.refl``          integrated reflections (summation intensities, ``xyzcal``/``xyzobs``, ``bbox``);
- ``<name>_indexed.refl``  the indexed strong spots used in refinement (observed centroids + hkl).

Per job: ``summary.h5`` (schema ``diffractflow.stills_summary`` v2, see :data:`SUMMARY_FIELDS`),
one row per work unit in group ``/summary``: status and reason, spot counts, unit cell, A matrix,
RMSDs, the q-vector validation and the paths (relative to the summary file) of the DIALS files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from diffractflow.artifacts import atomic_write_path, write_provenance

from . import __version__

SUMMARY_SCHEMA = "diffractflow.stills_summary"
SUMMARY_SCHEMA_VERSION = 2  # 2: strategy and attempts columns
PRODUCER = "stills-processor"

# column name -> (kind, units, description). kind: str, int, float, bool, or a shape tuple of floats.
SUMMARY_FIELDS: dict[str, tuple[Any, str, str]] = {
    "name": ("str", "", "output stem of this unit (<name>.expt / <name>.refl)"),
    "kind": ("str", "", "still | sequence | unreadable"),
    "input_path": ("str", "", "first input file (absolute path as given)"),
    "input_files": ("str", "", "JSON list of all input files of the unit (sequences have several)"),
    "frame": ("int", "", "image index inside a multi-image still file (0 for single-image files)"),
    "status": ("str", "", "indexed | non_hit | failed | error"),
    "reason": ("str", "", "why the unit is not indexed (empty when indexed; every failed strategy's reason when all failed)"),
    "strategy": ("str", "", "processing strategy that indexed the still (core.params.STRATEGIES; "
                 "'<name>+relaxed_profile' when integrated with the relaxed sigma_b cut-off; '' if not indexed)"),
    "attempts": ("str", "", "JSON list of the failed attempts before it: {strategy, reason}"),
    "n_spots": ("int", "", "strong spots found"),
    "n_indexed": ("int", "", "strong spots given a Miller index by the indexer"),
    "n_refined": ("int", "", "indexed spots kept by the final refinement (outliers removed); RMSDs and validation use these"),
    "n_integrated": ("int", "", "reflections integrated by summation"),
    "unit_cell": ((6,), "angstrom,deg", "refined cell a, b, c, alpha, beta, gamma (NaN if not indexed)"),
    "space_group": ("str", "", "space group of the crystal model (Hermann-Mauguin)"),
    "A_matrix": ((3, 3), "1/angstrom", "A = U B (DIALS convention, q = A h in the lab frame of a still)"),
    "U_matrix": ((3, 3), "", "orientation matrix U"),
    "B_matrix": ((3, 3), "1/angstrom", "reciprocal-cell matrix B"),
    "rmsd_x_px": ("float", "pixel", "RMSD observed - predicted, detector fast axis"),
    "rmsd_y_px": ("float", "pixel", "RMSD observed - predicted, detector slow axis"),
    "rmsd_z": ("float", "deg", "RMSD DeltaPsi (stills) or phi (sequences)"),
    "validation_passed": ("bool", "", "q-vector consistency check passed"),
    "validation_n": ("int", "", "indexed reflections used in the check"),
    "q_median_error": ("float", "1/angstrom", "median |q_obs - q_pred|"),
    "q_max_error": ("float", "1/angstrom", "max |q_obs - q_pred|"),
    "q_rel_median_error": ("float", "", "median |q_obs - q_pred| / |q_obs|"),
    "px_median_error": ("float", "pixel", "median detector offset observed - predicted"),
    "px_p90_error": ("float", "pixel", "90th percentile detector offset"),
    "mm_median_error": ("float", "mm", "median detector offset observed - predicted"),
    "expt_path": ("str", "", "refined experiment list, relative to the summary file ('' if none)"),
    "refl_path": ("str", "", "integrated reflections, relative to the summary file ('' if none)"),
    "indexed_refl_path": ("str", "", "indexed strong spots, relative to the summary file ('' if none)"),
    "seconds": ("float", "s", "wall time spent on the unit"),
    "cpu_seconds": ("float", "s", "CPU time of the worker process spent on the unit"),
}


def empty_record() -> dict[str, Any]:
    """A summary row with every field at its 'missing' value."""
    rec: dict[str, Any] = {}
    for key, (kind, _u, _d) in SUMMARY_FIELDS.items():
        if kind == "str":
            rec[key] = ""
        elif kind == "int":
            rec[key] = 0
        elif kind == "bool":
            rec[key] = False
        elif kind == "float":
            rec[key] = math.nan
        else:
            rec[key] = np.full(kind, np.nan).tolist()
    rec["input_files"] = "[]"
    rec["attempts"] = "[]"
    return rec


def write_unit_files(out_dir: Path, name: str, experiments, integrated, indexed) -> dict[str, str]:
    """Write ``<name>.expt``, ``<name>.refl`` and ``<name>_indexed.refl`` atomically; relative paths."""
    paths: dict[str, str] = {}
    if experiments is not None:
        with atomic_write_path(out_dir / f"{name}.expt") as tmp:
            experiments.as_json(str(tmp))
        paths["expt_path"] = f"{name}.expt"
    if integrated is not None:
        with atomic_write_path(out_dir / f"{name}.refl") as tmp:
            integrated.as_msgpack_file(str(tmp))
        paths["refl_path"] = f"{name}.refl"
    if indexed is not None:
        with atomic_write_path(out_dir / f"{name}_indexed.refl") as tmp:
            indexed.as_msgpack_file(str(tmp))
        paths["indexed_refl_path"] = f"{name}_indexed.refl"
    return paths


def write_summary(
    path: Path,
    records: Iterable[Mapping[str, Any]],
    *,
    parameters: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
    job_id: str | None = None,
    tolerances: Mapping[str, float] | None = None,
) -> Path:
    """Write the per-job summary table (one row per unit) to ``path`` atomically."""
    rows = [dict(empty_record(), **dict(r)) for r in records]
    n = len(rows)
    str_dt = h5py.string_dtype()
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_provenance(f, schema=SUMMARY_SCHEMA, schema_version=SUMMARY_SCHEMA_VERSION, producer=PRODUCER,
                             producer_version=__version__, job_id=job_id, parameters=parameters or {},
                             inputs=inputs or {})
            f.attrs["NX_class"] = "NXroot"
            g = f.create_group("summary")
            g.attrs["NX_class"] = "NXcollection"
            g.attrs["n_units"] = n
            for status in ("indexed", "non_hit", "failed", "error"):
                g.attrs[f"n_{status}"] = sum(r["status"] == status for r in rows)
            for k, v in (tolerances or {}).items():
                g.attrs[k] = v
            for key, (kind, units, desc) in SUMMARY_FIELDS.items():
                vals = [r[key] for r in rows]
                if kind == "str":
                    ds = g.create_dataset(key, data=np.array([str(v) for v in vals], dtype=object), dtype=str_dt)
                elif kind == "int":
                    ds = g.create_dataset(key, data=np.array(vals, dtype=np.int64).reshape(n))
                elif kind == "bool":
                    ds = g.create_dataset(key, data=np.array(vals, dtype=bool).reshape(n))
                elif kind == "float":
                    ds = g.create_dataset(key, data=np.array(vals, dtype=np.float64).reshape(n))
                else:
                    ds = g.create_dataset(key, data=np.array(vals, dtype=np.float64).reshape((n, *kind)))
                if units:
                    ds.attrs["units"] = units
                ds.attrs["description"] = desc
    return path


def read_summary(path: str | Path) -> list[dict[str, Any]]:
    """The summary table as a list of dicts (absolute ``*_path`` entries resolved beside the file)."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        if f.attrs.get("schema") != SUMMARY_SCHEMA:
            raise ValueError(f"{path}: not a {SUMMARY_SCHEMA} file (schema={f.attrs.get('schema')!r})")
        g = f["summary"]
        n = int(g.attrs["n_units"])
        cols = {}
        for key in g:
            data = g[key][()]
            if data.dtype.kind in "OS":
                data = [v.decode() if isinstance(v, bytes) else str(v) for v in data]
            cols[key] = data
    rows = []
    for i in range(n):
        row = {}
        for key, data in cols.items():
            v = data[i]
            row[key] = v.item() if isinstance(v, np.generic) else v
        row["input_files"] = json.loads(row.get("input_files") or "[]")
        row["attempts"] = json.loads(row.get("attempts") or "[]")
        for key in ("expt_path", "refl_path", "indexed_refl_path"):
            row[key] = str(path.parent / row[key]) if row.get(key) else ""
        rows.append(row)
    return rows
