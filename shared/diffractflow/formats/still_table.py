"""The diffuse still table (diffuse-extractor -> voxel-merger, validation, report): one HDF5 file per still.

Schema ``diffractflow.diffuse_still``, versions 1-5 (integers; older files wrote "1".."4"). The full layout is
documented with its writer, ``diffuse_extractor.artifacts.write_still``; the part other services read is:

- ``/entry`` attrs ``image_path``, ``image_index``, ``experiment_index`` (the still's id is
  ``<image file name>#<image_index>``, plus ``.<experiment_index>`` when that is not 0) or ``still_id`` (a table
  written without an image: synthetic data); ``phi_deg`` for a rotation frame;
- ``/entry/pixels`` (NXdata, attr ``n_pixels``): 1-D columns of equal length ``h``, ``k``, ``l`` (fractional
  Miller indices), ``intensity``, ``sigma`` (corrected), optional ``q`` (|q| = 1/d, 1/angstrom) and, from version 4,
  ``exposure`` (1/correction: the weight that turns intensities back into net counts; absent in versions 1-3 and
  in tables whose writer knew no correction, whose pixels are then weighted 1/sigma^2);
  version 5 (extractor tables with a crystal) does not store ``q``, ``x``, ``y`` (named in the pixels' attribute
  ``derived_columns``): :class:`StillTable` derives ``q = |A (h, k, l)|`` (``setting_matrix`` for a rotation
  frame; float64 from the float32 indices: within 3e-7 relative of the extractor's float32 ``q``) and ``x``,
  ``y`` from ``/entry/masks`` (uint8 (ny, nx) flags per panel ``panel_NNN``: the table's rows
  are the pixels with flag 0 of each panel in row-major order, panels in order);
- ``/entry/crystal`` (optional): ``A`` (3x3 U B, 1/angstrom), ``unit_cell`` (angstrom, degrees), attr
  ``space_group``;
- ``/entry/background_profile`` (version 4, extractor tables): (n_shells, 3) |q| shell centre (1/angstrom), the
  still's isotropic background estimate and its standard error.

:class:`StillTable` streams the columns in chunks (bounded memory); :func:`write_still_table` writes a minimal
version-5 table from arrays (tests, demos, benchmarks); :func:`write_still_header` and :func:`check_still` are the
extractor's writer's and reader's header.
"""
from __future__ import annotations

import json
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
VERSION = 5
VERSIONS = (1, 2, 3, 4, 5)
LEGACY_VERSIONS = {str(v): v for v in VERSIONS}
WHAT = "diffuse still table"
PIXELS = "entry/pixels"
CRYSTAL = "entry/crystal"
MASKS = "entry/masks"
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


def _derived(group) -> set[str]:
    """Names of the columns a writer left to be derived (the extractor's ``derived_columns`` attribute: JSON
    object keyed by comma-separated column names)."""
    text = _text(group.attrs.get("derived_columns", "")) if "derived_columns" in group.attrs else ""
    try:
        keys = json.loads(text) if text else {}
    except ValueError:
        return set()
    return {c.strip() for k in keys for c in str(k).split(",")}


class StillTable:
    """A still table opened for streaming: ``still_id``, ``version``, ``producer``, ``n_pixels``, ``crystal``
    (dict with ``A`` (3x3 or None), ``unit_cell`` (6 floats or None), ``space_group``; or None), ``has_exposure``
    and ``has_q`` (stored, or from version 5 on derived from ``A`` and the indices); :meth:`iter_chunks` yields
    the columns as float64 arrays."""

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
        #: v5 derives |q| from the setting matrix (U B, or the rotation frame's S R F U B) and the indices
        self._q_from_A = None
        if not self.has_q and self.version >= 5 and CRYSTAL in f and "q" in _derived(g):
            c = f[CRYSTAL]
            A = c["setting_matrix"][()] if "setting_matrix" in c else (c["A"][()] if "A" in c else None)
            if A is not None:
                self._q_from_A = np.asarray(A, dtype=float).reshape(3, 3)
                self.has_q = True

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
            out = {c: np.asarray(d[a:z], dtype=np.float64) for c, d in self._cols.items()}
            if self._q_from_A is not None:
                out["q"] = self._q_of(out["h"], out["k"], out["l"])
            yield out

    def _q_of(self, h, k, l) -> np.ndarray:
        """|q| = |A (h, k, l)| (1/angstrom) in float64."""
        q = self._q_from_A @ np.stack([np.asarray(h, np.float64), np.asarray(k, np.float64),
                                       np.asarray(l, np.float64)])
        return np.sqrt(np.einsum("ij,ij->j", q, q))

    def read_columns(self, names) -> dict[str, np.ndarray]:
        """Whole columns of ``/entry/pixels`` by name, as stored (e.g. the extractor's ``x``, ``y``; in version 5
        ``x``, ``y`` (uint16) from ``/entry/masks`` and ``q`` (float64) from ``A``); InputError naming the file
        for a column the table has not."""
        g = self._f[PIXELS]
        derivable = set()
        if self.version >= 5 and MASKS in self._f:
            derivable |= {"x", "y"}
        if self._q_from_A is not None:
            derivable.add("q")
        missing = [c for c in names if c not in g and c not in derivable]
        if missing:
            raise InputError(f"{self.path}: {WHAT} stores no column(s) {missing} in /{PIXELS}")
        out = {c: g[c][()] for c in names if c in g}
        if any(c in names and c not in g for c in ("x", "y")):
            x, y = self._pixel_xy()
            out.update({c: v for c, v in (("x", x), ("y", y)) if c in names and c not in g})
        if "q" in names and "q" not in g:
            out["q"] = self._q_of(g["h"][()], g["k"][()], g["l"][()])
        return {c: out[c] for c in names}

    def _pixel_xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Column and row (uint16) of every row of the table, from the flags in ``/entry/masks``."""
        mg = self._f[MASKS]
        xs, ys = [], []
        for name in sorted(mg.keys()):
            m = np.asarray(mg[name][()])
            if m.ndim != 2:
                raise InputError(f"{self.path}: /{MASKS}/{name} has shape {m.shape}, expected (ny, nx)")
            idx = np.flatnonzero(m.ravel() == 0)
            ys.append((idx // m.shape[1]).astype(np.uint16))
            xs.append((idx % m.shape[1]).astype(np.uint16))
        x = np.concatenate(xs) if xs else np.zeros(0, np.uint16)
        if x.shape[0] != self.n_pixels:
            raise InputError(f"{self.path}: /{MASKS} has {x.shape[0]} unflagged pixels, the table {self.n_pixels} rows")
        return x, np.concatenate(ys) if ys else np.zeros(0, np.uint16)

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
    """A minimal version-5 table from arrays: ``columns`` holds :data:`REQUIRED` and optionally ``q`` and
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
