"""The diffuse still table (diffuse-extractor -> voxel-merger, validation, report): one HDF5 file per still.

Schema ``diffractflow.diffuse_still``, versions 1-4 (integers; older files wrote "1".."4"). The full layout is
documented with its writer, ``diffuse_extractor.artifacts.write_still``; the part other services read is:

- ``/entry`` attrs ``image_path``, ``image_index``, ``experiment_index`` (the still's id is
  ``<image file name>#<image_index>``, plus ``.<experiment_index>`` when that is not 0) or ``still_id`` (a table
  written without an image: synthetic data); ``phi_deg`` for a rotation frame;
- ``/entry/pixels`` (NXdata, attr ``n_pixels``): 1-D columns of equal length ``h``, ``k``, ``l`` (fractional
  Miller indices), ``intensity``, ``sigma`` (corrected), optional ``q`` (|q| = 1/d, 1/angstrom) and, from version 4,
  ``exposure`` (1/correction: the weight that turns intensities back into net counts; absent in versions 1-3 and
  in tables whose writer knew no correction, whose pixels are then weighted 1/sigma^2);
- ``/entry/crystal`` (optional): ``A`` (3x3 U B, 1/angstrom), ``unit_cell`` (angstrom, degrees), attr
  ``space_group``;
- ``/entry/background_profile`` (version 4, extractor tables): (n_shells, 3) |q| shell centre (1/angstrom), the
  still's isotropic background estimate and its standard error.

:class:`StillTable` streams the columns in chunks (bounded memory); :func:`write_still_table` writes a minimal
version-4 table from arrays (tests, demos, benchmarks); :func:`write_still_header` and :func:`check_still` are the
extractor's writer's and reader's header.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

try:  # the extractor's columns are Blosc/LZ4 compressed
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover - a dependency
    pass

from ..artifacts import atomic_write_path
from ..errors import InputError
from ._header import _text, check_header, open_h5, write_header

SCHEMA = "diffractflow.diffuse_still"
VERSION = 4
VERSIONS = (1, 2, 3, 4)
LEGACY_VERSIONS = {str(v): v for v in VERSIONS}
WHAT = "diffuse still table"
PIXELS = "entry/pixels"
CRYSTAL = "entry/crystal"
#: columns every version stores (and ``q`` and ``exposure`` where present)
REQUIRED = ("h", "k", "l", "intensity", "sigma")


def write_still_header(h5file, *, producer: str, producer_version: str, version: int = VERSION, job_id=None,
                       parameters: Mapping[str, Any] | None = None, inputs: Mapping[str, str] | None = None) -> None:
    """Provenance of a still table with its integer schema version."""
    if version not in VERSIONS:
        raise ValueError(f"{SCHEMA} has versions {list(VERSIONS)}, not {version}")
    write_header(h5file, schema=SCHEMA, version=version, producer=producer, producer_version=producer_version,
                 job_id=job_id, parameters=parameters, inputs=inputs)


def check_still(path: str | Path, f: h5py.File) -> int:
    """The table's version; InputError naming ``path`` for another schema, an unknown version or a missing
    ``/entry/pixels`` column of :data:`REQUIRED`."""
    version = check_header(path, f.attrs, schema=SCHEMA, versions=VERSIONS, legacy=LEGACY_VERSIONS, what=WHAT)
    if PIXELS not in f:
        raise InputError(f"{path}: {WHAT} lacks /{PIXELS}")
    missing = [c for c in REQUIRED if c not in f[PIXELS]]
    if missing:
        raise InputError(f"{path}: {WHAT} lacks column(s) {missing} in /{PIXELS}")
    return version


def still_id_of(path: str | Path, entry) -> str:
    """A still's id from its ``/entry`` attributes (see the module docstring); the file stem if none."""
    a = entry.attrs
    if "still_id" in a and _text(a["still_id"]):
        return _text(a["still_id"])
    image = _text(a.get("image_path", ""))
    if image:
        sid = f"{Path(image).name}#{int(a.get('image_index', 0))}"
        if int(a.get("experiment_index", 0)):
            sid += f".{int(a['experiment_index'])}"
        return sid
    return Path(path).stem


class StillTable:
    """A still table opened for streaming: ``still_id``, ``version``, ``producer``, ``n_pixels``, ``crystal``
    (dict with ``A`` (3x3 or None), ``unit_cell`` (6 floats or None), ``space_group``; or None), ``has_exposure``
    and ``has_q``; :meth:`iter_chunks` yields the columns as float64 arrays."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open_h5(self.path, WHAT)
        try:
            self._open()
        except BaseException:
            self._f.close()
            raise

    def _open(self) -> None:
        f = self._f
        self.version = check_still(self.path, f)
        self.producer = _text(f.attrs.get("producer", ""))
        g = f[PIXELS]
        self.group = g
        self._cols = {c: g[c] for c in (*REQUIRED, "q", "exposure") if c in g}
        self.has_q, self.has_exposure = "q" in g, "exposure" in g
        self.n_pixels = int(g["intensity"].shape[0])
        for c, d in self._cols.items():
            if d.ndim != 1 or d.shape[0] != self.n_pixels:
                raise InputError(f"{self.path}: /{PIXELS}/{c} has shape {d.shape}, intensity has {self.n_pixels} rows")
        self.still_id = still_id_of(self.path, f["entry"])
        self.crystal = self._crystal()

    def _crystal(self) -> dict | None:
        if CRYSTAL not in self._f:
            return None
        c = self._f[CRYSTAL]
        uc = np.asarray(c["unit_cell"][()], dtype=float).ravel() if "unit_cell" in c else None
        if uc is not None and uc.size != 6:
            raise InputError(f"{self.path}: /{CRYSTAL}/unit_cell has {uc.size} numbers, expected 6")
        A = np.asarray(c["A"][()], dtype=float).reshape(3, 3) if "A" in c else None
        if uc is None and A is None:
            raise InputError(f"{self.path}: /{CRYSTAL} has neither unit_cell nor A")
        return {"unit_cell": None if uc is None else tuple(float(x) for x in uc), "A": A,
                "space_group": _text(c.attrs.get("space_group", "P 1")) or "P 1"}

    def iter_chunks(self, chunk: int = 1 << 22) -> Iterator[dict[str, np.ndarray]]:
        """{column: float64 array} for consecutive row ranges of at most ``chunk`` rows."""
        for a in range(0, self.n_pixels, chunk):
            z = min(a + chunk, self.n_pixels)
            yield {c: np.asarray(d[a:z], dtype=np.float64) for c, d in self._cols.items()}

    def read_columns(self, names) -> dict[str, np.ndarray]:
        """Whole stored columns of ``/entry/pixels`` by name, as stored (e.g. the extractor's ``x``, ``y``);
        InputError naming the file for a column the table does not store."""
        g = self._f[PIXELS]
        missing = [c for c in names if c not in g]
        if missing:
            raise InputError(f"{self.path}: {WHAT} stores no column(s) {missing} in /{PIXELS}")
        return {c: g[c][()] for c in names}

    def background_profile(self) -> np.ndarray | None:
        """The (n_shells, 3) isotropic background profile of an extractor table (version 4), else None."""
        e = self._f["entry"]
        return np.asarray(e["background_profile"][()], dtype=float) if "background_profile" in e else None

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_still_table(path: str | Path, still_id: str, columns: Mapping[str, Any], *, crystal: Mapping | None = None,
                      producer: str, producer_version: str = "0") -> Path:
    """A minimal version-4 table from arrays: ``columns`` holds :data:`REQUIRED` and optionally ``q`` and
    ``exposure`` (float64 as given); ``crystal``: ``unit_cell`` and/or ``A``, ``space_group``."""
    missing = [c for c in REQUIRED if columns.get(c) is None]
    if missing:
        raise ValueError(f"a still table needs columns {missing}")
    unknown = [c for c in columns if c not in (*REQUIRED, "q", "exposure")]
    if unknown:
        raise ValueError(f"unknown still-table column(s) {unknown}")
    path = Path(path)
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_still_header(f, producer=producer, producer_version=producer_version)
        f.attrs["default"] = "entry"
        e = f.create_group("entry")
        e.attrs.update(NX_class="NXentry", default="pixels", still_id=str(still_id), image_path="", image_index=0,
                       experiment_index=0)
        g = e.create_group("pixels")
        n = int(np.asarray(columns["intensity"]).shape[0])
        g.attrs.update(NX_class="NXdata", signal="intensity", n_pixels=n)
        for name, v in columns.items():
            if v is not None:
                g.create_dataset(name, data=np.asarray(v, dtype=np.float64))
        if crystal is not None:
            c = e.create_group("crystal")
            c.attrs["NX_class"] = "NXcollection"
            if crystal.get("unit_cell") is not None:
                c.create_dataset("unit_cell", data=np.asarray(crystal["unit_cell"], dtype=float))
            if crystal.get("A") is not None:
                c.create_dataset("A", data=np.asarray(crystal["A"], dtype=float).reshape(3, 3))
            c.attrs["space_group"] = str(crystal.get("space_group") or "P 1")
    return path
