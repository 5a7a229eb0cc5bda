"""Reading the voxel merger's inputs and writing its outputs (HDF5 / NeXus, JSON, PNG).

Input (one still, from the diffuse-extractor): a per-pixel table read by :func:`open_still`.
Its dataset names are configurable through :class:`StillSchema` and common aliases are
tried, so the reader is the one place to adjust when the upstream schema moves.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import diffractflow.errors
import h5py
import numpy as np

try:  # registers Blosc/LZ4 etc. so compressed upstream tables read transparently
    import hdf5plugin  # noqa: F401
except ImportError:  # pragma: no cover
    pass

from diffractflow.artifacts import (atomic_write_json, atomic_write_path, nexus_data_group, read_provenance,
                                    write_provenance)
from diffractflow.reading import reader, reading

from . import __version__
from .core.grid import CrystalModel, GlobalGrid
from .core.sources import ObservationChunk

MAP_SCHEMA = "diffractflow.voxel_merger.map"
MAP_SCHEMA_VERSION = "1.0"
TABLE_SCHEMA = "diffractflow.voxel_merger.observations"
TABLE_SCHEMA_VERSION = "1.1"  # 1.1: weight column
PRODUCER = "voxel-merger"
EXTRACTOR_SCHEMA = "diffractflow.diffuse_still"
log = logging.getLogger("voxel_merger")
_warned_no_weight: set[str] = set()


class InputError(diffractflow.errors.InputError):
    """An input file is missing, unreadable or does not follow the expected schema.

    The platform's input error: the bus rejects the job without retry; the message names the file and the
    problem."""


# ====================================================================== stills
@dataclass
class StillSchema:
    """Where a still's per-pixel table lives. First name that exists wins for each field."""

    groups: Sequence[str] = ("/entry/diffuse", "/entry/pixels", "/entry/data", "/diffuse", "/")
    h: Sequence[str] = ("h", "H", "miller_h")
    k: Sequence[str] = ("k", "K", "miller_k")
    l: Sequence[str] = ("l", "L", "miller_l")
    intensity: Sequence[str] = ("intensity", "I", "corrected_intensity", "intensity_corrected", "data")
    sigma: Sequence[str] = ("sigma", "sigma_intensity", "sigmas", "intensity_errors", "errors")
    variance: Sequence[str] = ("variance", "variance_intensity")
    # weight independent of the counts: the pixel's exposure = 1/correction (w·I = net counts); absent = 1/σ²
    weight: Sequence[str] = ("exposure", "weight")
    q_magnitude: Sequence[str] = ("q_magnitude", "q", "s_magnitude")
    q_vector: Sequence[str] = ("q_vector", "s_vector", "s")  # (n, 3) in the lab frame, used if hkl are absent
    q_components: Sequence[str] = ("qx", "qy", "qz")  # or three 1-D lab-frame components
    q_is_2pi: bool = False  # True when q = 2π/d rather than 1/d (only for hkl from q_vector)
    still_id_attr: Sequence[str] = ("still_id", "image_id", "frame_id")
    crystal_groups: Sequence[str] = ("/entry/crystal", "/crystal")


def _first(group: h5py.Group, names: Sequence[str]):
    for n in names:
        if n in group:
            return group[n]
    return None


def _attr_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.shape == ():
        v = v[()]
        return v.decode() if isinstance(v, bytes) else str(v)
    return str(v)


def read_crystal(f: h5py.File, schema: StillSchema, path: Path) -> CrystalModel | None:
    """Crystal model of a still (A matrix in 1/Å, unit cell Å/deg, space group symbol), or None."""
    for gname in schema.crystal_groups:
        if gname not in f:
            continue
        g = f[gname]

        def get(name):
            if name in g:
                return g[name][()]
            if name in g.attrs:
                return g.attrs[name]
            return None

        A = get("A_matrix")
        if A is None:
            A = get("A")
        uc = get("unit_cell")
        sg = get("space_group")
        sg = _attr_str(sg) if sg is not None else "P 1"
        if uc is not None:
            uc = tuple(float(x) for x in np.asarray(uc, dtype=float).ravel())
            if len(uc) != 6:
                raise InputError(f"{path}: {gname}/unit_cell has {len(uc)} numbers, expected 6")
            A_t = None if A is None else tuple(tuple(float(x) for x in r) for r in np.asarray(A, float).reshape(3, 3))
            return CrystalModel(uc, sg, A_t)
        if A is not None:
            return CrystalModel.from_A(np.asarray(A, float).reshape(3, 3), sg)
    return None


class H5Still:
    """A still's per-pixel table in an HDF5 file, streamed in chunks (bounded memory)."""

    def __init__(self, path: str | Path, schema: StillSchema | None = None):
        with reading(path, InputError, "still table (HDF5)"):
            self._open(path, schema)

    def _open(self, path: str | Path, schema: StillSchema | None) -> None:
        self.path = Path(path)
        self.schema = schema or StillSchema()
        if not self.path.exists():
            raise InputError(f"input still not found: {self.path}")
        try:
            f = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: not a readable HDF5 file ({exc})") from exc
        self._f = f
        s = self.schema
        grp = None
        for g in s.groups:
            if g in f and _first(f[g], s.intensity) is not None:
                grp = f[g]
                break
        if grp is None:
            raise InputError(f"{self.path}: no per-pixel table found (looked for an intensity dataset "
                             f"{list(s.intensity)} in groups {list(s.groups)})")
        self.group = grp
        self.crystal = read_crystal(f, s, self.path)
        self._I = _first(grp, s.intensity)
        self._sig = _first(grp, s.sigma)
        self._var = _first(grp, s.variance) if self._sig is None else None
        if self._sig is None and self._var is None:
            raise InputError(f"{self.path}: {grp.name} has no sigma/variance dataset ({list(s.sigma)} / {list(s.variance)})")
        self._h, self._k, self._l = (_first(grp, s.h), _first(grp, s.k), _first(grp, s.l))
        self._qv = None
        self._qc = None
        if self._h is None or self._k is None or self._l is None:
            self._qv = _first(grp, s.q_vector)
            if self._qv is None and all(c in grp for c in s.q_components):
                self._qc = [grp[c] for c in s.q_components]
            if self._qv is None and self._qc is None:
                raise InputError(f"{self.path}: {grp.name} has neither h/k/l nor a q vector dataset "
                                 f"({list(s.q_vector)} or {list(s.q_components)})")
            if self.crystal is None or self.crystal.A_matrix is None:
                raise InputError(f"{self.path}: hkl must be computed from q_vector but no crystal A_matrix is stored")
            self._Ainv = np.linalg.inv(np.array(self.crystal.A_matrix, dtype=float))
        self._q = _first(grp, s.q_magnitude)
        self._w = _first(grp, s.weight)
        if self._w is None:
            self._warn_no_weight(f, grp)
        self.n_obs = int(self._I.shape[0])
        for name, d in (("sigma", self._sig or self._var), ("h", self._h), ("k", self._k), ("l", self._l),
                        ("q_magnitude", self._q), ("weight", self._w)):
            if d is not None and d.shape[0] != self.n_obs:
                raise InputError(f"{self.path}: {d.name} has {d.shape[0]} rows, {grp.name}/intensity has {self.n_obs}")
        sid = None
        for holder in (f, grp, f.get("/entry")):
            if holder is None:
                continue
            for a in s.still_id_attr:
                if a in holder.attrs:
                    sid = _attr_str(holder.attrs[a])
                    break
            if sid is not None:
                break
        if sid is None:  # the diffuse-extractor names the image instead: file name + index in it
            e = f.get("/entry")
            if e is not None and "image_path" in e.attrs and _attr_str(e.attrs["image_path"]):
                sid = f"{Path(_attr_str(e.attrs['image_path'])).name}#{int(e.attrs.get('image_index', 0))}"
                if int(e.attrs.get("experiment_index", 0)):
                    sid += f".{int(e.attrs['experiment_index'])}"
        self.still_id = sid if sid is not None else self.path.stem

    def _warn_no_weight(self, f: h5py.File, grp: h5py.Group) -> None:
        """Counts-based weights (1/σ²) bias the mean of low-count pixels low: say so once per kind of file."""
        schema = _attr_str(f.attrs.get("schema", ""))
        if schema != EXTRACTOR_SCHEMA and "raw" not in grp and "correction" not in grp:
            return  # a generic table (tests, benchmarks): 1/σ² is the documented default
        key = f"{schema} v{_attr_str(f.attrs.get('schema_version', '?'))}"
        if key in _warned_no_weight:
            return
        _warned_no_weight.add(key)
        log.warning("%s: %s has no %s column: weighting pixels by 1/sigma^2 from their own counts, which biases "
                    "merged means low at a few photons per pixel (diffuse-extractor schema %s; further files "
                    "of this kind are not reported)", self.path, grp.name, "/".join(self.schema.weight), key)

    @property
    def has_weight(self) -> bool:
        return self._w is not None

    def iter_chunks(self, chunk: int = 1 << 22) -> Iterator[ObservationChunk]:
        with reading(self.path, InputError, "still table (HDF5)"):
            yield from self._iter_chunks(chunk)

    def _iter_chunks(self, chunk: int) -> Iterator[ObservationChunk]:
        for a in range(0, self.n_obs, chunk):
            z = min(a + chunk, self.n_obs)
            I = np.asarray(self._I[a:z], dtype=np.float64)
            if self._sig is not None:
                sig = np.asarray(self._sig[a:z], dtype=np.float64)
            else:
                sig = np.sqrt(np.asarray(self._var[a:z], dtype=np.float64))
            if self._qv is None and self._qc is None:
                h = np.asarray(self._h[a:z], dtype=np.float64)
                k = np.asarray(self._k[a:z], dtype=np.float64)
                l = np.asarray(self._l[a:z], dtype=np.float64)
            else:
                if self._qv is not None:
                    sv = np.asarray(self._qv[a:z], dtype=np.float64).reshape(-1, 3)
                else:
                    sv = np.stack([np.asarray(c[a:z], dtype=np.float64) for c in self._qc], axis=1)
                if self.schema.q_is_2pi:
                    sv = sv / (2 * np.pi)
                hkl = sv @ self._Ainv.T  # s = A h  ->  h = A^-1 s
                h, k, l = (np.ascontiguousarray(hkl[:, i]) for i in range(3))
            q = None if self._q is None else np.asarray(self._q[a:z], dtype=np.float64)
            w = None if self._w is None else np.asarray(self._w[a:z], dtype=np.float64)
            yield ObservationChunk(h, k, l, I, sig, q, w)

    def hkl_abs_max(self, chunk: int = 1 << 22) -> np.ndarray:
        out = np.zeros(3)
        for c in self.iter_chunks(chunk):
            if len(c):
                out = np.maximum(out, [np.nanmax(np.abs(c.h)), np.nanmax(np.abs(c.k)), np.nanmax(np.abs(c.l))])
        return out

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_still(path: str | Path, schema: StillSchema | None = None) -> H5Still:
    """Open one still's per-pixel HDF5 table (the single place that knows the upstream schema)."""
    return H5Still(path, schema)


def write_still(path: str | Path, still_id: str, h, k, l, intensity, sigma, q_magnitude=None,
                crystal: CrystalModel | None = None, weight=None) -> Path:
    """Write a still in the expected input schema (used by tests, demos and benchmarks).

    ``weight``: optional per-pixel weight independent of the counts (stored as ``weight``).
    """
    path = Path(path)
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["still_id"] = str(still_id)
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        g = e.create_group("diffuse")
        g.attrs["NX_class"] = "NXdata"
        g.attrs["signal"] = "intensity"
        for name, v in (("h", h), ("k", k), ("l", l), ("intensity", intensity), ("sigma", sigma),
                        ("q_magnitude", q_magnitude), ("weight", weight)):
            if v is not None:
                g.create_dataset(name, data=np.asarray(v, dtype=np.float64))
        if crystal is not None:
            c = e.create_group("crystal")
            c.attrs["NX_class"] = "NXcollection"
            c.create_dataset("unit_cell", data=np.asarray(crystal.unit_cell, dtype=float))
            c.create_dataset("space_group", data=crystal.space_group)
            if crystal.A_matrix is not None:
                c.create_dataset("A_matrix", data=np.asarray(crystal.A_matrix, dtype=float))
    return path


# ====================================================================== scales / grid
@reader("scales JSON", InputError)
def read_scales(path: str | Path) -> dict[str, float]:
    """Per-still multiplicative scales b (I_obs ≈ b·I_ref) from the scaler's scales.json.

    Accepts {still: b}, {"scales": {still: b}} or {still: {"multiplicative_scale": b, ...}}.
    Keys are still ids (names) or table indices, as strings.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read scales JSON ({exc})") from exc
    if isinstance(data, dict) and isinstance(data.get("scales"), dict):
        data = data["scales"]
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object mapping still id -> scale")
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            v = v.get("multiplicative_scale", v.get("scale", v.get("b")))
        try:
            b = float(v)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: scale for still {k!r} is not a number: {v!r}") from exc
        if not np.isfinite(b) or b <= 0:
            raise InputError(f"{path}: scale for still {k!r} must be positive and finite, got {b}")
        out[str(k)] = b
    return out


def resolve_scales(scales: Mapping[str, float] | None, still_names: Sequence[str] | None) -> dict[str, float] | None:
    """Key scales by still name: keys that are names stay, integer keys index ``still_names``.

    The scaler writes scales.json keyed by the observation table's integer ``still_id``;
    ``still_names`` (the table's dataset of that name) turns them back into still ids.
    """
    if scales is None:
        return None
    names = list(still_names or [])
    out = {}
    for key, b in scales.items():
        if key in names or not names:
            out[key] = b
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(names):
            out[names[int(key)]] = b
        else:
            out[key] = b
    return out


def scale_for(scales: Mapping[str, float] | None, still_id: str) -> float | None:
    """A still's scale (None when no scales were given); a missing still is an error."""
    if scales is None:
        return None
    if still_id in scales:
        return scales[still_id]
    hint = " (scales keyed by table index: give the observation table so indices map to still ids)" \
        if any(k.isdigit() for k in scales) else ""
    raise InputError(f"scales file has no entry for still {still_id!r}{hint}")


@reader("observation table (HDF5)", InputError)
def read_still_names(table_path: str | Path) -> list[str]:
    """``still_names`` of an observation table (index = integer still_id)."""
    try:
        with h5py.File(table_path, "r") as f:
            return [x.decode() if isinstance(x, bytes) else str(x) for x in f["still_names"][()]]
    except (OSError, KeyError) as exc:
        raise InputError(f"{table_path}: no still_names in this observation table ({exc})") from exc


def write_grid(path: str | Path, grid: GlobalGrid, extra: Mapping[str, Any] | None = None) -> Path:
    return atomic_write_json(path, {"schema": "diffractflow.voxel_merger.grid", "schema_version": "1.0",
                                    "grid": grid.to_dict(), **(extra or {})})


@reader("voxel-merger grid JSON", InputError)
def read_grid(path: str | Path) -> GlobalGrid:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        return GlobalGrid.from_dict(d["grid"] if "grid" in d else d)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: not a voxel-merger grid JSON ({exc})") from exc


# ====================================================================== observation table
class ObservationTableWriter:
    """Flat per-observation table for the scaler, written in appended chunks.

    Root datasets (1-D, equal length): ``still_id`` (int32 index into ``still_names``),
    ``voxel_id`` (int64 flat id on the grid, ASU voxel when symmetry merging), ``q_magnitude``
    (|s| = 1/d, Å⁻¹), ``intensity`` and ``sigma`` (unscaled, as measured) and ``weight`` (the
    row's merging weight before scaling: exposure Σw of the still in that voxel, or 1/σ² for
    tables without exposure; lets a scaler use model variances).
    """

    FIELDS = (("still_id", "i4"), ("voxel_id", "i8"), ("q_magnitude", "f8"), ("intensity", "f8"), ("sigma", "f8"),
              ("weight", "f8"))

    def __init__(self, path: Path, grid: GlobalGrid, parameters: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None, job_id: str | None = None, chunk: int = 1 << 18):
        self.path = Path(path)
        self._ctx = atomic_write_path(self.path)
        tmp = self._ctx.__enter__()
        self._f = h5py.File(tmp, "w")
        write_provenance(self._f, schema=TABLE_SCHEMA, schema_version=TABLE_SCHEMA_VERSION, producer=PRODUCER,
                         producer_version=__version__, job_id=job_id, parameters=parameters or {}, inputs=inputs or {})
        self._f.attrs["grid"] = json.dumps(grid.to_dict())
        self._f.attrs["q_units"] = "1/angstrom (|s| = 1/d)"
        self._d = {n: self._f.create_dataset(n, shape=(0,), maxshape=(None,), dtype=t, chunks=(chunk,))
                   for n, t in self.FIELDS}
        self.names: list[str] = []
        self.n = 0

    def still_index(self, still_id: str) -> int:
        if still_id not in self.names:
            self.names.append(still_id)
        return self.names.index(still_id)

    def append(self, still_index: int, voxel_id, q_magnitude, intensity, sigma, weight=None):
        """Append rows of one still; ``weight`` None means 1/σ²."""
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

    def close(self, ok: bool = True):
        if self._f.id.valid:
            self._f.create_dataset("still_names", data=np.array(self.names, dtype=h5py.string_dtype()))
            self._f.attrs["n_observations"] = self.n
            self._f.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:  # discard the temporary file: nothing half-written is ever renamed into place
            exc = RuntimeError(f"observation table {self.path} abandoned")
            self._ctx.__exit__(RuntimeError, exc, None)


@reader("observation table (HDF5)", InputError)
def read_observation_table(path: str | Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {n: f[n][()] for n, _ in ObservationTableWriter.FIELDS if n in f}
        out["still_names"] = np.array([x.decode() if isinstance(x, bytes) else x for x in f["still_names"][()]])
    return out


# ====================================================================== merged map
def write_map(path: str | Path, grid: GlobalGrid, intensity: np.ndarray | None, sigma: np.ndarray | None,
              counts: np.ndarray | None, statistics: Mapping[str, Any] | None = None, parameters: Mapping[str, Any] | None = None,
              inputs: Mapping[str, str] | None = None, job_id: str | None = None, slabs=None) -> Path:
    """Merged 3-D map as NeXus NXdata (axes h, k, l; signal intensity; errors sigma; counts).

    Give dense arrays, or ``slabs``: an iterable of (h index, mean (nk, nl), sigma, count)
    written one h-plane at a time (bounded memory).
    """
    path = Path(path)
    shp = grid.shape
    chunks = (1, min(shp[1], 256), min(shp[2], 256))
    with atomic_write_path(path) as tmp, h5py.File(tmp, "w") as f:
        write_provenance(f, schema=MAP_SCHEMA, schema_version=MAP_SCHEMA_VERSION, producer=PRODUCER,
                         producer_version=__version__, job_id=job_id, parameters=parameters or {}, inputs=inputs or {})
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
        d = dc
        d.attrs["long_name"] = "observations merged (with symmetry: into the voxel's asymmetric-unit equivalent)"
        g["sigma"].attrs["long_name"] = "sqrt(sum w^2 sigma_obs^2) / sum w (propagated error of the weighted mean)"
        c = e.create_group("crystal")
        c.attrs["NX_class"] = "NXcollection"
        c.create_dataset("unit_cell", data=np.asarray(grid.unit_cell))
        c.create_dataset("space_group", data=grid.space_group)
        c.attrs["subdivisions"] = grid.ndiv
        c.attrs["grid"] = json.dumps(grid.to_dict())
        if statistics:
            s = e.create_group("statistics")
            s.attrs["NX_class"] = "NXcollection"
            s.attrs["json"] = json.dumps(statistics, default=_json_default)
    return path


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


@dataclass
class MergedMapFile:
    grid: GlobalGrid
    intensity: np.ndarray
    sigma: np.ndarray
    counts: np.ndarray
    statistics: dict
    provenance: dict


@reader("voxel-merger map (HDF5)", InputError)
def read_map(path: str | Path) -> MergedMapFile:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema") != MAP_SCHEMA:
                raise InputError(f"{path}: not a voxel-merger map (schema={f.attrs.get('schema')!r})")
            g = f["entry/map"]
            grid = GlobalGrid.from_dict(json.loads(f["entry/crystal"].attrs["grid"]))
            stats = json.loads(f["entry/statistics"].attrs["json"]) if "entry/statistics" in f else {}
            return MergedMapFile(grid, g["intensity"][()], g["sigma"][()], g["counts"][()], stats, read_provenance(f))
    except OSError as exc:
        raise InputError(f"{path}: cannot read map ({exc})") from exc


# ====================================================================== figures
def map_planes(grid: GlobalGrid, intensity) -> dict[int, np.ndarray]:
    """The h=0, k=0 and l=0 planes of a dense array or of an open HDF5 dataset (axis -> 2-D array)."""
    planes = {}
    for ax in range(3):
        i0 = -grid.lo[ax]
        if 0 <= i0 < grid.shape[ax]:
            sel = [slice(None)] * 3
            sel[ax] = i0
            planes[ax] = np.asarray(intensity[tuple(sel)])
    return planes


def write_slice_pngs(out_dir: Path, grid: GlobalGrid, intensity) -> dict[str, Path]:
    """PNG images of the h=0, k=0 and l=0 planes (colour range: 1st-99th percentile).

    ``intensity``: the dense map, an h5py dataset, or a dict axis -> plane (see :func:`map_planes`).
    """
    import matplotlib  # heavy, and only for the optional PNGs: imported when a plot is made
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = {}
    names = "hkl"
    planes = intensity if isinstance(intensity, dict) else map_planes(grid, intensity)
    for ax, sl in planes.items():
        others = [a for a in range(3) if a != ax]
        finite = sl[np.isfinite(sl)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0, 1))
        fig, axs = plt.subplots(figsize=(6, 5.4), dpi=100)
        x, y = grid.axis(others[1]), grid.axis(others[0])
        im = axs.imshow(sl, origin="lower", extent=(x[0], x[-1], y[0], y[-1]), vmin=vmin, vmax=vmax,
                        cmap="viridis", interpolation="nearest", aspect="auto")
        axs.set_xlabel(names[others[1]])
        axs.set_ylabel(names[others[0]])
        axs.set_title(f"{names[ax]} = 0 plane")
        fig.colorbar(im, ax=axs, label="intensity")
        p = out_dir / f"slice_{names[ax]}0.png"
        with atomic_write_path(p) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        out[f"slice_{names[ax]}0"] = p
    return out


def write_radial_png(path: Path, profile: Mapping[str, Any]) -> Path:
    import matplotlib  # heavy, and only for the optional PNGs: imported when a plot is made
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = np.asarray(profile["s_centres"], dtype=float)
    m = np.array([np.nan if v is None else v for v in profile["mean_intensity"]], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(s, m, ".-")
    ax.set_xlabel("|s| = 1/d (1/Å)")
    ax.set_ylabel("mean voxel intensity")
    ax.set_title("radial profile")
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
