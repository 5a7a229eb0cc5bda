"""benchmarks/harness.py measures what it says: CPU against wall time, a planted allocation in the peak RSS, a child's
CPU seconds, and writes the JSON where the benchmarks' results live."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    # the benchmarks run as scripts with benchmarks/ on sys.path; here the module is loaded from its file
    spec = importlib.util.spec_from_file_location("benchmarks_harness", REPO / "benchmarks" / "harness.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_clock_separates_cpu_from_wall_and_counts_children(harness):
    with harness.Clock() as idle:
        time.sleep(0.3)
    assert idle.wall_s >= 0.3 and idle.cpu_s < 0.1          # sleeping costs no CPU
    with harness.Clock() as busy:
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
    assert busy.cpu_s >= 0.3 and busy.wall_s >= busy.cpu_s * 0.99
    with harness.Clock() as child:
        subprocess.run([sys.executable, "-c", "import time\nt=time.process_time()+0.4\nwhile time.process_time()<t: pass"],
                       check=True)
    assert child.children_cpu_s >= 0.4 and child.cpu_s < 0.2  # the child's CPU, not this process's
    c = harness.Clock().start()
    time.sleep(0.1)
    cpu, wall = c.lap()
    assert wall >= 0.1 and cpu < 0.05
    assert c.lap()[1] < 0.05                                   # a lap starts where the previous ended


def test_peak_rss_sees_a_planted_allocation(harness):
    n = 300 * 2**20
    with harness.PeakRSS(interval=0.005) as mem:
        a = np.ones(n, dtype=np.uint8)                        # touched: resident
        time.sleep(0.05)
        del a
    assert mem.peak - mem.start >= 0.9 * n
    assert harness.max_rss_bytes() >= mem.peak * 0.99          # the kernel's high-water mark agrees


def test_results_written_as_json_where_named(harness, tmp_path):
    assert harness.result_path("bus") == REPO / "benchmarks" / "results" / "bus.json"
    p = harness.write_results(tmp_path / "x.json", {"a": np.float64(1.5), "b": [1, 2]})
    assert json.loads(p.read_text()) == {"a": 1.5, "b": [1, 2]}
    assert harness.read_results(p) == {"a": 1.5, "b": [1, 2]}
    assert harness.read_results(tmp_path / "none.json", {"runs": []}) == {"runs": []}
    la = harness.load_average(2)
    assert len(la) == 3 and all(x >= 0 for x in la)
    assert harness.machine()["cpu_count"] >= 1
