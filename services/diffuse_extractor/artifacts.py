"""Inputs (DIALS experiments, images, reflections) and the per-still HDF5 artifact.

HDF5 schema ``diffractflow.diffuse_still`` v5 (one file per still; schema name, integer version and the part other
services read are owned by :mod:`diffractflow.formats.still_table`), readable with h5py after
``import hdf5plugin`` (datasets are Blosc/LZ4 + byte-shuffle compressed, chunked; ``intensity`` plain):

- ``/`` attributes: provenance (schema, producer, job id, parameters, input sha256s).
- ``/entry`` (NXentry), attrs ``image_path``, ``image_index``, ``experiment_index``, for a rotation frame
  ``phi_deg`` (the frame's mid rotation angle, degrees, as the hkl) and ``phi_range_deg`` (start, end),
  ``background_method`` (v4: "frames", "isotropic", "image" or "none": what was subtracted).
- ``/entry/pixels`` (NXdata, signal ``intensity``): one 1-D dataset of length ``n_pixels`` (attr)
  per stored column (:data:`STORED_COLUMNS`: h, k, l, intensity, sigma, background, panel,
  lorentz, exposure), each with a ``units`` attribute.
  v5 derives ``x``, ``y`` (the unflagged pixels of ``/entry/masks``, per panel in row-major order: exactly
  the extractor's) and ``q`` (``|A hkl|``, float64 from the float32 indices, rounded once: within 3e-7
  relative of the extractor's float32 ``|q|``; stored when there is no crystal), 12 % of the v4 bytes and
  ~20 % of its write time; v1-v4 stored them.
  v4 stores ``exposure`` = 1 / correction (float32, computed from the float32 correction the
  extractor applied), the weight a merger needs to go back to counts: ``intensity * exposure =
  raw - background`` (net counts, ADU) and ``(sigma * exposure)^2`` = the variance of the net counts
  (both to float32 rounding, ~1e-7 relative). For v1-v3 files :func:`read_still` derives it as
  1 / correction (within ~4e-7 relative).
  A column that is one value for every pixel (Lorentz 1 for stills, background 0 without a
  background image, NaN hkl without a crystal, panel 0 of a one-panel detector) is a dataset
  with that HDF5 fill value and no chunk written (attribute ``constant``); h5py reads it back as
  a full array. Columns ``qx, qy, qz`` (``A hkl``, through ``/entry/crystal/A``: within
  ~1e-7 1/angstrom of the extractor's), ``correction`` (the float32 product of the five
  multipliers: within 3e-7 relative of the float64 product applied) and ``raw``
  (``intensity / correction + background``: within 6e-7 relative of the counts read)
  are derived (attr ``derived_columns``) and not stored; :func:`read_still` recomputes them.
  v3 also derives the static multipliers ``polarisation, efficiency, solid_angle, air`` (per-pixel
  functions of the detector and beam only, 40% of the v2 bytes): :func:`read_still` recomputes
  them bit for bit with the extractor's own ``static_pixels`` from ``/entry/experiment_json`` and the
  attributes ``air_path_fraction``, ``air_density_g_cm3``, and checks them against every
  ``check_stride``-th value the writer kept (attrs ``check_<name>``); a reader that would get other
  values refuses. v2 files stored the multipliers, v1 files also the other derived columns;
  :func:`read_still` reads all versions (``write_still(..., schema_version=2..4)`` still writes those).
- ``/entry/masks`` (NXcollection): ``panel_NNN`` uint8 (ny, nx) bit flags per panel
  (0 = used; bits in the ``bits`` attribute, JSON name -> value).
- ``/entry/crystal``: ``A`` (3x3, 1/angstrom, DIALS setting matrix U B, q = A hkl for stills),
  ``setting_matrix`` (rotation data only: the frame's ``S R F U B`` that gave hkl),
  ``U``, ``B``, ``unit_cell`` (angstrom, degrees), attr ``space_group``.
- ``/entry/beam``: ``s0`` (1/angstrom), ``wavelength`` (angstrom), ``polarization_normal``,
  attr ``polarization_fraction``.
- ``/entry/experiment_json``: the DIALS experiment (JSON string) for full-model consumers.
- ``/entry/info``: attribute ``json`` with summary numbers (mask counts, mu_air, the background used,
  ``isotropic_background``: the per-still isotropic estimate's summary, ...).
- ``/entry/background_profile`` (v4): (n_shells, 3) float64: |q| shell centre (1/angstrom), the
  per-still isotropic background estimate B(|q|) and its standard error (corrected intensity
  units); always written (subtracted only when ``background_method`` is "isotropic").

Background artifact ``diffractflow.diffuse_background`` v1 (:func:`write_background`; read only by this service,
so its format stays here): ``/entry``
(NXentry, attrs ``n_frames``, ``bin_px``, ``smooth_bins``, ``exposure_time_s``, ``transmission``,
``frame_paths``), ``/entry/background/panel_NNN`` (float32 (ny, nx): smoothed mean counts per frame,
ADU, at that exposure and transmission), ``/entry/variance/panel_NNN`` (ADU^2, variance of that
estimate), ``/entry/binned/panel_NNN`` (the smoothed bin values), ``/entry/frames_used/panel_NNN``
(int16: frames in which each pixel was good), ``/entry/experiment_json`` (detector, beam),
``/entry/info`` (attr ``json``).

Precision: every float column is float32 (relative rounding 6e-8; hkl to ~1e-5 absolute,
q components to ~1e-7 1/angstrom, intensities and corrections to ~4e-7 relative).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import hdf5plugin  # registers the Blosc filter the still table is written and read with
import numpy as np

import diffractflow.errors
from diffractflow.artifacts import atomic_write_path, read_provenance
from diffractflow.formats import check_header, still_table, write_header

from .core.errors import InputError  # noqa: F401  (the service's one input error, re-exported)
from .core.extract import COLUMNS, ExtractionParams, StillExtraction, static_pixels
from .core.masks import MaskBit

SCHEMA = still_table.SCHEMA
SCHEMA_VERSION = still_table.VERSION
BACKGROUND_SCHEMA = "diffractflow.diffuse_background"
BACKGROUND_SCHEMA_VERSION = 1
#: the string forms earlier writers stored for the background's version
BACKGROUND_LEGACY_VERSIONS = {"1": 1, "1.0": 1}


def _own_errors():
    """The formats' platform InputError re-raised as this service's (same message)."""
    return diffractflow.errors.reraised_as(InputError)
CHUNK = 1 << 18  # elements per chunk: 1 MB of float32
CHECK_STRIDE = 4099  # v3: every CHECK_STRIDE-th value of each recomputed multiplier is kept as a check
#: the multipliers whose product is ``correction``
FACTORS = ("polarisation", "efficiency", "solid_angle", "air", "lorentz")
#: static multipliers recomputed on reading from the stored experiment (schema v3)
GEOMETRY_FACTORS = ("polarisation", "efficiency", "solid_angle", "air")
#: columns computed on reading, per schema version (v1 stored everything)
DERIVED_BY_VERSION = {
    2: ("qx", "qy", "qz", "correction", "raw", "exposure"),
    3: ("qx", "qy", "qz", "correction", "raw", "exposure") + GEOMETRY_FACTORS,
    4: ("qx", "qy", "qz", "correction", "raw") + GEOMETRY_FACTORS,
    5: ("qx", "qy", "qz", "correction", "raw") + GEOMETRY_FACTORS + ("q", "x", "y"),
}
#: every column a reader can derive when the file does not store it
DERIVABLE = DERIVED_BY_VERSION[3] + ("q", "x", "y")
#: columns computed from stored ones on reading (this version)
DERIVED_COLUMNS = DERIVED_BY_VERSION[SCHEMA_VERSION]
STORED_COLUMNS = tuple(c for c in COLUMNS if c not in DERIVED_COLUMNS)



#: environment variable naming the still table's filter when ``write_still`` gets none: "lz4" (default) or "none"
COMPRESSION_ENV = "DIFFUSE_EXTRACTOR_COMPRESSION"
COMPRESSIONS = ("lz4", "none")


#: still-table columns written without the filter even with "lz4": corrected intensities are noise down to their
#: last bits, so LZ4 gains little on them (PILATUS 6M still: 21.0 -> 18.4 MB) for the most CPU of any column
#: (~0.013 s of the ~0.05 s that compression costs); readers see plain chunks
PLAIN_COLUMNS = ("intensity",)


def _compression(name: str | None = None) -> dict:
    """h5py dataset options of the still table's filter. "lz4": Blosc/LZ4 level 1 with byte shuffle, except for
    :data:`PLAIN_COLUMNS` (PILATUS 6M still, v5: 86 MB, 0.10 CPU-s to write); "none": plain chunks (133 MB,
    0.07 CPU-s; readers decode nothing). Other Blosc settings cost more CPU (measured: no shuffle, bitshuffle,
    blosclz, zstd, higher levels, Blosc2, larger or smaller chunks)."""
    name = (name or os.environ.get(COMPRESSION_ENV) or "lz4").lower()
    if name not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, not {name!r}")
    if name == "none":
        return {}
    return dict(hdf5plugin.Blosc(cname="lz4", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))


# --------------------------------------------------------------------------- inputs
def load_experiments(path: str | Path):
    """Read a DIALS ``.expt`` with its images reachable (check_format)."""
    # dxtbx (DIALS, ~1 s): only reading or writing a DIALS experiment needs it, not the CLI's start
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
    """Raw panel images (float32 arrays) and the format/dxtbx static good-pixel mask per panel (None: none).

    float32 holds integer counts exactly up to 2^24 (PILATUS counters saturate at 2^20). dxtbx's
    ``ImageSet.get_mask`` is its static mask (the external mask and the panels' untrusted rectangles),
    the masker's (e.g. a goniometer shadow, sequences only) and the trusted range of the pixel values,
    for which it decodes the image a second time (~2/3 of the read's CPU on a PILATUS 6M). The value
    tests and the rectangles are ``masks.untrusted_and_overload``'s (same limits, and overloads kept
    apart from untrusted pixels), so only the external mask (and a masker's) is read here; with a
    masker the whole dxtbx mask is taken, overloaded pixels kept good as before.
    """
    iset = experiment.imageset
    try:
        raw = iset.get_raw_data(image_index)
        masker = iset.masker() if hasattr(iset, "masker") else None
        if masker is not None:
            mask = iset.get_mask(image_index)
        else:
            ext = iset.external_lookup.mask.data
            mask = None if ext.empty() else tuple(ext.tile(i).data() for i in range(ext.n_tiles()))
    except Exception as exc:
        raise InputError(f"cannot read image {image_index} of {_image_path(experiment, image_index)}: {exc}") from exc
    if not isinstance(raw, tuple):
        raw = (raw,)
    if mask is not None and len(mask) != len(raw):
        raise InputError(f"{_image_path(experiment, image_index)}: the mask has {len(mask)} panels, the image "
                         f"{len(raw)}")
    from dxtbx import flumpy  # (dxtbx is loaded already: the imageset is its)

    data, fmask = [], []
    for i, r in enumerate(raw):
        d = flumpy.to_numpy(r)  # a view of the flex array (as_numpy_array copies it: ~3 ms on a 6M panel)
        if mask is None:
            fmask.append(None)
        elif masker is not None:
            hi = experiment.detector[i].get_trusted_range()[1]
            fmask.append(mask[i].as_numpy_array() | (d >= hi))
        else:
            m = mask[i].as_numpy_array()
            if m.shape != d.shape:
                raise InputError(f"{_image_path(experiment, image_index)}: panel {i} mask {m.shape} != image "
                                 f"{d.shape}")
            fmask.append(m)
        data.append(d.astype(np.float32))
    return data, fmask


def _image_path(experiment, image_index: int = 0) -> str:
    try:
        return str(experiment.imageset.get_path(image_index))
    except Exception:
        return "<image>"


def load_reflections(path: str | Path, experiment_index: int | None = None, identifier: str | None = None):
    """Observed reflections of one experiment from a DIALS ``.refl`` (strong or integrated)."""
    # DIALS (~1.5 s): only a job with a .refl needs it
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
        import dxtbx  # DIALS' image reader (~1 s): only a background frame that is not .npy needs it

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
                experiment_index: int = 0, job_id: str | None = None, producer_version: str = "0.1.0",
                schema_version: int = SCHEMA_VERSION, air_path_fraction: float | None = None,
                air_density_g_cm3: float | None = None, compression: str | None = None) -> Path:
    """Write one still's artifact atomically (see the module docstring for the schema).

    ``schema_version`` 2, 3 or 4 writes a previous layout (4: ``q``, ``x``, ``y`` stored; 3: also no
    ``exposure`` column; 2: also the four geometric multipliers stored), for consumers that cannot read v5.
    The air parameters of the extraction (v3 recomputes the air multiplier from them) default to
    ``parameters`` or the extraction defaults.
    ``compression``: "lz4" or "none" (default: ``$DIFFUSE_EXTRACTOR_COMPRESSION``, else "lz4"), see ``_compression``.
    """
    if schema_version not in DERIVED_BY_VERSION:
        raise ValueError(f"can write schema versions {sorted(DERIVED_BY_VERSION)}, not {schema_version}")
    derived_cols = DERIVED_BY_VERSION[schema_version]
    if result.setting_matrix is None:  # no crystal, no hkl: |q| cannot come from A hkl, so it is stored
        derived_cols = tuple(c for c in derived_cols if c != "q")
    stored_cols = tuple(c for c in COLUMNS if c not in derived_cols)
    path = Path(path)
    comp = _compression(compression)
    n = len(result)
    with atomic_write_path(path) as tmp:
        # no chunk cache: each full chunk goes straight through the filter to the file, without a copy
        # into the cache first (~15% less CPU per artifact; same file)
        with h5py.File(tmp, "w", rdcc_nbytes=0) as f:
            still_table.write_still_header(f, producer="diffuse-extractor", producer_version=producer_version,
                                           version=schema_version, job_id=job_id, parameters=parameters,
                                           inputs=inputs)
            f.attrs["default"] = "entry"
            e = f.create_group("entry")
            e.attrs.update(NX_class="NXentry", default="pixels", image_path=image_path,
                           image_index=int(image_index), experiment_index=int(experiment_index))
            scan, gonio = experiment.scan, experiment.goniometer
            if scan is not None and gonio is not None and scan.get_oscillation()[1] != 0:
                # rotation frame: its rotation angle (the scaler smooths scales along it)
                a0 = scan.get_array_range()[0] + int(image_index)
                lo, hi = (float(scan.get_angle_from_array_index(a0 + d, deg=True)) for d in (0.0, 1.0))
                e.attrs.update(phi_deg=0.5 * (lo + hi), phi_range_deg=np.array([lo, hi]))
            if schema_version >= 4:
                e.attrs["background_method"] = str(result.info.get("background_method", "none"))
                prof = getattr(result, "background_profile", None)
                if prof is not None:
                    ds = e.create_dataset("background_profile", data=prof.as_array())
                    ds.attrs.update(columns=json.dumps(["q", "B", "sigma_B"]),
                                    units=json.dumps(["1/angstrom", "corrected intensity (as /entry/pixels/intensity)",
                                                      "same as B"]),
                                    subtracted=result.info.get("background_method") == "isotropic")
            px = e.create_group("pixels")
            derived = {"qx, qy, qz": "A @ (h, k, l) with /entry/crystal/A (or setting_matrix)",
                       "correction": "polarisation * solid_angle * air * efficiency * lorentz (float32, this order)",
                       "raw": "intensity / correction + background"}
            if schema_version < 4:
                derived["exposure"] = "1 / correction"
            if "q" in derived_cols:
                derived["q"] = "|A @ (h, k, l)| (float64 from the stored float32 indices)"
            if "x" in derived_cols:
                derived["x, y"] = "the pixels with flag 0 in /entry/masks, per panel in row-major order, panels in order"
            if schema_version >= 3:
                dflt = ExtractionParams()
                apf = air_path_fraction if air_path_fraction is not None else \
                    float(parameters.get("air_path_fraction", dflt.air_path_fraction))
                adn = air_density_g_cm3 if air_density_g_cm3 is not None else \
                    float(parameters.get("air_density_g_cm3", dflt.air_density_g_cm3))
                derived.update({
                    ", ".join(GEOMETRY_FACTORS): "static_pixels of /entry/experiment_json with the attributes "
                                                 "air_path_fraction, air_density_g_cm3, at the unflagged pixels"})
                # every CHECK_STRIDE-th value of the recomputed columns: the reader checks it gets the same bits
                px.attrs.update(air_path_fraction=float(apf), air_density_g_cm3=float(adn), check_stride=CHECK_STRIDE)
                for c in GEOMETRY_FACTORS:
                    px.attrs[f"check_{c}"] = np.asarray(result.table[c][::CHECK_STRIDE], dtype=np.float32)
            px.attrs.update(NX_class="NXdata", signal="intensity", n_pixels=n, derived_columns=json.dumps(derived))
            chunks = (min(CHUNK, max(n, 1)),)
            empty = {"maxshape": (None,)} if n == 0 else {}  # a still with every pixel masked
            for name in stored_cols:
                dtype, unit = COLUMNS[name]
                arr = np.asarray(result.table[name])
                value = _constant_value(arr)
                if value is not None and n > 0:  # fill value only: no chunk is written
                    ds = px.create_dataset(name, shape=(n,), dtype=dtype, chunks=chunks,
                                           fillvalue=np.asarray(value, dtype=dtype), **comp)
                    ds.attrs["constant"] = np.asarray(value, dtype=dtype)
                else:
                    ds = px.create_dataset(name, data=arr.astype(dtype, copy=False), chunks=chunks, **empty,
                                           **({} if name in PLAIN_COLUMNS else comp))
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
                if result.setting_matrix is not None and not np.array_equal(result.setting_matrix, cg["A"][()]):
                    cg["setting_matrix"] = np.asarray(result.setting_matrix, dtype=float)  # rotation data: S R F U B
                    cg["setting_matrix"].attrs["units"] = "1/angstrom"
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
            # dxtbx (~1 s), only with an experiment to store
            from dxtbx.model.experiment_list import ExperimentList

            el = ExperimentList([experiment])
            e["experiment_json"] = json.dumps(el.to_dict())
            ig = e.create_group("info")
            ig.attrs["json"] = json.dumps(result.info, default=_jsonable)
    return path


def _constant_value(arr: np.ndarray):
    """The single value of a broadcast (stride-0) column, else None. Arrays are not scanned."""
    if arr.ndim == 1 and arr.size and arr.strides[0] == 0:
        return arr[0]
    return None


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
    path = Path(path)
    if not path.is_file():
        raise InputError(f"artifact {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path} is not a readable HDF5 file: {exc}") from exc
    with f:
        prov = read_provenance(f)
        with _own_errors():
            prov["schema_version"] = still_table.check_still(path, f)
        e = f["entry"]
        g = e["pixels"]
        stored = list(g.keys())
        derived = [c for c in DERIVABLE if c not in stored]
        cols = list(columns) if columns else [c for c in COLUMNS if c in stored or c in derived] + \
            [c for c in stored if c not in COLUMNS]
        unknown = [c for c in cols if c not in stored and c not in derived]
        if unknown:
            raise InputError(f"{path}: no column(s) {unknown} in /entry/pixels")
        wanted = [c for c in derived if c in cols]
        need = set(cols)
        if any(c in wanted for c in ("qx", "qy", "qz", "q")):
            need |= {"h", "k", "l"}
        if "exposure" in wanted and "correction" in stored:  # v1 stored the correction
            need.add("correction")
        elif "correction" in wanted or "exposure" in wanted or ("raw" in wanted and "exposure" not in stored):
            need |= set(FACTORS) | {"intensity", "background"}
        if "raw" in wanted and "exposure" in stored:  # v4: raw = intensity * exposure + background
            need |= {"intensity", "background", "exposure"}
        wanted = list(dict.fromkeys([c for c in derived if c in need] + wanted))
        pixels = {c: g[c][()] for c in stored if c in need}
        masks = [e["masks"][k][()] for k in sorted(e["masks"].keys())]
        try:
            _derive(pixels, wanted, e, masks)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc
        out = {
            "provenance": prov,
            "pixels": {c: pixels[c] for c in cols},
            "masks": masks,
            "bits": json.loads(e["masks"].attrs["bits"]),
            "info": json.loads(e["info"].attrs["json"]),
            "attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in e.attrs.items()},
            "beam": {k: e["beam"][k][()] for k in e["beam"].keys()},
        }
        out["attrs"].setdefault("background_method", "image" if "background" in prov.get("inputs", {}) else "none")
        if "background_profile" in e:
            out["background_profile"] = e["background_profile"][()]
        if "crystal" in e:
            out["crystal"] = {k: e["crystal"][k][()] for k in e["crystal"].keys()}
            out["crystal"]["space_group"] = e["crystal"].attrs["space_group"]
    return out


def _derive(pixels: dict, wanted: Sequence[str], entry, masks: Sequence[np.ndarray]) -> None:
    """Recompute the derived columns in ``wanted`` (schemas v2 and v3) into ``pixels``."""
    geo_wanted = [c for c in GEOMETRY_FACTORS if c in wanted]
    if geo_wanted:
        pixels.update(_geometry_factors(entry, masks, geo_wanted))
    if "x" in wanted or "y" in wanted:
        xs, ys = [], []
        for m in masks:
            idx = np.flatnonzero(np.asarray(m).ravel() == 0)
            ys.append((idx // m.shape[1]).astype(np.uint16))
            xs.append((idx % m.shape[1]).astype(np.uint16))
        x = np.concatenate(xs) if xs else np.zeros(0, np.uint16)
        if x.shape[0] != int(entry["pixels"].attrs["n_pixels"]):
            raise InputError(f"/entry/masks has {x.shape[0]} unflagged pixels, the table "
                             f"{int(entry['pixels'].attrs['n_pixels'])} rows")
        pixels["x"], pixels["y"] = x, (np.concatenate(ys) if ys else np.zeros(0, np.uint16))
    if any(c in wanted for c in ("qx", "qy", "qz", "q")):
        cg = entry["crystal"] if "crystal" in entry else None
        if cg is not None and "h" in pixels:
            A = cg["setting_matrix"][()] if "setting_matrix" in cg else cg["A"][()]
            hkl = np.stack([pixels["h"], pixels["k"], pixels["l"]]).astype(np.float64)
            qd = np.asarray(A, dtype=float).reshape(3, 3) @ hkl
            q = qd.astype(np.float32)
        else:  # no crystal, no hkl: the components are not kept (|q| is)
            q = qd = np.full((3, int(entry["pixels"].attrs["n_pixels"])), np.nan, np.float32)
        if "q" in wanted:  # v5: |q| in float64 from the float32 indices, rounded once
            pixels["q"] = np.sqrt(np.einsum("ij,ij->j", qd, qd)).astype(np.float32)
        for j, c in enumerate(("qx", "qy", "qz")):
            if c in wanted:
                pixels[c] = q[j]
    if "raw" in wanted and "exposure" in pixels and "exposure" not in wanted:  # v4: the stored exposure
        raw = pixels["intensity"] * pixels["exposure"]
        raw += pixels["background"]
        pixels["raw"] = raw
        wanted = [c for c in wanted if c != "raw"]
    if "correction" in wanted or "raw" in wanted or ("exposure" in wanted and "correction" not in pixels):
        # float32 product of the stored (rounded) factors
        total = pixels["polarisation"] * pixels["solid_angle"]
        total *= pixels["air"]
        total *= pixels["efficiency"]
        total *= pixels["lorentz"]
        if "raw" in wanted:
            raw = pixels["intensity"] / total
            raw += pixels["background"]
            pixels["raw"] = raw
        if "correction" in wanted:
            pixels["correction"] = total
        if "exposure" in wanted:
            pixels["exposure"] = np.divide(np.float32(1.0), total)
    elif "exposure" in wanted:  # v1: from the stored correction
        pixels["exposure"] = np.divide(np.float32(1.0), pixels["correction"])


def _geometry_factors(entry, masks: Sequence[np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """The static multipliers of a v3 artifact at its unflagged pixels, recomputed with
    ``core.extract.static_pixels`` from the stored experiment (the extractor's own code path), and
    checked bit for bit against the sample of values the writer kept."""
    g = entry["pixels"]
    try:
        expt = _models_from_json(json.loads(_as_str(entry["experiment_json"][()])))
        params = ExtractionParams(air_path_fraction=float(g.attrs["air_path_fraction"]),
                                  air_density_g_cm3=float(g.attrs["air_density_g_cm3"]))
        stride = int(g.attrs["check_stride"])
        checks = {c: np.asarray(g.attrs[f"check_{c}"]) for c in names}
    except Exception as exc:  # noqa: BLE001 - any damage to what the recomputation needs
        raise InputError(f"cannot recompute the geometric multipliers ({exc})") from exc
    if len(expt.detector) != len(masks):
        raise InputError(f"experiment has {len(expt.detector)} panels, /entry/masks {len(masks)}")
    sel = [np.flatnonzero(np.asarray(m).ravel() == 0) for m in masks]
    # the interpolated radial functions first (the current writer's values); files written before them hold the
    # exact evaluation's, which differ from them in a few float32 roundings at most: a failed check tries those
    for tables in (True, False):
        # (no Lorentz: not among these factors)
        pixels = static_pixels(expt.detector, expt.beam, params, None, radial_tables=tables)
        out = {}
        for name in names:
            parts = [np.asarray(getattr(pp, name))[idx] for pp, idx in zip(pixels, sel)]
            col = np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
            if not np.array_equal(col[::stride], checks[name]):
                break
            out[name] = col
        else:
            return out
        del pixels
    raise InputError(f"recomputed {name} multipliers differ from the values the writer kept; "
                     f"read with the diffuse-extractor version that wrote the file")


def _models_from_json(d: dict):
    """An Experiment with the detector, beam (and goniometer, scan) of the first experiment of a
    DIALS experiment-list dict; no imageset (the images need not be reachable)."""
    # dxtbx (DIALS, ~1 s): only reading or writing a DIALS experiment needs it, not the CLI's start
    from dxtbx.model import BeamFactory, DetectorFactory, Experiment, GoniometerFactory, ScanFactory

    e = d["experiment"][0]

    def model(kind, factory):
        i = e.get(kind)
        return factory.from_dict(d[kind][i]) if i is not None and d.get(kind) else None

    return Experiment(detector=model("detector", DetectorFactory), beam=model("beam", BeamFactory),
                      goniometer=model("goniometer", GoniometerFactory), scan=model("scan", ScanFactory))


def _as_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        v = v[()]
        return v.decode() if isinstance(v, bytes) else str(v)
    return str(v)


# --------------------------------------------------------------------------- exposure from image headers
_EXPOSURE_RE = re.compile(rb"^#?\s*Exposure_time[\s:=]+([-+0-9.eE]+)", re.M)
_TRANSMISSION_RE = re.compile(rb"^#?\s*(?:Filter_)?[Tt]ransmission[\s:=]+([-+0-9.eE]+)", re.M)


def image_exposure(path: str | Path) -> dict[str, float | None]:
    """``{"exposure_time_s", "transmission"}`` from a CBF image's header text (PILATUS mini-CBF
    ``# Exposure_time 0.019 s``, ``# Transmission`` or ``# Filter_transmission``), read with dxtbx's
    ``FormatCBF.get_cbf_header`` (compressed files too). A value the header lacks, or a file that is
    not a CBF, gives None."""
    out: dict[str, float | None] = {"exposure_time_s": None, "transmission": None}
    try:
        from dxtbx.format.FormatCBF import FormatCBF  # dxtbx (~1 s): only a CBF header read needs it

        text = FormatCBF.get_cbf_header(str(path))
    except Exception:  # noqa: BLE001 - not a CBF (or unreadable): nothing known
        return out
    if isinstance(text, str):
        text = text.encode(errors="replace")
    for key, rx in (("exposure_time_s", _EXPOSURE_RE), ("transmission", _TRANSMISSION_RE)):
        m = rx.search(text)
        if m:
            try:
                v = float(m.group(1))
            except ValueError:
                continue
            out[key] = v if np.isfinite(v) and v > 0 else None
    return out


def exposure_ratio(still: Mapping[str, float | None],
                   background: Mapping[str, float | None]) -> tuple[float, list[str]]:
    """(t T)_still / (t T)_background, and warnings for every missing value (taken as equal: ratio 1)."""
    ratio, notes = 1.0, []
    for key, what in (("exposure_time_s", "exposure time"), ("transmission", "transmission")):
        a, b = still.get(key), background.get(key)
        if a is None or b is None:
            notes.append(f"{what} unknown for the {'still' if a is None else 'background'}: taken as equal")
        else:
            ratio *= float(a) / float(b)
    return ratio, notes


# --------------------------------------------------------------------------- background artifact
def write_background(path: str | Path, model, detector, beam, *, parameters: Mapping[str, Any],
                     inputs: Mapping[str, str], frame_paths: Sequence[str], exposure_time_s: float | None,
                     transmission: float | None, job_id: str | None = None,
                     producer_version: str = "0.1.0") -> Path:
    """Write a ``core.background.FrameBackground`` atomically (schema in the module docstring)."""
    # dxtbx (DIALS, ~1 s): only reading or writing a DIALS experiment needs it, not the CLI's start
    from dxtbx.model import Experiment
    from dxtbx.model.experiment_list import ExperimentList

    comp = _compression()
    path = Path(path)
    with atomic_write_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write_header(f, schema=BACKGROUND_SCHEMA, version=BACKGROUND_SCHEMA_VERSION, producer="diffuse-extractor",
                         producer_version=producer_version, job_id=job_id, parameters=parameters, inputs=inputs)
            f.attrs["default"] = "entry"
            e = f.create_group("entry")
            e.attrs.update(NX_class="NXentry", n_frames=int(model.n_frames), bin_px=int(model.bin_px),
                           smooth_bins=float(model.smooth_bins),
                           exposure_time_s=np.nan if exposure_time_s is None else float(exposure_time_s),
                           transmission=np.nan if transmission is None else float(transmission),
                           frame_paths=json.dumps([str(p) for p in frame_paths]))
            for group, arrays, unit, dtype in (("background", model.mean, "counts (ADU) per frame", np.float32),
                                               ("variance", model.variance, "ADU^2", np.float32),
                                               ("binned", model.binned, "counts (ADU) per pixel per frame",
                                                np.float32),
                                               ("frames_used", model.good, "frames", np.int16)):
                g = e.create_group(group)
                g.attrs.update(NX_class="NXcollection", units=unit)
                for i, a in enumerate(arrays):
                    ny, nx = a.shape
                    g.create_dataset(f"panel_{i:03d}", data=np.asarray(a, dtype=dtype),
                                     chunks=(min(256, ny), min(512, nx)), **comp)
            e["experiment_json"] = json.dumps(ExperimentList([Experiment(detector=detector, beam=beam)]).to_dict())
            e.create_group("info").attrs["json"] = json.dumps(model.info, default=_jsonable)
    return path


def is_background_artifact(path: str | Path) -> bool:
    """True for an HDF5 file of schema ``diffractflow.diffuse_background``."""
    path = Path(path)
    if not path.is_file() or not h5py.is_hdf5(str(path)):
        return False
    with h5py.File(path, "r") as f:
        s = f.attrs.get("schema")
        return (s.decode() if isinstance(s, bytes) else s) == BACKGROUND_SCHEMA


_BACKGROUND_CACHE: dict[tuple, dict] = {}


def read_background_artifact(path: str | Path, detector=None) -> dict[str, Any]:
    """``{"mean": [panels], "variance": [panels], "exposure_time_s", "transmission", "info", ...}``.

    Checked against ``detector`` (panel count and sizes) when given. The last file read is kept in
    memory (keyed by path, size and mtime): a worker applies one background to many stills.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"background artifact {path} does not exist")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    out = _BACKGROUND_CACHE.get(key)
    if out is None:
        try:
            with h5py.File(path, "r") as f:
                with _own_errors():
                    check_header(path, f.attrs, schema=BACKGROUND_SCHEMA, versions=(BACKGROUND_SCHEMA_VERSION,),
                                 legacy=BACKGROUND_LEGACY_VERSIONS, what="diffuse background artifact")
                e = f["entry"]
                names = sorted(e["background"].keys())
                t, tr = float(e.attrs["exposure_time_s"]), float(e.attrs["transmission"])
                out = {"mean": [e["background"][k][()] for k in names],
                       "variance": [e["variance"][k][()] for k in names],
                       "exposure_time_s": t if np.isfinite(t) else None,
                       "transmission": tr if np.isfinite(tr) else None,
                       "n_frames": int(e.attrs["n_frames"]), "bin_px": int(e.attrs["bin_px"]),
                       "info": json.loads(e["info"].attrs["json"])}
        except (OSError, KeyError) as exc:
            raise InputError(f"cannot read background artifact {path}: {exc}") from exc
        _BACKGROUND_CACHE.clear()
        _BACKGROUND_CACHE[key] = out
    if detector is not None:
        shapes = [tuple(p.get_image_size()[::-1]) for p in detector]
        if [a.shape for a in out["mean"]] != shapes:
            raise InputError(f"background artifact {path} does not match the detector ({len(shapes)} panels, "
                             f"shapes {shapes})")
    return out
