"""Prefect flows. Each is a plain async function; behaviour (retries, names) comes from decorators.

Flows call stages only through the bus (``run_stage``), never import service code: the services
are separate processes (containers) and may be scaled independently.
"""
from __future__ import annotations

from typing import Any

from prefect import flow

from diffractflow.messages import DataEvent

from .diffuse import diffuse_on_end, diffuse_on_file
from .tasks import job_id_for, run_stage


@flow(name="echo-file", flow_run_name="echo-{run_id}-{path}")
async def echo_file_flow(path: str, run_id: str, message: str = "", fail_times: int = 0,
                         timeout: float = 60.0) -> dict[str, Any]:
    """The smallest real flow: one toy stage on one file (used by tests and to check a deployment)."""
    return await run_stage("echo", {"data": path}, {"message": message, "fail_times": fail_times},
                           run_id, job_id_for(run_id, "echo", path), timeout=timeout)


async def echo_on_file(ev: DataEvent) -> Any:
    return await echo_file_flow(ev.path, ev.run_id)


# name -> (per-file handler, end-of-run handler); the dispatcher looks flows up here.
FLOWS: dict[str, tuple] = {
    "echo": (echo_on_file, None),
    "diffuse-pipeline": (diffuse_on_file, diffuse_on_end),
}
