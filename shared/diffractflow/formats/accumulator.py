"""The partial accumulator (voxel-merger accumulate jobs -> merge jobs): voxel sums of one or more stills.

HDF5 group ``/accumulator`` with attributes ``schema`` = ``diffractflow.voxel_merger.accumulator``,
``schema_version`` (integer), ``grid`` (JSON), ``n_halves``, ``block_shift``, ``fields`` (JSON list),
``still_ids`` (JSON list), ``n_obs``, ``n_dropped`` and ``meta_<key>`` (JSON); datasets ``sums`` (float64
(4, n_halves, n_voxels), chunked per voxel block, fill 0: the sums count, Σw, Σw·I, Σw²σ²) and
``block_nonempty`` (uint8 per block). Version 2 (written "2.0" before integers) holds Σw²σ² as its fourth sum;
version 1 ("1.0") held Σw·I² with w = 1/σ² and cannot be read (re-accumulate).

The streaming store itself (block cache, staging) is ``voxel_merger.storage.H5VoxelAccumulator``; this module
owns the header it writes and checks.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ._header import check_header

SCHEMA = "diffractflow.voxel_merger.accumulator"
VERSION = 2
VERSIONS = (2,)
#: string forms earlier writers used for the same versions
LEGACY_VERSIONS = {"1": 1, "1.0": 1, "2": 2, "2.0": 2}
GROUP = "accumulator"
WHAT = "voxel-merger accumulator"
REQUIRED_ATTRS = ("grid", "n_halves", "block_shift", "still_ids", "n_obs", "n_dropped")


def stamp(group) -> None:
    """Mark an h5py group as an accumulator of this version (the store writes the rest)."""
    group.attrs["schema"] = SCHEMA
    group.attrs["schema_version"] = np.int64(VERSION)


def check(path: str | Path, group, fields: list[str]) -> int:
    """The version of an accumulator group; InputError naming ``path`` for another schema, an unreadable
    version or a missing attribute/dataset. ``fields``: the sums this reader expects (for the message)."""
    v = check_header(path, group.attrs, schema=SCHEMA, versions=VERSIONS, legacy=LEGACY_VERSIONS, what=WHAT,
                     hint=f"; its sums are {fields}: re-accumulate the still with this version")
    missing = [a for a in REQUIRED_ATTRS if a not in group.attrs] + \
        [d for d in ("sums", "block_nonempty") if d not in group]
    if missing:
        raise InputError(f"{path}: {WHAT} lacks {missing}")
    return v
