"""One quiet progress display for a diffuse run, and the logs to files.

What a user watching `diffractflow process diffuse` (or the demo) wants to see is how far the run is: how many
stills have landed, been indexed, extracted and accumulated, which failed and why, and when it will be done.
Prefect's INFO lines (hundreds per run) go to ``<home>/logs/flows.log`` instead; ``-v`` keeps them live.

The counts come from the volume, so they are right whichever process does the work: a finished stage job leaves a
manifest in ``jobs/<service>/<run>.<stage>.<still>-<key>/``, a finished still a record in ``runs/<run>/stills/``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: stage label -> (service, job-id stage) of the per-still jobs counted
STAGES = {"indexed": ("stills-processor", ("index", "frame-model")),
          "extracted": ("diffuse-extractor", ("extract",)),
          "accumulated": ("voxel-merger", ("accumulate",))}


def count_done(volume: Path, run_id: str) -> dict[str, int]:
    """Stills of the run through each stage (finished jobs' manifests on the volume; a still counts once, also
    when a sweep frame was re-extracted with the scan-varying model)."""
    out = {}
    for label, (service, stages) in STAGES.items():
        stills = set()
        for stage in stages:
            prefix = f"{run_id}.{stage}."
            for m in (volume / "jobs" / service).glob(f"{prefix}*/manifest.json"):
                key = m.parent.name[len(prefix):].rsplit("-", 1)[0]  # <still>-<content key>, or sv.<still>-<key>
                stills.add(key[3:] if key.startswith("sv.") else key)
        out[label] = len(stills)
    return out


def failures(volume: Path, run_id: str) -> dict[str, str]:
    """Stills that finished without being merged: file name -> status and reason."""
    out = {}
    for p in sorted((volume / "runs" / run_id / "stills").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("status") != "ok":
            out[Path(rec.get("image", p.stem)).name] = f"{rec.get('status')}: {rec.get('reason', '')}"[:160]
    return out


class RunProgress:
    """A rich progress line for one run, refreshed from the volume every ``interval_s`` while ``landed`` grows."""

    def __init__(self, console, volume: Path, run_id: str, total: int | None, interval_s: float = 0.5,
                 landed_fn=None):
        self.volume, self.run_id, self.total, self.interval_s = Path(volume), run_id, total, interval_s
        self.landed = 0
        self.landed_fn = landed_fn  # () -> files landed so far (a watcher counts them on disk)
        self.console = console
        self._shown_failures: set[str] = set()
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[counts]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                                 transient=False)
        self.task = self.progress.add_task(run_id, total=total, counts="")
        self._stop = asyncio.Event()

    def refresh(self) -> None:
        c = count_done(self.volume, self.run_id)
        fails = failures(self.volume, self.run_id)
        for name, reason in fails.items():
            if name not in self._shown_failures:
                self._shown_failures.add(name)
                self.progress.console.print(f"[yellow]{name}[/yellow] not merged: {reason}")
        if self.landed_fn is not None:
            self.landed = self.landed_fn()
        done = c["accumulated"] + len(fails)
        if self.total:
            done = min(self.total, done)
        counts = (f"landed {self.landed}/{self.total or '?'} · indexed {c['indexed']} · extracted {c['extracted']} · "
                  f"accumulated {c['accumulated']} · failed {len(fails)}")
        self.progress.update(self.task, completed=done, counts=counts)

    async def run(self) -> None:
        with self.progress:
            while not self._stop.is_set():
                self.refresh()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
            self.refresh()

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def logs_to_file(path: Path, verbose: bool = False):
    """Route Prefect's and the platform's console log lines to ``path`` (unless ``verbose``): the screen keeps the
    progress display and warnings of our own; everything is in the file."""
    if verbose:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    changed: list[tuple[logging.Logger, logging.Handler]] = []
    added: list[logging.Logger] = []
    # prefect (~1 s) only when flows log: the CLI's --help imports this module
    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect's own configuration first (it is set up lazily), then its console handlers are replaced

    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                                       if n.startswith(("prefect", "diffractflow", "orchestration", "httpx"))]
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                    and getattr(h, "stream", None) in (sys.stdout, sys.stderr) or type(h).__name__ == "PrefectConsoleHandler":
                lg.removeHandler(h)
                changed.append((lg, h))
                if lg not in added:
                    lg.addHandler(fh)
                    added.append(lg)
    try:
        yield path
    finally:
        for lg in added:
            lg.removeHandler(fh)
        for lg, h in changed:
            lg.addHandler(h)
        fh.close()
