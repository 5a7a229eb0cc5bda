"""A toy stage (``echo``) that exercises the runtime end to end: tests and bus benchmarks use it.

It copies its input's hash and its parameters into ``echo.json``; it can sleep, fail a given
number of times (counted on the volume, so it survives a killed worker) or reject its input.
Run it as a worker with ``python -m diffractflow.toy``.
"""
from __future__ import annotations

import json
import time

from pydantic import BaseModel, Field

from .artifacts import atomic_write_json, atomic_write_path, sha256_file
from .runtime import BadInput, JobContext, Stage, serve_stage


class EchoParams(BaseModel):
    message: str = Field("", max_length=10_000)
    sleep_s: float = Field(0.0, ge=0, le=3600)
    fail_times: int = Field(0, ge=0, le=100, description="fail this many executions before succeeding")
    write_output: bool = True
    output_bytes: int = Field(0, ge=0, le=1 << 30, description="also write a blob.bin of this size")


def handle_echo(ctx: JobContext, params: EchoParams) -> None:
    if params.fail_times:
        counter = ctx.volume.root / ".toy-failures" / ctx.job.job_id  # outside the job dir, which a failure clears
        counter.parent.mkdir(exist_ok=True)
        n = int(counter.read_text()) if counter.exists() else 0
        if n < params.fail_times:
            counter.write_text(str(n + 1))
            raise RuntimeError(f"planned failure {n + 1} of {params.fail_times}")
    inputs = {}
    for name in ctx.job.inputs:
        p = ctx.input_path(name)
        if p.stat().st_size == 0:
            raise BadInput(f"input {name!r} ({ctx.job.inputs[name].path}) is empty")
        inputs[name] = sha256_file(p)
    t_end = time.monotonic() + params.sleep_s
    while time.monotonic() < t_end:
        time.sleep(min(0.05, max(t_end - time.monotonic(), 0)))
        ctx.heartbeat()
    ctx.metrics["n_inputs"] = len(inputs)
    if params.write_output:
        out = ctx.out_dir / "echo.json"
        atomic_write_json(out, {"job_id": ctx.job.job_id, "message": params.message, "inputs": inputs})
        ctx.add_output("echo", out)
    if params.output_bytes:
        blob = ctx.out_dir / "blob.bin"
        with atomic_write_path(blob) as tmp:
            with open(tmp, "wb") as f:
                left = params.output_bytes
                while left > 0:
                    n = min(left, 1 << 20)
                    f.write(b"\0" * n)
                    left -= n
        ctx.add_output("blob", blob)


STAGE = Stage(service="echo", params_model=EchoParams, handler=handle_echo)

if __name__ == "__main__":
    serve_stage(STAGE)
