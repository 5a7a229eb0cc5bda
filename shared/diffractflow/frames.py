"""Still or rotation frame? Which sweep? Read from a mini-CBF header without decoding the image.

The event-driven flows get one file per event; a rotation sweep arrives frame by frame and must be recognised as
one sweep as its frames land (seed 002: ``Angle_increment`` in the header tells a still, 0, from an oscillation
frame, > 0). Standard library only, so the orchestration can call it without loading DIALS; formats without a
mini-CBF header (NeXus masters, SMV, ...) come back as ``kind="unknown"`` and are routed by the stills-processor
itself (dxtbx).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

STILL = "still"
ROTATION = "rotation"
UNKNOWN = "unknown"

_FIELD = {
    "increment": re.compile(rb"#\s*Angle_increment\s+([-+0-9.eE]+)\s*deg"),
    "start": re.compile(rb"#\s*Start_angle\s+([-+0-9.eE]+)\s*deg"),
    "fast": re.compile(rb"X-Binary-Size-Fastest-Dimension:\s*(\d+)"),
    "slow": re.compile(rb"X-Binary-Size-Second-Dimension:\s*(\d+)"),
}
_NUMBER = re.compile(r"^(.*?)(\d+)(\.[A-Za-z][A-Za-z0-9]*(?:\.(?:bz2|gz|xz|zst))?)$")


@dataclass(frozen=True)
class FrameInfo:
    """What the header says about one image file."""

    path: str
    kind: str  # still / rotation / unknown
    sweep_key: str = ""  # equal for the frames of one sweep (directory, name template, size, oscillation width)
    frame_number: int | None = None  # from the file name's last run of digits
    start_angle_deg: float | None = None
    increment_deg: float | None = None

    def expected_start_deg(self, frame_number: int) -> float | None:
        """The start angle frame ``frame_number`` of this sweep must have (angles follow on frame by frame)."""
        if self.start_angle_deg is None or self.frame_number is None or self.increment_deg is None:
            return None
        return self.start_angle_deg + (frame_number - self.frame_number) * self.increment_deg

    def same_sweep(self, other: "FrameInfo", tol_deg: float = 1e-3) -> bool:
        """Same key and a start angle that follows from the frame numbers (two sweeps written under the same
        names in one directory are told apart)."""
        if self.kind != ROTATION or other.kind != ROTATION or self.sweep_key != other.sweep_key:
            return False
        exp = self.expected_start_deg(other.frame_number) if other.frame_number is not None else None
        return exp is None or other.start_angle_deg is None or abs(exp - other.start_angle_deg) <= tol_deg

    @property
    def sweep_id(self) -> str:
        """A short, file-system-safe name for the sweep: the template's stem plus a hash of the key."""
        stem = Path(self.sweep_key.split("|")[1] if "|" in self.sweep_key else "sweep").name
        stem = re.sub(r"[^A-Za-z0-9]+", "_", stem.split("#")[0]).strip("_") or "sweep"
        return f"{stem}_{hashlib.sha1(self.sweep_key.encode()).hexdigest()[:8]}"


def name_template(path: str | Path) -> tuple[str, int | None]:
    """(template with the last run of digits replaced by '#', that number) of a file name."""
    p = Path(path)
    m = _NUMBER.match(p.name)
    if not m:
        return str(p), None
    return str(p.parent / f"{m.group(1)}{'#' * len(m.group(2))}{m.group(3)}"), int(m.group(2))


def frame_info(path: str | Path, head_bytes: int = 16384) -> FrameInfo:
    """Still, rotation frame (with its sweep key, number and angles) or unknown, from the first kB of the file."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(head_bytes)
    except OSError:
        return FrameInfo(path, UNKNOWN)
    if not head.startswith(b"###CBF") and b"_array_data" not in head:
        return FrameInfo(path, UNKNOWN)
    vals = {k: (float(m.group(1)) if (m := rx.search(head)) else None) for k, rx in _FIELD.items()}
    inc = vals["increment"]
    if inc is None:
        return FrameInfo(path, UNKNOWN)
    if inc == 0:
        return FrameInfo(path, STILL, increment_deg=0.0, start_angle_deg=vals["start"])
    template, number = name_template(Path(path).resolve())
    size = f"{int(vals['fast'] or 0)}x{int(vals['slow'] or 0)}"
    return FrameInfo(path, ROTATION, f"rotation|{template}|{size}|{inc:.6f}", number, vals["start"], inc)
