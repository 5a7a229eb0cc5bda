"""Bus handler for stem-polar: the same pipeline as ``stem-polar run``, inputs/outputs on the shared volume.

Inputs: ``data`` (required), ``labels`` (optional: PCA + k-means when absent), ``reference`` (optional vacuum
scan for descan correction), ``config`` (optional YAML; ``params.config`` overrides it key by key).
Outputs: every file of the seed's layout plus ``polar_maps.h5`` (all maps, provenance).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffractflow.report_page import write_job_report
from diffractflow.runtime import BadInput, JobContext, Stage

from . import __version__
from .artifacts import DataError, write_h5_summary, write_outputs
from .core import kernels
from .core.config import PolarConfig, load_config
from .core.pipeline import InputError
from .core.xp import DeviceError
from .pipeline import run_files


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dset: Optional[str] = Field(None, description="HDF5 dataset path of the patterns")
    reference_dset: Optional[str] = None
    scan_shape: Optional[tuple[int, int]] = Field(None, description="scan H W (needed for 3-D data)")
    chunks: Optional[int] = Field(None, ge=1, le=1_000_000, description="frames per streamed chunk")
    center: Optional[tuple[float, float]] = Field(None, description="beam centre y x (detector px)")
    config: dict[str, Any] = Field(default_factory=dict, description="config sections as in config.yaml")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu or cuda:N (CuPy)")

    @field_validator("config")
    @classmethod
    def _valid_config(cls, v):
        PolarConfig.model_validate(v)  # bad keys/values reject the job before any work
        return v


def handle(ctx: JobContext, params: Params) -> None:
    inputs = ctx.job.inputs
    try:
        cfg = load_config(ctx.input_path("config") if "config" in inputs else None, params.config)
    except (ValueError, FileNotFoundError) as exc:
        raise BadInput(f"config: {exc}") from exc
    if params.center is not None:
        cfg.calibration.center_y, cfg.calibration.center_x = params.center
    last = [0.0]

    def progress(stage, done, total):  # heartbeat at most every 2 s while chunks stream
        now = time.monotonic()
        if now - last[0] > 2.0:
            last[0] = now
            ctx.heartbeat()

    try:
        done = run_files(ctx.input_path("data"), cfg, dset=params.dset, scan_shape=params.scan_shape,
                         labels=ctx.input_path("labels") if "labels" in inputs else None,
                         reference=ctx.input_path("reference") if "reference" in inputs else None,
                         reference_dset=params.reference_dset, device=params.device, chunks=params.chunks,
                         progress=progress)
    except (DataError, InputError, DeviceError) as exc:
        raise BadInput(str(exc)) from exc
    res, pipe = done.result, done.pipeline
    hashes = {name: (ref_.sha256 or "") for name, ref_ in inputs.items()}
    run_info = {"service": "stem-polar", "version": __version__, "job_id": ctx.job.job_id,
                "inputs": {n: r.path for n, r in inputs.items()}, "input_sha256": hashes,
                "data_gb": done.data_bytes / 1e9}
    written = write_outputs(res, ctx.out_dir, pipe.cfg, run_info)
    h5 = write_h5_summary(res, ctx.out_dir / "polar_maps.h5", pipe.cfg, job_id=ctx.job.job_id, inputs=hashes)
    ctx.add_output("polar_maps", h5)
    for name, p in written.items():
        ctx.add_output(name, p)
    ctx.add_output("report", write_job_report(ctx.out_dir))  # the job's page for a browser (report.html)
    r = res.report
    ctx.metrics.update({
        "n_frames": r["n_frames"], "scan_shape": r["scan_shape"], "clusters": res.cluster_ids,
        "skipped_clusters": [s["id"] for s in r["clusters"]["skipped"]],
        "mean_confidence": r["confidence"]["mean"], "center_yx": [res.center.cy, res.center.cx],
        "seconds": res.timings.get("total_after_sample"), "n_warnings": len(res.warnings),
    })


def warm_up() -> None:
    """Build or load the compiled pass kernels for uint16 frames once, when the worker starts (``serve``)."""
    kernels.warmup(np.uint16)


STAGE = Stage(service="stem-polar", params_model=Params, handler=handle, version=__version__, warm_up=warm_up)
