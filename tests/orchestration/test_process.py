"""`process`'s own choices, without a topology: how many still flows run at once, and the run page's warm-up."""
from __future__ import annotations

import sys

from orchestration.process import flows_in_flight, warm_up_report


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
