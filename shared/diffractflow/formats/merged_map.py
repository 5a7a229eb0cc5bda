"""The merged map (voxel-merger -> scaler absolute scale, validation, report): a NeXus 3-D map on the grid.

HDF5 schema ``diffractflow.voxel_merger.map``, version 1 (written "1.0" before integers):

- ``/entry/map`` (NXdata, signal ``intensity``, axes h, k, l): ``intensity`` (float64, weighted mean, NaN = no
  data), ``sigma`` (float64, its propagated error; ``intensity_errors`` is a hard link to it), ``counts`` (int32,
  observations merged), ``h``, ``k``, ``l`` (voxel-centre fractional Miller indices of each axis);
- ``/entry/crystal``: ``unit_cell`` (angstrom, degrees), ``space_group`` (string), attrs ``subdivisions`` and
  ``grid`` (the grid as JSON);
- ``/entry/statistics`` (optional): attr ``json`` (merging statistics).

:func:`write_map` writes it (dense arrays, or h-planes streamed); :func:`read_map` reads it whole (or the
fields asked for); :func:`open_map` gives the checked, open file for plane-by-plane readers.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from ..artifacts import atomic_write_path, nexus_data_group, read_provenance
from ..errors import InputError
from ._header import check_header, open_checked, write_header

SCHEMA = "diffractflow.voxel_merger.map"
VERSION = 1
VERSIONS = (1,)
LEGACY_VERSIONS = {"1": 1, "1.0": 1}
WHAT = "voxel-merger map"
MAP_FIELDS = ("intensity", "sigma", "counts", "h", "k", "l")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


#: voxels per chunk at most (1 MiB of float64: HDF5's default chunk cache holds one)
CHUNK_VOXELS = 1 << 17


def plane_chunks(shape: Sequence[int]) -> tuple[int, int, int]:
    """Chunks of one h-plane each when a plane fits :data:`CHUNK_VOXELS` (else the plane's k rows in as few
    chunks as fit): the map is written and read an h-plane at a time, and one compressed chunk per plane writes
    about a fifth faster than 256 x 256 tiles that split a plane into a full and a thin chunk."""
    nk, nl = int(shape[1]), int(shape[2])
    return 1, max(1, min(nk, CHUNK_VOXELS // max(nl, 1))), max(1, min(nl, CHUNK_VOXELS))


def write_map(path: str | Path, grid, intensity=None, sigma=None, counts=None, *,
              statistics: Mapping[str, Any] | None = None, producer: str, producer_version: str,
              parameters: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None,
              job_id: str | None = None, slabs: Iterable | None = None) -> Path:
    """Write a map atomically. ``grid``: has ``shape``, ``axis(i)``, ``unit_cell``, ``space_group``, ``ndiv`` and
    ``to_dict()`` (the voxel-merger's ``GlobalGrid``). Dense arrays, or ``slabs``: (h index, intensity (nk, nl),
    sigma, counts) written one h-plane at a time (bounded memory)."""
    path = Path(path)
    shp = tuple(grid.shape)
    chunks = plane_chunks(shp)
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_header(f, schema=SCHEMA, version=VERSION, producer=producer, producer_version=producer_version,
                     job_id=job_id, parameters=parameters or {}, inputs=inputs or {})
        g = nexus_data_group(f, "map", signal="intensity", axes=["h", "k", "l"])
        e = f["entry"]
        for i, ax in enumerate("hkl"):
            g.attrs[f"{ax}_indices"] = i
            d = g.create_dataset(ax, data=grid.axis(i))
            d.attrs["long_name"] = f"{ax} (fractional Miller index, voxel centre)"
        kw = dict(chunks=chunks, compression="gzip", compression_opts=1, shuffle=True)
        if slabs is None:
            d = g.create_dataset("intensity", data=np.asarray(intensity, dtype=np.float64).reshape(shp), **kw)
            g.create_dataset("sigma", data=np.asarray(sigma, dtype=np.float64).reshape(shp), **kw)
            dc = g.create_dataset("counts", data=np.asarray(counts).astype(np.int32).reshape(shp), **kw)
        else:
            d = g.create_dataset("intensity", shape=shp, dtype="f8", fillvalue=np.nan, **kw)
            ds = g.create_dataset("sigma", shape=shp, dtype="f8", fillvalue=np.nan, **kw)
            dc = g.create_dataset("counts", shape=shp, dtype="i4", fillvalue=0, **kw)
            for i, m_i, s_i, c_i in slabs:
                if (c_i > 0).any():
                    d[i], ds[i], dc[i] = m_i, s_i, c_i.astype(np.int32)
        d.attrs["long_name"] = "weighted mean intensity sum(w I)/sum(w), w = exposure or 1/sigma^2 (NaN = no data)"
        g["intensity_errors"] = g["sigma"]
        dc.attrs["long_name"] = "observations merged (with symmetry: into the voxel's asymmetric-unit equivalent)"
        g["sigma"].attrs["long_name"] = "sqrt(sum w^2 sigma_obs^2) / sum w (propagated error of the weighted mean)"
        c = e.create_group("crystal")
        c.attrs["NX_class"] = "NXcollection"
        c.create_dataset("unit_cell", data=np.asarray(grid.unit_cell, dtype=float))
        c.create_dataset("space_group", data=str(grid.space_group))
        c.attrs["subdivisions"] = grid.ndiv
        c.attrs["grid"] = json.dumps(grid.to_dict())
        if statistics:
            s = e.create_group("statistics")
            s.attrs["NX_class"] = "NXcollection"
            s.attrs["json"] = json.dumps(statistics, default=_json_default)
    return path


def _check(path: Path, f: h5py.File) -> int:
    version = check_header(path, f.attrs, schema=SCHEMA, versions=VERSIONS, legacy=LEGACY_VERSIONS, what=WHAT)
    missing = [f"entry/map/{n}" for n in MAP_FIELDS if f"entry/map/{n}" not in f] + \
        [f"entry/crystal/{n}" for n in ("unit_cell",) if f"entry/crystal/{n}" not in f]
    if "entry/crystal" in f and "grid" not in f["entry/crystal"].attrs:
        missing.append("entry/crystal@grid")
    if missing:
        raise InputError(f"{path}: {WHAT} lacks {missing}")
    return version


def open_map(path: str | Path) -> contextlib.AbstractContextManager[h5py.File]:
    """The map file open read-only after its checks (schema, version, fields); read planes from
    ``f["entry/map/intensity"]`` without loading the whole map."""
    return open_checked(path, WHAT, _check)


def read_map(path: str | Path, fields: Sequence[str] = MAP_FIELDS) -> dict[str, Any]:
    """``{field: array for field in fields}`` of ``/entry/map`` plus ``unit_cell``, ``space_group``, ``grid``
    (dict), ``statistics`` (dict, empty if none) and ``provenance``."""
    unknown = [n for n in fields if n not in MAP_FIELDS]
    if unknown:
        raise ValueError(f"unknown map field(s) {unknown}; a map has {list(MAP_FIELDS)}")
    with open_map(path) as f:
        g, c = f["entry/map"], f["entry/crystal"]
        out: dict[str, Any] = {n: g[n][()] for n in fields}
        sg = c["space_group"][()] if "space_group" in c else b""
        out.update(unit_cell=np.asarray(c["unit_cell"][()], dtype=float),
                   space_group=sg.decode() if isinstance(sg, bytes) else str(sg),
                   grid=json.loads(c.attrs["grid"]),
                   statistics=json.loads(f["entry/statistics"].attrs["json"]) if "entry/statistics" in f else {},
                   provenance=read_provenance(f))
    return out


def is_map(path: str | Path) -> bool:
    """True for an HDF5 file whose root schema is the merged map's (any version)."""
    try:
        with h5py.File(path, "r") as f:
            s = f.attrs.get("schema")
    except OSError:
        return False
    return (s.decode() if isinstance(s, bytes) else s) == SCHEMA
