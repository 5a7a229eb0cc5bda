"""Files in, results out: the open -> labels -> run -> close steps that ``stem-polar run`` and the bus worker share.

Both front ends call :func:`run_files` and then write the outputs (``artifacts.write_outputs``); they differ only in
how they report errors (exit code / rejected job) and progress (bars / heartbeats), and the CLI's interactive
calibration, which runs in the ``before_run`` hook between the centre detection and the passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .artifacts import DataError, load_labels, open_source
from .core.config import PolarConfig
from .core.pipeline import PolarPipeline, PolarResult


@dataclass
class FilesRun:
    """What a run from files gives the front ends: the result, the pipeline (its ``cfg`` is the configuration
    actually used, including interactive calibration) and the size of the data read (bytes)."""

    result: PolarResult
    pipeline: PolarPipeline
    data_bytes: int


def run_files(data: Path, cfg: PolarConfig, *, dset: Optional[str] = None, scan_shape=None,
              labels: Optional[Path] = None, reference: Optional[Path] = None, reference_dset: Optional[str] = None,
              device: str = "cpu", chunks: Optional[int] = None, threads: Optional[int] = None,
              progress: Optional[Callable[[str, int, int], None]] = None,
              before_run: Optional[Callable[[PolarPipeline], None]] = None) -> FilesRun:
    """Open the data (and reference) file, load the labels, detect the centre, call ``before_run(pipeline)``,
    run both passes and close the files (also on errors).

    Raises ``DataError`` naming the file for unreadable inputs or a label count that does not match the scan,
    ``InputError`` / ``DeviceError`` from the pipeline for bad settings.
    """
    src = ref = None
    try:
        src = open_source(data, dset, scan_shape)
        lab, declared = load_labels(labels) if labels is not None else (None, None)
        n_scan = int(np.prod(src.scan_shape))
        if lab is not None and lab.size != n_scan:  # name the file: the core only knows the array
            raise DataError(f"{labels}: labels have {lab.size} entries, expected {n_scan} (one per scan position, "
                            f"H*W = {' * '.join(map(str, src.scan_shape))})")
        if reference is not None:
            ref = open_source(reference, reference_dset or dset, src.scan_shape)
        pipe = PolarPipeline(src, lab, cfg, device=device, chunk=chunks, reference=ref, declared_ids=declared,
                             progress=progress, threads=threads)
        pipe.prepare()
        if before_run is not None:
            before_run(pipe)
        res = pipe.run()
    finally:
        for s in (src, ref):
            if s is not None and hasattr(s, "close"):
                s.close()
    nbytes = src.n_frames * src.frame_shape[0] * src.frame_shape[1] * src.dtype.itemsize
    return FilesRun(res, pipe, int(nbytes))
