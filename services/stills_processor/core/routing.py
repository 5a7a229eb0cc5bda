"""Routing: which inputs are true stills and which form rotation sequences.

A CBF's header says it directly (``# Angle_increment 0.0000 deg.`` for a still, > 0 for an
oscillation image); it is read from the first few kB without decoding the image. Other formats
(NeXus/HDF5 masters, SMV, full CBF without a mini-header, ...) are asked through dxtbx: a still if
the imageset has no scan or a zero oscillation width. Each still image becomes one work unit
(multi-image still files give one unit per frame); oscillation files are grouped into sequences by
dxtbx (same template, consecutive images) and each sequence is one unit. A file that cannot be
routed becomes an ``unreadable`` unit carrying the reason, so the others still run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

STILL = "still"
SEQUENCE = "sequence"
UNREADABLE = "unreadable"

_ANGLE_INCREMENT = re.compile(rb"#\s*Angle_increment\s+([-+0-9.eE]+)\s*deg")


@dataclass(frozen=True)
class WorkUnit:
    """One thing to process: a still (file + frame), a sequence (files), or an unreadable input."""

    kind: str
    paths: tuple[str, ...]
    name: str  # output stem: <name>.expt / <name>.refl
    frame: int = 0
    error: str = ""


def cbf_angle_increment(path: str | Path, head_bytes: int = 16384) -> float | None:
    """Oscillation width (deg) from a mini-CBF header, or None if the header has none."""
    with open(path, "rb") as f:
        head = f.read(head_bytes)
    if not head.startswith(b"###CBF") and b"_array_data" not in head:
        return None
    m = _ANGLE_INCREMENT.search(head)
    return float(m.group(1)) if m else None


def _dxtbx_width_and_frames(path: str) -> tuple[float, int]:
    """Oscillation width (deg, 0 for stills) and number of images of a file, through dxtbx."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    expts = ExperimentListFactory.from_filenames([path], load_models=False)
    if len(expts) == 0:
        raise ValueError("not an image format dxtbx understands")
    widths, n = [], 0
    for iset in {id(e.imageset): e.imageset for e in expts}.values():
        scan = iset.get_scan() if hasattr(iset, "get_scan") else None
        widths.append(0.0 if scan is None else float(scan.get_oscillation()[1]))
        n += len(iset)
    return max(widths), n


def classify(path: str) -> tuple[str, int, str]:
    """(kind, n_frames, error) for one file; kind is still / sequence / unreadable."""
    p = Path(path)
    if not p.is_file():
        return UNREADABLE, 0, f"{path}: no such file"
    if p.stat().st_size == 0:
        return UNREADABLE, 0, f"{path}: empty file"
    try:
        width = cbf_angle_increment(p)
        if width is not None:
            return (SEQUENCE if width > 0 else STILL), 1, ""
        width, n = _dxtbx_width_and_frames(str(p))
        return (SEQUENCE if width > 0 else STILL), n, ""
    except Exception as exc:
        return UNREADABLE, 0, f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})"


def _unique_names(units: list[WorkUnit]) -> list[WorkUnit]:
    """Make output stems unique (two inputs with the same file name in different folders)."""
    seen: dict[str, int] = {}
    out = []
    for u in units:
        n = seen.get(u.name, 0)
        seen[u.name] = n + 1
        out.append(u if n == 0 else WorkUnit(u.kind, u.paths, f"{u.name}_{n}", u.frame, u.error))
    return out


def plan(paths: Iterable[str | Path]) -> list[WorkUnit]:
    """Split inputs into work units (stills per frame, sequences grouped by dxtbx), input order kept."""
    units: list[WorkUnit] = []
    seq_files: list[str] = []
    for raw in paths:
        path = str(Path(raw).resolve()) if Path(raw).exists() else str(raw)
        kind, n, err = classify(path)
        stem = Path(path).name.split(".")[0] or Path(path).name
        if kind == UNREADABLE:
            units.append(WorkUnit(UNREADABLE, (path,), stem, 0, err))
        elif kind == STILL:
            if n <= 1:
                units.append(WorkUnit(STILL, (path,), stem, 0))
            else:
                units.extend(WorkUnit(STILL, (path,), f"{stem}_{i:05d}", i) for i in range(n))
        else:
            seq_files.append(path)
    if seq_files:
        units.extend(group_sequences(seq_files))
    return _unique_names(units)


def group_sequences(files: list[str]) -> list[WorkUnit]:
    """Group oscillation images into rotation sequences with dxtbx (template + consecutive numbers)."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    units = []
    try:
        expts = ExperimentListFactory.from_filenames(files, load_models=False)
    except Exception as exc:
        return [WorkUnit(UNREADABLE, (f,), Path(f).name.split(".")[0], 0,
                         f"{f}: cannot be grouped into a sequence ({type(exc).__name__}: {exc})") for f in files]
    grouped = set()
    for iset in {id(e.imageset): e.imageset for e in expts}.values():
        members = tuple(str(Path(iset.get_path(i)).resolve()) for i in range(len(iset)))
        grouped.update(members)
        template = Path(members[0]).name.split(".")[0].rstrip("0123456789").rstrip("_-") or "sequence"
        units.append(WorkUnit(SEQUENCE, members, f"{template}_seq{len(units) + 1}"))
    for f in files:
        if str(Path(f).resolve()) not in grouped:
            units.append(WorkUnit(UNREADABLE, (f,), Path(f).name.split(".")[0], 0, f"{f}: dxtbx did not read it"))
    return units
