"""The observation table (voxel-merger -> scaler): one row per (still, voxel) estimate.

HDF5 schema ``diffractflow.voxel_merger.observations`` (root attributes: provenance, ``grid`` JSON, ``q_units``,
``n_observations``); root 1-D datasets of equal length:

- ``still_id`` (int32: index into ``still_names``), ``voxel_id`` (int64 flat id on the grid), ``q_magnitude``
  (|s| = 1/d, 1/angstrom), ``intensity`` and ``sigma`` (unscaled, as measured);
- version 2 adds ``weight`` (float64: the row's merging weight before scaling, the exposure sum of the still in
  that voxel, or 1/sigma^2 for inputs without exposure) and requires ``still_names`` (strings, the stills' ids
  ``<image file>#<index>``); version 1 has no ``weight`` and ``still_names`` is optional. A file with no
  ``schema``/``schema_version`` attributes at all (a table written by hand) is read as version 1.

Written by :class:`ObservationTableWriter` (streamed, appended in chunks) or :func:`write_observations` (whole
arrays, tests and benchmarks); read by :func:`open_observations` (checked, for streaming readers),
:func:`read_observations` (whole) and :func:`read_still_names`.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from ..artifacts import atomic_write_path
from ..errors import InputError
from ._header import check_header, open_checked, write_header

SCHEMA = "diffractflow.voxel_merger.observations"
VERSION = 2
VERSIONS = (1, 2)
#: string forms earlier writers used: "1.0" (and "1") = v1 (no weight), "1.1" = v2 (weight column)
LEGACY_VERSIONS = {"1": 1, "1.0": 1, "1.1": 2, "2": 2}
WHAT = "observation table"
#: (name, dtype) of the columns of each version
FIELDS_BY_VERSION = {
    1: (("still_id", "i4"), ("voxel_id", "i8"), ("q_magnitude", "f8"), ("intensity", "f8"), ("sigma", "f8")),
    2: (("still_id", "i4"), ("voxel_id", "i8"), ("q_magnitude", "f8"), ("intensity", "f8"), ("sigma", "f8"),
        ("weight", "f8")),
}
FIELDS = FIELDS_BY_VERSION[VERSION]


class ObservationTableWriter:
    """Writes a version-2 table in appended chunks to a temporary file renamed into place by :meth:`close`.

    ``grid``: the grid as a JSON-able dict (stored in the ``grid`` attribute)."""

    def __init__(self, path: str | Path, grid: Mapping[str, Any], *, producer: str, producer_version: str,
                 parameters: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None,
                 job_id: str | None = None, chunk: int = 1 << 18):
        self.path = Path(path)
        self._ctx = atomic_write_path(self.path)
        tmp = self._ctx.__enter__()
        self._f = h5py.File(tmp, "w")
        write_header(self._f, schema=SCHEMA, version=VERSION, producer=producer, producer_version=producer_version,
                     job_id=job_id, parameters=parameters or {}, inputs=inputs or {})
        self._f.attrs["grid"] = json.dumps(dict(grid))
        self._f.attrs["q_units"] = "1/angstrom (|s| = 1/d)"
        self._d = {n: self._f.create_dataset(n, shape=(0,), maxshape=(None,), dtype=t, chunks=(chunk,))
                   for n, t in FIELDS}
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.n = 0

    def still_index(self, still_id: str) -> int:
        """The integer ``still_id`` of a still (its row in ``still_names``), added on first use."""
        i = self._index.get(still_id)
        if i is None:
            i = self._index[still_id] = len(self.names)
            self.names.append(still_id)
        return i

    def append(self, still_index: int, voxel_id, q_magnitude, intensity, sigma, weight=None) -> None:
        """Append rows of one still; ``weight`` None means 1/sigma^2."""
        m = len(voxel_id)
        if m == 0:
            return
        if weight is None:
            weight = 1.0 / np.square(np.asarray(sigma, dtype=np.float64))
        for n, v in (("still_id", np.full(m, still_index, dtype=np.int32)), ("voxel_id", voxel_id),
                     ("q_magnitude", q_magnitude), ("intensity", intensity), ("sigma", sigma), ("weight", weight)):
            d = self._d[n]
            d.resize((self.n + m,))
            d[self.n:] = v
        self.n += m

    def close(self, ok: bool = True) -> None:
        """Finish the file and rename it into place (``ok``), or discard it: nothing half-written appears."""
        if self._f.id.valid:
            self._f.create_dataset("still_names", data=np.array(self.names, dtype=h5py.string_dtype()))
            self._f.attrs["n_observations"] = self.n
            self._f.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            exc = RuntimeError(f"observation table {self.path} abandoned")
            self._ctx.__exit__(RuntimeError, exc, None)


def write_observations(path: str | Path, still_id, voxel_id, q_magnitude, intensity, sigma, *, weight=None,
                       still_names=None, producer: str, producer_version: str) -> Path:
    """A whole table from arrays: version 2 when ``weight`` is given (then ``still_names`` too), else version 1."""
    version = 2 if weight is not None else 1
    if version == 2 and still_names is None:
        raise ValueError("a version-2 observation table needs still_names")
    cols = (still_id, voxel_id, q_magnitude, intensity, sigma) + ((weight,) if version == 2 else ())
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_header(f, schema=SCHEMA, version=version, producer=producer, producer_version=producer_version)
        for (name, _), data in zip(FIELDS_BY_VERSION[version], cols):
            f.create_dataset(name, data=np.asarray(data), chunks=True)
        if still_names is not None:
            f.create_dataset("still_names", data=np.array([str(s) for s in still_names], dtype=h5py.string_dtype()))
        f.attrs["n_observations"] = int(np.asarray(intensity).shape[0])
    return Path(path)


def _check(path: Path, f: h5py.File) -> int:
    if "schema" not in f.attrs and "schema_version" not in f.attrs:
        # a table with no header at all, written by hand as the scaler's input documentation allowed before
        # versions: read as version 1 (its exact layout); a header naming another schema or version is refused
        version = 1
    else:
        version = check_header(path, f.attrs, schema=SCHEMA, versions=VERSIONS, legacy=LEGACY_VERSIONS, what=WHAT)
    fields = [n for n, _ in FIELDS_BY_VERSION[version]] + (["still_names"] if version >= 2 else [])
    missing = [n for n in fields if not isinstance(f.get(n), h5py.Dataset)]
    if missing:
        raise InputError(f"{path}: {WHAT} (version {version}) lacks dataset(s) {missing}")
    for name, _ in FIELDS_BY_VERSION[version]:
        d = f[name]
        if d.dtype.kind not in "fiu":
            raise InputError(f"{path}: dataset {name} must be numeric, got {d.dtype}")
        if d.ndim != 1:
            raise InputError(f"{path}: dataset {name} has shape {d.shape}; every column must be 1-D")
    n = f["intensity"].shape[0]
    for name, _ in FIELDS_BY_VERSION[version]:
        d = f[name]
        if d.shape[0] != n:
            raise InputError(f"{path}: dataset {name} has {d.shape[0]} rows, intensity has {n}; "
                             "the columns must have equal length")
    if n == 0:
        raise InputError(f"{path}: the observation table is empty")
    if "still_names" in f and f["still_names"].ndim != 1:
        raise InputError(f"{path}: still_names must be 1-D, got shape {f['still_names'].shape}")
    return version


def open_observations(path: str | Path) -> contextlib.AbstractContextManager[h5py.File]:
    """The table open read-only after its checks (schema, version, columns numeric, 1-D, equal length, not
    empty)."""
    return open_checked(path, WHAT, _check)


def decode_names(ds) -> np.ndarray:
    """A string dataset as a numpy array of str."""
    return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]], dtype=object).astype(str)


def read_observations(path: str | Path) -> dict[str, np.ndarray]:
    """Every column of the table in memory, plus ``still_names`` when the file has them (small tables)."""
    with open_observations(path) as f:
        version = _check(Path(path), f)
        out = {n: f[n][()] for n, _ in FIELDS_BY_VERSION[version]}
        if "still_names" in f:
            out["still_names"] = decode_names(f["still_names"])
    return out


def read_still_names(path: str | Path) -> list[str]:
    """``still_names`` of a table (index = integer ``still_id``)."""
    with open_observations(path) as f:
        if "still_names" not in f:
            raise InputError(f"{path}: no still_names in this {WHAT}")
        return [str(x) for x in decode_names(f["still_names"])]
