"""Inputs (DIALS experiments, images, reflections) and the per-still HDF5 artifact.

HDF5 schema ``diffractflow.diffuse_still`` v1 (one file per still), readable with h5py after
``import hdf5plugin`` (datasets are Blosc/LZ4 + byte-shuffle compressed, chunked):

- ``/`` attributes: provenance (schema, producer, job id, parameters, input sha256s).
- ``/entry`` (NXentry), attrs ``image_path``, ``image_index``, ``experiment_index``.
- ``/entry/pixels`` (NXdata, signal ``intensity``): one 1-D dataset per column of
  :data:`diffuse_extractor.core.extract.COLUMNS`, all of length ``n_pixels`` (attr), each with a
  ``units`` attribute.
- ``/entry/masks`` (NXcollection): ``panel_NNN`` uint8 (ny, nx) bit flags per panel
  (0 = used; bits in the ``bits`` attribute, JSON name -> value).
- ``/entry/crystal``: ``A`` (3x3, 1/angstrom, DIALS setting matrix U B, q = A hkl),
  ``U``, ``B``, ``unit_cell`` (angstrom, degrees), attr ``space_group``.
- ``/entry/beam``: ``s0`` (1/angstrom), ``wavelength`` (angstrom), ``polarization_normal``,
  attr ``polarization_fraction``.
- ``/entry/experiment_json``: the DIALS experiment (JSON string) for full-model consumers.
- ``/entry/info``: attribute ``json`` with summary numbers (mask counts, mu_air, ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from .core.extract import COLUMNS, StillExtraction
from .core.masks import MaskBit

SCHEMA = "diffractflow.diffuse_still"
SCHEMA_VERSION = 1
CHUNK = 1 << 18


class InputError(ValueError):
    """An input file is missing, unreadable or inconsistent (message names the file)."""


def _compression() -> dict:
    try:
        import hdf5plugin

        return dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    except ImportError:  # pragma: no cover - hdf5plugin is a dependency
        return dict(compression="lzf", shuffle=True)


# --------------------------------------------------------------------------- inputs
def load_experiments(path: str | Path):
    """Read a DIALS ``.expt`` with its images reachable (check_format)."""
    from dxtbx.model.experiment_list import ExperimentList

    path = Path(path)
    if not path.is_file():
        raise InputError(f"experiment file {path} does not exist")
    try:
        el = ExperimentList.from_file(str(path), check_format=True)
    except Exception as exc:
        raise InputError(f"cannot read DIALS experiments from {path}: {exc}") from exc
    if len(el) == 0:
        raise InputError(f"{path} holds no experiments")
    return el


def select_experiment(experiments, index: int, path: str | Path = "<experiments>"):
    """The experiment of still ``index`` and the index of its image within its imageset.

    DIALS stills outputs hold either one single-image imageset per experiment, or one imageset
    shared by N experiments (experiment j <-> image j); a lone unindexed experiment over a
    multi-image imageset is addressed by image index directly.
    """
    n = len(experiments)
    if n == 1 and experiments[0].imageset is not None and len(experiments[0].imageset) > 1:
        expt, j = experiments[0], index
        if not 0 <= j < len(expt.imageset):
            raise InputError(f"{path}: image index {index} out of range (imageset has {len(expt.imageset)} images)")
        return expt, j
    if not 0 <= index < n:
        raise InputError(f"{path}: experiment/image index {index} out of range ({n} experiments)")
    expt = experiments[index]
    if expt.imageset is None:
        raise InputError(f"{path}: experiment {index} has no imageset")
    if len(expt.imageset) == 1:
        return expt, 0
    sharing = [i for i in range(n) if experiments[i].imageset == expt.imageset]
    j = sharing.index(index)
    if j >= len(expt.imageset):
        raise InputError(f"{path}: cannot tell which image of the imageset belongs to experiment {index}")
    return expt, j


def read_image(experiment, image_index: int = 0):
    """Raw panel images (float64 arrays) and the format/dxtbx good-pixel mask (overloads kept good)."""
    iset = experiment.imageset
    try:
        raw = iset.get_raw_data(image_index)
        mask = iset.get_mask(image_index)
    except Exception as exc:
        raise InputError(f"cannot read image {image_index} of {_image_path(experiment, image_index)}: {exc}") from exc
    if not isinstance(raw, tuple):
        raw = (raw,)
    data = [r.as_numpy_array().astype(np.float64) for r in raw]
    fmask = []
    for i, (d, m) in enumerate(zip(data, mask)):
        hi = experiment.detector[i].get_trusted_range()[1]
        fmask.append(m.as_numpy_array() | (d >= hi))
    return data, fmask


def _image_path(experiment, image_index: int = 0) -> str:
    try:
        return str(experiment.imageset.get_path(image_index))
    except Exception:
        return "<image>"


def load_reflections(path: str | Path, experiment_index: int | None = None, identifier: str | None = None):
    """Observed reflections of one experiment from a DIALS ``.refl`` (strong or integrated)."""
    from dials.array_family import flex

    path = Path(path)
    if not path.is_file():
        raise InputError(f"reflection file {path} does not exist")
    try:
        refl = flex.reflection_table.from_file(str(path))
    except Exception as exc:
        raise InputError(f"cannot read DIALS reflections from {path}: {exc}") from exc
    if "panel" not in refl:
        raise InputError(f"{path} has no 'panel' column")
    if "id" in refl and experiment_index is not None:
        ids = np.asarray(refl["id"])
        mine = experiment_index
        if identifier:
            idmap = dict(refl.experiment_identifiers())
            for k, v in idmap.items():
                if v == identifier:
                    mine = k
        indexed_ids = set(ids[ids >= 0].tolist())
        sel = ids == mine
        # unindexed spots (id -1) are real peaks too: keep those of this still's image
        if "imageset_id" in refl and len(indexed_ids) > 1:
            iset = np.asarray(refl["imageset_id"])
            own = iset[sel]
            if own.size:
                sel |= (ids == -1) & (iset == own[0])
        elif len(indexed_ids) <= 1:
            sel |= ids == -1
        refl = refl.select(flex.bool(sel.tolist()))
    return refl


def read_background(path: str | Path, detector) -> list[np.ndarray]:
    """A background image readable by dxtbx (or ``.npy`` for a single panel), per panel."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"background image {path} does not exist")
    if path.suffix == ".npy":
        arrays = [np.load(path).astype(np.float64)]
    else:
        import dxtbx

        try:
            raw = dxtbx.load(str(path)).get_raw_data()
        except Exception as exc:
            raise InputError(f"cannot read background image {path}: {exc}") from exc
        raw = raw if isinstance(raw, tuple) else (raw,)
        arrays = [r.as_numpy_array().astype(np.float64) for r in raw]
    if len(arrays) != len(detector) or any(a.shape != tuple(p.get_image_size()[::-1]) for a, p in zip(arrays, detector)):
        raise InputError(f"background image {path} does not match the detector ({len(detector)} panels, "
                         f"shapes {[tuple(p.get_image_size()[::-1]) for p in detector]})")
    return arrays


# --------------------------------------------------------------------------- output
def write_still(path: str | Path, result: StillExtraction, experiment, *, parameters: Mapping[str, Any],
                inputs: Mapping[str, str], image_path: str = "", image_index: int = 0,
                experiment_index: int = 0, job_id: str | None = None, producer_version: str = "0.1.0") -> Path:
    """Write one still's artifact atomically (see the module docstring for the schema)."""
    from diffractflow.artifacts import atomic_write_path, write_provenance

    path = Path(path)
    comp = _compression()
    n = len(result)
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_provenance(f, schema=SCHEMA, schema_version=SCHEMA_VERSION, producer="diffuse-extractor",
                             producer_version=producer_version, job_id=job_id, parameters=parameters, inputs=inputs)
            f.attrs["default"] = "entry"
            e = f.create_group("entry")
            e.attrs.update(NX_class="NXentry", default="pixels", image_path=image_path,
                           image_index=int(image_index), experiment_index=int(experiment_index))
            px = e.create_group("pixels")
            px.attrs.update(NX_class="NXdata", signal="intensity", n_pixels=n)
            for name, (dtype, unit) in COLUMNS.items():
                arr = np.asarray(result.table[name], dtype=dtype)
                ds = px.create_dataset(name, data=arr, chunks=(min(CHUNK, max(n, 1)),), **comp)
                ds.attrs["units"] = unit
            mg = e.create_group("masks")
            mg.attrs.update(NX_class="NXcollection", bits=json.dumps({b.name: int(b) for b in MaskBit}),
                            n_panels=len(result.flags))
            for i, fl in enumerate(result.flags):
                ny, nx = fl.shape
                mg.create_dataset(f"panel_{i:03d}", data=fl, chunks=(min(256, ny), min(512, nx)), **comp)
            cr = experiment.crystal
            if cr is not None:
                cg = e.create_group("crystal")
                cg.attrs["NX_class"] = "NXcollection"
                cg["A"] = np.asarray(cr.get_A(), dtype=float).reshape(3, 3)
                cg["A"].attrs["units"] = "1/angstrom"
                cg["U"] = np.asarray(cr.get_U(), dtype=float).reshape(3, 3)
                cg["B"] = np.asarray(cr.get_B(), dtype=float).reshape(3, 3)
                cg["unit_cell"] = np.asarray(cr.get_unit_cell().parameters(), dtype=float)
                cg.attrs["space_group"] = str(cr.get_space_group().info())
            bm = experiment.beam
            bg = e.create_group("beam")
            bg.attrs["NX_class"] = "NXcollection"
            bg["s0"] = np.asarray(bm.get_s0(), dtype=float)
            bg["s0"].attrs["units"] = "1/angstrom"
            bg["wavelength"] = float(bm.get_wavelength())
            bg["wavelength"].attrs["units"] = "angstrom"
            bg["polarization_normal"] = np.asarray(bm.get_polarization_normal(), dtype=float)
            bg.attrs["polarization_fraction"] = float(bm.get_polarization_fraction())
            from dxtbx.model.experiment_list import ExperimentList

            el = ExperimentList([experiment])
            e["experiment_json"] = json.dumps(el.to_dict())
            ig = e.create_group("info")
            ig.attrs["json"] = json.dumps(result.info, default=_jsonable)
    return path


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_still(path: str | Path, columns: list[str] | None = None) -> dict[str, Any]:
    """Read an artifact back: ``{"pixels": {col: array}, "masks": [flags], "info": dict, "provenance": dict, ...}``."""
    import hdf5plugin  # noqa: F401  (registers the Blosc filter)
    from diffractflow.artifacts import read_provenance

    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path} is not a readable HDF5 file: {exc}") from exc
    with f:
        prov = read_provenance(f)
        if prov.get("schema") != SCHEMA:
            raise InputError(f"{path} has schema {prov.get('schema')!r}, expected {SCHEMA!r}")
        e = f["entry"]
        cols = columns or list(e["pixels"].keys())
        out = {
            "provenance": prov,
            "pixels": {c: e["pixels"][c][()] for c in cols},
            "masks": [e["masks"][k][()] for k in sorted(e["masks"].keys())],
            "bits": json.loads(e["masks"].attrs["bits"]),
            "info": json.loads(e["info"].attrs["json"]),
            "attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in e.attrs.items()},
            "beam": {k: e["beam"][k][()] for k in e["beam"].keys()},
        }
        if "crystal" in e:
            out["crystal"] = {k: e["crystal"][k][()] for k in e["crystal"].keys()}
            out["crystal"]["space_group"] = e["crystal"].attrs["space_group"]
    return out
