"""One owner per file that crosses a service boundary: schema name, integer version, writer and reader.

=====================  ===========================================  =====================================
module                 schema                                       written by -> read by
=====================  ===========================================  =====================================
``still_table``        ``diffractflow.diffuse_still`` v5 (1-5)      diffuse-extractor -> voxel-merger,
                                                                    validation, report
``observations``       ``diffractflow.voxel_merger.observations``   voxel-merger -> scaler
                       v2 (1-2)
``accumulator``        ``diffractflow.voxel_merger.accumulator``    voxel-merger accumulate -> merge
                       v3 (2-3; 3: sparse single-still partials)
``merged_map``         ``diffractflow.voxel_merger.map`` v1         voxel-merger -> scaler (absolute),
                                                                    validation, report
``scales``             ``diffractflow.scaler.scales`` v2 (1-2)      scaler -> voxel-merger, validation,
                                                                    report, demo
=====================  ===========================================  =====================================

Every writer stores an integer version (``scales.json`` as ``{"schema", "schema_version", "scales"}``); every
reader checks schema and version and names the file in an :class:`diffractflow.errors.InputError` when either (or
a field of that version) is wrong. Readers accept the string forms of a version that older writers stored
(``"1.0"``, ``"1"``), listed per format in ``LEGACY_VERSIONS``, and the bare ``{still: b}`` scales of old runs.
There is one layout per version: no reader tries alternative names. HDF5 readers open files through
:func:`open_checked` (missing file, not HDF5, the format's checks: one InputError naming the file).
"""
from . import accumulator, merged_map, observations, scales, still_table
from ._header import check_header, open_checked, open_h5, write_header

__all__ = ["accumulator", "merged_map", "observations", "scales", "still_table", "check_header", "open_checked",
           "open_h5", "write_header"]
