"""`diffractflow gc`: remove job outputs that no run references any more.

Jobs are content-addressed (``orchestration.tasks.content_addressed``): a re-run after a config change writes new
job directories beside the old ones, and the run's records (``runs/<run>/**/*.json``) point at the current ones.
A job directory is kept when any run record names a file in it, or when it changed within ``min_age_s`` (a run
still collecting may not have recorded it yet); everything else under ``jobs/`` is removed.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def referenced_job_dirs(volume: Path) -> set[Path]:
    """Job directories (``jobs/<service>/<job id>``) named by any run record under ``runs/``."""
    keep: set[Path] = set()
    for rec in (volume / "runs").rglob("*.json") if (volume / "runs").is_dir() else []:
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        for s in _strings(data):
            parts = Path(s).parts
            if len(parts) >= 3 and parts[0] == "jobs":
                keep.add(volume / parts[0] / parts[1] / parts[2])
    return keep


def _newest_mtime(d: Path) -> float:
    return max([d.stat().st_mtime, *(p.stat().st_mtime for p in d.rglob("*") if p.exists())])


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)
    kept_referenced: int = 0
    kept_recent: int = 0
    bytes_freed: int = 0


def collect(volume: Path, *, dry_run: bool = False, min_age_s: float = 3600.0) -> GcReport:
    """Remove (or with ``dry_run`` only list) unreferenced job directories older than ``min_age_s``."""
    volume = Path(volume)
    keep = referenced_job_dirs(volume)
    rep = GcReport()
    now = time.time()
    jobs = volume / "jobs"
    for service in sorted(jobs.iterdir()) if jobs.is_dir() else []:
        if not service.is_dir():
            continue
        for d in sorted(service.iterdir()):
            if not d.is_dir():
                continue
            if d in keep:
                rep.kept_referenced += 1
                continue
            if now - _newest_mtime(d) < min_age_s:
                rep.kept_recent += 1
                continue
            rep.bytes_freed += sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            rep.removed.append(str(d.relative_to(volume)))
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)
    return rep
