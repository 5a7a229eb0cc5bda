"""The voxel merger's parameters, the only place their defaults are written.

Each option is declared once, in a small group; :class:`MergeOptions` (the library's options, taken by
:mod:`voxel_merger.pipeline`) is all groups plus three library-only knobs, and each bus job kind is the groups it
uses: :class:`AccumulateParams`, :class:`MergeParams`, :class:`RunParams`, chosen by ``mode`` in
:data:`VoxelMergerParams` (``run`` when absent). The CLI's options take their defaults and help from the same
fields. Unknown keys are refused (``extra="forbid"``).

Storage backend: ``hdf5`` everywhere (bounded memory; dense in memory while the grid fits ``cache_mb``); the
same job gives the same result from the CLI, the bus and the library.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, Tag

from diffractflow.params import job_kind

#: merge jobs: outlier threshold (σ) when ``reject_sigma`` is not given and the stills are scaled
MERGE_REJECT_SIGMA = 5.0


class _Forbid(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GridOptions(_Forbid):
    """How the grid is cut (``run``, ``grid``; accumulate jobs check ``subdivisions``)."""

    subdivisions: int = Field(3, ge=1, le=15, description="sub-voxels per unit of h, k and l, odd 1..15 (integer "
                              "hkl at voxel centres)")
    d_min: Optional[float] = Field(None, gt=0, description="resolution limit of the grid and of the observations, "
                                   "Å, > 0 (default: from the data)")


class CacheOption(_Forbid):
    # 768 MiB: a d_min 2 Å grid of a ~50 x 65 x 80 Å cell (7 M voxels, two halves) stays dense in memory, whose merge
    # costs a third less CPU and less peak memory than the block cache (1.03 vs 1.38 GB measured); merge peak
    # stays below 2 GB up to the 12 M-voxel grids this admits
    cache_mb: int = Field(768, ge=16, description="block cache of an HDF5 accumulator, MiB, >= 16 (the grid is "
                          "accumulated densely in memory while it fits)")


class StorageOptions(CacheOption):
    """Where the sums live."""

    backend: Literal["memory", "hdf5"] = Field("hdf5", description="work accumulators: 'hdf5' (bounded memory, on "
                                               "disk; dense in memory while the grid fits cache_mb) or 'memory' "
                                               "(dense arrays); partials are always HDF5")


class MergingOptions(_Forbid):
    """How the sums become a map: symmetry, outlier rejection, CC½."""

    symmetry: Optional[str] = Field(None, description="merge symmetry equivalents (Laue group + Friedel) of this "
                                    "space group symbol, 'auto' for the stills' own; None/'none': no symmetry merging")
    reject_sigma: Optional[float] = Field(
        None, ge=0, description="outlier threshold in σ (leave-one-out), >= 0; 0: off; not given: off, except when "
        f"merging partials with scales: {MERGE_REJECT_SIGMA} (unscaled stills differ by their scale factors, which a "
        "per-voxel test would take for outliers)")
    reject_min_count: int = Field(3, ge=2, description="only voxels with at least this many observations (merge: "
                                  "stills) are tested, >= 2")
    reject_rounds: int = Field(2, ge=1, le=5, description="iterated rejection rounds, 1..5 (each one more pass over "
                               "the stills or partials)")
    half_seed: int = Field(0, description="seed of the random per-still half-dataset split (CC½)")
    n_shells: int = Field(10, ge=1, le=100, description="resolution shells for CC½ and symmetry agreement (equal "
                          "reciprocal volume), 1..100")


class BraggVoxelOption(_Forbid):
    exclude_bragg_voxels: bool = Field(False, description="merge: leave out the voxel centred on each integer hkl "
                                       "(Bragg spot plus halo centre; what the Bragg mask misses lands there); needs "
                                       "subdivisions >= 3")


class FigureOption(_Forbid):
    figures: bool = Field(True, description="write the slice and radial-profile PNGs beside the map (~1.5 CPU-s a "
                          "merge); an intermediate map (e.g. the unscaled merge that feeds the scaler) can skip them")


class TableOnlyOption(_Forbid):
    table_only: bool = Field(False, description="merge: write only the scaler's observation table (per still and "
                             "voxel), no map, statistics or figures: the unscaled merge that feeds the scaler needs "
                             "nothing else; needs single-still partials and no reject_sigma")


class MergeOptions(GridOptions, StorageOptions, MergingOptions, BraggVoxelOption, FigureOption, TableOnlyOption):
    """Every option of the library's workflows (:mod:`voxel_merger.pipeline`); units: d_min Å, reject_sigma σ."""

    chunk: int = Field(1 << 20, ge=1, description="observations read per chunk (bounds the memory of reading)")
    write_table: bool = Field(True, description="write the scaler's flat observation table")
    reference_setting: bool = Field(True, description="reindex stills to their space group's reference setting")

    def params(self) -> dict[str, Any]:
        """The options as recorded in the artifacts' provenance."""
        return self.model_dump()


class AccumulateParams(GridOptions, CacheOption):
    """Bus ``mode="accumulate"``: one still (input ``still``) onto the run's grid (input ``grid``, a JSON file, or
    the ``grid`` / ``grid_spec`` parameter) -> a partial accumulator."""

    mode: Literal["accumulate"] = Field("accumulate", description="job kind")
    grid: Optional[dict] = Field(None, description="grid definition (GlobalGrid.to_dict)")
    grid_spec: Optional[dict] = Field(None, description="{unit_cell (Å, deg), space_group, d_min (Å), "
                                      "subdivisions}: the merger builds the grid (reference setting, sphere 1/d_min)")


class MergeParams(MergingOptions, StorageOptions, BraggVoxelOption, FigureOption, TableOnlyOption):
    """Bus ``mode="merge"``: partial accumulators (inputs ``partial*``; optional ``scales`` and ``observations``,
    whose still_names map integer scale keys) -> the merged map."""

    mode: Literal["merge"] = Field("merge", description="job kind")


class RunParams(GridOptions, MergingOptions, StorageOptions, FigureOption):
    """Bus ``mode="run"``: stills (inputs ``still*``; optional ``scales``) -> grid, accumulation, map."""

    mode: Literal["run"] = Field("run", description="job kind")


class VoxelMergerParams(RootModel):
    """A voxel-merger job's ``params``: the job kind's model by ``mode`` (default run), as ``.root``."""

    root: Annotated[Union[Annotated[AccumulateParams, Tag("accumulate")], Annotated[MergeParams, Tag("merge")],
                          Annotated[RunParams, Tag("run")]],
                    job_kind("mode", "run", "accumulate", "merge", "run")]


def merge_reject_sigma(reject_sigma: Optional[float], scaled: bool) -> Optional[float]:
    """A merge's outlier threshold (σ) or None (off): ``reject_sigma`` as given (0: off); not given,
    :data:`MERGE_REJECT_SIGMA` when the stills are scaled, off without scales. The CLI's ``merge`` and the bus's
    merge jobs both use it."""
    if reject_sigma is None and scaled:
        reject_sigma = MERGE_REJECT_SIGMA
    return reject_sigma or None


def merge_options(params: BaseModel, **overrides: Any) -> MergeOptions:
    """The library options of a job kind's parameters (the options it does not set keep their defaults)."""
    fields = {k: v for k, v in params.model_dump().items() if k in MergeOptions.model_fields}
    return MergeOptions(**{**fields, **overrides})


DEFAULTS = MergeOptions()

__all__ = ["MERGE_REJECT_SIGMA", "GridOptions", "StorageOptions", "CacheOption", "MergingOptions", "BraggVoxelOption", "FigureOption",
           "TableOnlyOption", "MergeOptions",
           "AccumulateParams", "MergeParams", "RunParams", "VoxelMergerParams", "merge_options", "merge_reject_sigma", "DEFAULTS"]
