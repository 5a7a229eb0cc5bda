"""The partial accumulator (voxel-merger accumulate jobs -> merge jobs): voxel sums of one or more stills.

HDF5 group ``/accumulator`` with attributes ``schema`` = ``diffractflow.voxel_merger.accumulator``,
``schema_version`` (integer), ``grid`` (JSON), ``n_halves``, ``block_shift``, ``fields`` (JSON list),
``still_ids`` (JSON list), ``n_obs``, ``n_dropped`` and ``meta_<key>`` (JSON). The sums per voxel and half are
count, Σw, Σw·I, Σw²σ² (float64). Two layouts, told apart by the version:

- version 2, blocked (the streaming store's work files, multi-still accumulators): dataset ``sums`` (float64
  (4, n_halves, n_voxels), chunked per voxel block of 2^block_shift voxels, fill 0) and ``block_nonempty``
  (uint8 per block). Written "2.0" before integers.
- version 3, sparse (what an accumulate job writes for one still: it touches ~1 % of the grid's voxels):
  ``voxel_ids`` (int64 (n,), strictly increasing: the voxels with at least one observation) and ``sums``
  (float64 (4, n_halves, n)). ``block_shift`` is kept for readers that visit the sums block by block.

Version 1 ("1.0") held Σw·I² with w = 1/σ² and cannot be read (re-accumulate).

The streaming store itself (block cache, staging) is ``voxel_merger.storage.H5VoxelAccumulator``; this module
owns the header it writes and checks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ._header import check_header

SCHEMA = "diffractflow.voxel_merger.accumulator"
#: the newest version (the sparse layout of single-still partials)
VERSION = 3
#: the blocked dense layout (still written by the streaming store)
BLOCKED_VERSION = 2
SPARSE_VERSION = 3
VERSIONS = (2, 3)
#: string forms earlier writers used for the same versions
LEGACY_VERSIONS = {"1": 1, "1.0": 1, "2": 2, "2.0": 2}
GROUP = "accumulator"
WHAT = "voxel-merger accumulator"
REQUIRED_ATTRS = ("grid", "n_halves", "block_shift", "still_ids", "n_obs", "n_dropped")
#: datasets each version needs
DATASETS = {2: ("sums", "block_nonempty"), 3: ("voxel_ids", "sums")}


def stamp(group, version: int = BLOCKED_VERSION) -> None:
    """Mark an h5py group as an accumulator of ``version`` (2: blocked, 3: sparse; the store writes the rest)."""
    if version not in VERSIONS:
        raise ValueError(f"accumulator version must be one of {VERSIONS}, got {version}")
    group.attrs["schema"] = SCHEMA
    group.attrs["schema_version"] = np.int64(version)


def is_sparse(version: int) -> bool:
    return version == SPARSE_VERSION


def check(path: str | Path, group, fields: list[str]) -> int:
    """The version of an accumulator group; InputError naming ``path`` for another schema, an unreadable
    version or a missing attribute/dataset. ``fields``: the sums this reader expects (for the message)."""
    v = check_header(path, group.attrs, schema=SCHEMA, versions=VERSIONS, legacy=LEGACY_VERSIONS, what=WHAT,
                     hint=f"; its sums are {fields}: re-accumulate the still with this version")
    missing = [a for a in REQUIRED_ATTRS if a not in group.attrs] + [d for d in DATASETS[v] if d not in group]
    if missing:
        raise InputError(f"{path}: {WHAT} lacks {missing}")
    if v == SPARSE_VERSION:
        ids, sums = group["voxel_ids"], group["sums"]
        if ids.ndim != 1 or sums.ndim != 3 or sums.shape[0] != 4 or sums.shape[2] != ids.shape[0]:
            raise InputError(f"{path}: sparse {WHAT} has voxel_ids {ids.shape} and sums {sums.shape}, expected "
                             f"(n,) and (4, n_halves, n)")
    return v
