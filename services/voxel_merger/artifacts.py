"""Reading the voxel merger's inputs and writing its outputs (HDF5 / NeXus, JSON, PNG).

The shared files are owned by :mod:`diffractflow.formats` (schema, integer version, one layout per version):
the still table (input, ``still_table``), the observation table (``observations``), the merged map
(``merged_map``), the scales (``scales``, input of a scaled merge). The functions here are the service's thin
wrappers around them, plus the grid JSON and the figures.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import diffractflow.errors
import numpy as np

from diffractflow.artifacts import atomic_write_json, atomic_write_path
from diffractflow.formats import merged_map, observations, still_table
from diffractflow.formats import scales as scales_format
from diffractflow.reading import reader, reading

from . import __version__
from .core.grid import CrystalModel, GlobalGrid
from .core.sources import ObservationChunk

MAP_SCHEMA = merged_map.SCHEMA
MAP_SCHEMA_VERSION = merged_map.VERSION
TABLE_SCHEMA = observations.SCHEMA
TABLE_SCHEMA_VERSION = observations.VERSION
PRODUCER = "voxel-merger"
EXTRACTOR_SCHEMA = still_table.SCHEMA
log = logging.getLogger("voxel_merger")
_warned_no_weight: set[str] = set()


class InputError(diffractflow.errors.InputError):
    """An input file is missing, unreadable or does not follow the expected schema.

    The platform's input error: the bus rejects the job without retry; the message names the file and the
    problem."""


def _own_errors():
    """The formats' platform InputError re-raised as this service's (same message)."""
    return diffractflow.errors.reraised_as(InputError)


# ====================================================================== stills
def _crystal_model(d: Mapping[str, Any] | None) -> CrystalModel | None:
    """The still table's crystal (see ``diffractflow.formats.still_table``) as the merger's model."""
    if d is None:
        return None
    A = d.get("A")
    if d.get("unit_cell") is not None:
        A_t = None if A is None else tuple(tuple(float(x) for x in r) for r in np.asarray(A, float).reshape(3, 3))
        return CrystalModel(tuple(d["unit_cell"]), d["space_group"], A_t)
    return CrystalModel.from_A(np.asarray(A, float).reshape(3, 3), d["space_group"])


class H5Still:
    """A still's per-pixel table (schema ``diffractflow.diffuse_still``, owned by
    :mod:`diffractflow.formats.still_table`), streamed in chunks (bounded memory)."""

    def __init__(self, path: str | Path):
        with reading(path, InputError, "still table (HDF5)"), _own_errors():
            self._t = still_table.StillTable(path)
        self.path = self._t.path
        try:
            with reading(path, InputError, "still table (HDF5)"), _own_errors():
                self.crystal = _crystal_model(self._t.crystal)
        except BaseException:
            self._t.close()
            raise
        self.still_id = self._t.still_id
        self.n_obs = self._t.n_pixels
        if not self._t.has_exposure:
            self._warn_no_weight()

    def _warn_no_weight(self) -> None:
        """Counts-based weights (1/σ²) bias the mean of low-count pixels low: say so once per kind of file."""
        if self._t.version >= 4 and self._t.producer != "diffuse-extractor":
            return  # a table written without exposures (tests, benchmarks): 1/σ² is the documented default
        key = f"{still_table.SCHEMA} v{self._t.version}"
        if key in _warned_no_weight:
            return
        _warned_no_weight.add(key)
        log.warning("%s: %s has no exposure column: weighting pixels by 1/sigma^2 from their own counts, which "
                    "biases merged means low at a few photons per pixel (diffuse-extractor schema %s; further files "
                    "of this kind are not reported)", self.path, still_table.PIXELS, key)

    @property
    def has_weight(self) -> bool:
        return self._t.has_exposure

    def iter_chunks(self, chunk: int = 1 << 22) -> Iterator[ObservationChunk]:
        with reading(self.path, InputError, "still table (HDF5)"):
            for c in self._t.iter_chunks(chunk):
                yield ObservationChunk(c["h"], c["k"], c["l"], c["intensity"], c["sigma"], c.get("q"),
                                       c.get("exposure"))

    def hkl_abs_max(self, chunk: int = 1 << 22) -> np.ndarray:
        out = np.zeros(3)
        for c in self.iter_chunks(chunk):
            if len(c):
                out = np.maximum(out, [np.nanmax(np.abs(c.h)), np.nanmax(np.abs(c.k)), np.nanmax(np.abs(c.l))])
        return out

    def close(self):
        self._t.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_still(path: str | Path) -> H5Still:
    """Open one still's per-pixel table for streaming."""
    return H5Still(path)


def write_still(path: str | Path, still_id: str, h, k, l, intensity, sigma, q_magnitude=None,
                crystal: CrystalModel | None = None, weight=None) -> Path:
    """Write a minimal still table (``diffractflow.formats.still_table``; tests, demos and benchmarks).

    ``weight``: optional per-pixel weight independent of the counts (the table's ``exposure`` column)."""
    cols = {"h": h, "k": k, "l": l, "intensity": intensity, "sigma": sigma, "q": q_magnitude, "exposure": weight}
    cr = None if crystal is None else {"unit_cell": crystal.unit_cell, "A": crystal.A_matrix,
                                       "space_group": crystal.space_group}
    return still_table.write_still_table(path, still_id, {c: v for c, v in cols.items() if v is not None},
                                         crystal=cr, producer=f"{PRODUCER} (synthetic)", producer_version=__version__)


# ====================================================================== scales / grid
@reader("scales JSON", InputError)
def read_scales(path: str | Path) -> dict[str, float]:
    """Per-still multiplicative scales b (I_obs ≈ b·I_ref) from the scaler's scales.json, keys as written: still
    ids (version 2), or the observation table's integer still_id (version 1, see :func:`resolve_scales`)."""
    with _own_errors():
        return scales_format.read_scales_raw(path)


def resolve_scales(scales: Mapping[str, float] | None, still_names: Sequence[str] | None) -> dict[str, float] | None:
    """Key scales by still id: still-id keys stay, integer keys (old, version-1 scales) index ``still_names``."""
    if scales is None:
        return None
    if not still_names:
        return dict(scales)
    with _own_errors():
        return scales_format.by_still_id(scales, still_names)


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
    with _own_errors():
        return observations.read_still_names(table_path)


def write_grid(path: str | Path, grid: GlobalGrid, extra: Mapping[str, Any] | None = None) -> Path:
    return atomic_write_json(path, {"schema": "diffractflow.voxel_merger.grid", "schema_version": 1,
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
class ObservationTableWriter(observations.ObservationTableWriter):
    """The observation table for the scaler (``diffractflow.formats.observations``), written in appended chunks."""

    FIELDS = observations.FIELDS

    def __init__(self, path: Path, grid: GlobalGrid, parameters: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, str] | None = None, job_id: str | None = None, chunk: int = 1 << 18):
        super().__init__(path, grid.to_dict(), producer=PRODUCER, producer_version=__version__,
                         parameters=parameters, inputs=inputs, job_id=job_id, chunk=chunk)


@reader("observation table (HDF5)", InputError)
def read_observation_table(path: str | Path) -> dict[str, np.ndarray]:
    with _own_errors():
        return observations.read_observations(path)


# ====================================================================== merged map
def write_map(path: str | Path, grid: GlobalGrid, intensity: np.ndarray | None, sigma: np.ndarray | None,
              counts: np.ndarray | None, statistics: Mapping[str, Any] | None = None, parameters: Mapping[str, Any] | None = None,
              inputs: Mapping[str, str] | None = None, job_id: str | None = None, slabs=None) -> Path:
    """Merged 3-D map (``diffractflow.formats.merged_map``: NeXus NXdata, axes h, k, l; signal intensity).

    Give dense arrays, or ``slabs``: an iterable of (h index, mean (nk, nl), sigma, count)
    written one h-plane at a time (bounded memory).
    """
    return merged_map.write_map(path, grid, intensity, sigma, counts, statistics=statistics, producer=PRODUCER,
                                producer_version=__version__, parameters=parameters, inputs=inputs, job_id=job_id,
                                slabs=slabs)


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
    with _own_errors():
        m = merged_map.read_map(path, ("intensity", "sigma", "counts"))
    return MergedMapFile(GlobalGrid.from_dict(m["grid"]), m["intensity"], m["sigma"], m["counts"], m["statistics"],
                         m["provenance"])


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
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"), hence here
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


def write_map_figures(out_dir: Path, grid: GlobalGrid, planes: dict[int, np.ndarray],
                      profile: Mapping[str, Any]) -> dict[str, Path]:
    """Every figure of a merged map: the h=0, k=0, l=0 planes (:func:`map_planes`) and the radial profile. One
    function of picklable arguments, so a service can draw them in its figure process while it writes the map."""
    out = write_slice_pngs(out_dir, grid, planes)
    out["radial_profile"] = write_radial_png(out_dir / "radial_profile.png", profile)
    return out


def write_radial_png(path: Path, profile: Mapping[str, Any]) -> Path:
    import matplotlib  # heavy, and only for the optional PNGs: imported when a plot is made
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"), hence here
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
