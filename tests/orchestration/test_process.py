"""`process`'s own choices, without a topology: how many still flows run at once, and the run page's head start."""
from __future__ import annotations

import asyncio
import json
import sys

from orchestration.process import flows_in_flight, prepare_report, warm_up_report


def _state(n_index: int) -> dict:
    return {"services": [{"service": "stills-processor", "replica": i} for i in range(n_index)]
            + [{"service": "diffuse-extractor", "replica": 0}, {"service": "voxel-merger", "replica": 0}]}


def test_flows_in_flight_keep_every_index_worker_fed():
    """More flows than index workers (a flow also holds its slot through extraction and accumulation), growing with
    the replicas; never fewer than the dispatcher's default."""
    assert flows_in_flight({}) == 8
    for n in (1, 2, 3, 8):
        assert flows_in_flight(_state(n)) >= max(8, 3 * n)
    assert flows_in_flight(_state(8)) > flows_in_flight(_state(2))


def test_report_warm_up_loads_what_the_run_page_needs():
    warm_up_report()
    assert "matplotlib.pyplot" in sys.modules and "diffractflow.formats.still_table" in sys.modules


def test_report_head_start_waits_for_every_still_record_then_draws_the_still_figures(tmp_path):
    """prepare_report: the per-still figures are drawn only once every still has its record (then the end-of-run
    stages run and the command only waits)."""
    from orchestration import report

    rdir = tmp_path / "volume" / "runs" / "r"
    (rdir / "stills").mkdir(parents=True)
    (rdir / "config.json").write_text("{}")

    def record(i):
        (rdir / "stills" / f"s{i}.json").write_text(json.dumps(
            {"image": f"incoming/r/s{i}.cbf", "status": "ok", "stage_seconds": {"stills-processor": 1.0 + i}}))

    record(0)
    report._STILL_FIGURES.clear()

    async def run():
        task = asyncio.create_task(prepare_report(rdir, 2, delay_s=0.0, poll_s=0.05))
        await asyncio.sleep(1.0)
        assert not task.done() and not report._STILL_FIGURES  # one record of two: nothing drawn yet
        record(1)
        return await asyncio.wait_for(task, timeout=30)

    assert asyncio.run(run()) is True
    assert [key[0] for key in report._STILL_FIGURES] == ["timings"]
    assert [len(key) for key in report._STILL_FIGURES] == [3]  # both stills
