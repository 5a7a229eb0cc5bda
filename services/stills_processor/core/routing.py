"""Routing: which inputs are true stills and which form rotation sequences.

A CBF's header says it directly (``# Angle_increment 0.0000 deg.`` for a still, > 0 for an
oscillation image); it is read from the first few kB without decoding the image. Other formats
(NeXus/HDF5 masters, SMV, full CBF without a mini-header, ...) are asked through dxtbx: a still if
the imageset has no scan or a zero oscillation width. Each still image becomes one work unit
(multi-image still files give one unit per frame); oscillation files are grouped into sequences by
dxtbx (same template, consecutive images) and each sequence is one unit. A file that cannot be
routed becomes an ``unreadable`` unit carrying the reason, so the others still run.

For files arriving one at a time, :func:`frame_info` says what one file is (still or rotation frame),
which sweep a rotation frame belongs to (``sweep_key``), its frame number and angles, so frames can be
grouped into sweeps as they land.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

# dxtbx and DIALS are imported inside the functions that use them: they take ~3 s (dxtbx) to ~4 s (DIALS'
# programs) to import, which `stills-processor --help`, `show` and parameter checks should not pay; the
# worker's pool imports them once per process before any image (batch.warm_up, run by _preload.py).

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
    # dxtbx (~2 s) only for files the name and header rules cannot route: the CLI imports this module
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
    # dxtbx only when sequences are grouped (see _dxtbx_width_and_frames)
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


# ------------------------------------------------------------------- frames arriving one by one
ROTATION = SEQUENCE  # a frame of a rotation sweep (kind of FrameInfo)

_HEADER_FLOAT = {
    "start_angle": re.compile(rb"#\s*Start_angle\s+([-+0-9.eE]+)\s*deg"),
    "increment": _ANGLE_INCREMENT,
    "fast": re.compile(rb"X-Binary-Size-Fastest-Dimension:\s*(\d+)"),
    "slow": re.compile(rb"X-Binary-Size-Second-Dimension:\s*(\d+)"),
}
_DETECTOR_LINE = re.compile(rb"#\s*Detector:\s*([^\r\n]*)")
_FRAME_NUMBER = re.compile(r"(\d+)(?!.*\d)")  # the last group of digits of a file name


@dataclass(frozen=True)
class FrameInfo:
    """What an arriving image file is, read from its header without decoding the pixels.

    ``kind``: still / sequence (a frame of a rotation sweep) / unreadable (``error`` says why).
    ``sweep_key``: equal for the frames of one sweep (directory + file-name template with the frame
    number replaced by ``#``, detector, image size in pixels, oscillation width); None for stills and
    unreadable files. ``frame_number``: from the file name (dxtbx's image number). Angles in degrees.
    """

    kind: str
    sweep_key: str | None
    frame_number: int
    start_angle_deg: float
    increment_deg: float
    error: str = ""

    def expected_start_deg(self, frame_number: int) -> float:
        """Start angle (deg) that frame ``frame_number`` of this sweep must have."""
        return self.start_angle_deg + (frame_number - self.frame_number) * self.increment_deg

    def same_sweep(self, other: "FrameInfo", tol_fraction: float = 0.01) -> bool:
        """True if ``other`` is a frame of this sweep: same key, and its start angle is where this
        frame's angle and increment put its frame number (within ``tol_fraction`` of a width)."""
        if self.kind != SEQUENCE or other.kind != SEQUENCE or self.sweep_key != other.sweep_key:
            return False
        return abs(other.start_angle_deg - self.expected_start_deg(other.frame_number)) <= \
            tol_fraction * abs(self.increment_deg)


_COMPRESSED = (".bz2", ".gz", ".xz", ".zst")


def _template(path: Path) -> tuple[str, int]:
    """(directory/template with the last digit group of the file name's stem as '#'s, that number;
    -1 if none). The extension (and a compression suffix) is not searched: ``x_0001.cbf.bz2`` -> 1."""
    name = path.name
    stem_end = len(name)
    for suffix in _COMPRESSED:
        if name[:stem_end].endswith(suffix):
            stem_end -= len(suffix)
            break
    dot = name.rfind(".", 0, stem_end)
    stem_end = dot if dot > 0 else stem_end
    m = _FRAME_NUMBER.search(name[:stem_end])
    if not m:
        return str(path), -1
    return str(path.parent / (name[: m.start()] + "#" * len(m.group(1)) + name[m.end():])), int(m.group(1))


def _cbf_frame_info(path: Path, head: bytes) -> FrameInfo | None:
    vals = {k: rx.search(head) for k, rx in _HEADER_FLOAT.items()}
    if vals["increment"] is None:
        return None
    inc = float(vals["increment"].group(1))
    start = float(vals["start_angle"].group(1)) if vals["start_angle"] else 0.0
    template, number = _template(path)
    if inc == 0:
        return FrameInfo(STILL, None, number, start, 0.0)
    if vals["start_angle"] is None or vals["fast"] is None or vals["slow"] is None:
        return None  # an unusual mini-header: let dxtbx decide
    det = _DETECTOR_LINE.search(head)
    det_name = det.group(1).decode(errors="replace").strip() if det else ""
    key = f"{template}|{det_name}|{int(vals['fast'].group(1))}x{int(vals['slow'].group(1))}|{inc:.6g}"
    return FrameInfo(SEQUENCE, key, number, start, inc)


def _dxtbx_frame_info(path: Path) -> FrameInfo:
    # dxtbx (see _dxtbx_width_and_frames)
    from dxtbx.model.experiment_list import ExperimentListFactory

    el = ExperimentListFactory.from_filenames([str(path)])
    if len(el) == 0:
        raise ValueError("not an image format dxtbx understands")
    e = el[0]
    scan = e.scan
    if scan is None or scan.get_oscillation()[1] == 0:
        start = float(scan.get_oscillation()[0]) if scan is not None else 0.0
        return FrameInfo(STILL, None, _template(path)[1], start, 0.0)
    start, inc = (float(v) for v in scan.get_oscillation())
    number = int(scan.get_image_range()[0])
    template = e.imageset.get_template() if hasattr(e.imageset, "get_template") else str(path)
    det = e.detector
    sizes = ",".join("x".join(str(v) for v in p.get_image_size()) for p in det)
    name = det[0].get_name() if len(det) else ""
    return FrameInfo(SEQUENCE, f"{template}|{name}|{sizes}|{inc:.6g}", number, start, inc)


def frame_info(path: str | Path, head_bytes: int = 16384) -> FrameInfo:
    """Kind, sweep key, frame number and angles of one arriving image file (never raises).

    Mini-CBF files are read from their first ``head_bytes`` (Start_angle, Angle_increment, Detector and
    the binary section's dimensions); other formats through dxtbx (the first image of the file).
    """
    p = Path(path)
    try:
        if not p.is_file():
            return FrameInfo(UNREADABLE, None, -1, math.nan, math.nan, f"{path}: no such file")
        if p.stat().st_size == 0:
            return FrameInfo(UNREADABLE, None, -1, math.nan, math.nan, f"{path}: empty file")
        with open(p, "rb") as f:
            head = f.read(head_bytes)
        info = None
        if head.startswith(b"###CBF") or b"_array_data" in head:
            info = _cbf_frame_info(p.resolve(), head)
        return info if info is not None else _dxtbx_frame_info(p.resolve())
    except Exception as exc:
        return FrameInfo(UNREADABLE, None, -1, math.nan, math.nan,
                         f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})")
