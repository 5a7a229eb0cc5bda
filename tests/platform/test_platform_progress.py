"""The progress display's counts come from the volume (finished stage jobs, per-still records), and the flow
logs go to a file instead of the screen."""
from __future__ import annotations

import json
import logging

from orchestration.progress import count_done, failures, logs_to_file


def test_counts_and_failures_from_the_volume(tmp_path):
    vol = tmp_path
    for service, stage, n in (("stills-processor", "index", 3), ("stills-processor", "frame-model", 2),
                              ("diffuse-extractor", "extract", 4), ("voxel-merger", "accumulate", 1)):
        for i in range(n):
            d = vol / "jobs" / service / f"run1.{stage}.{'f' if stage == 'frame-model' else 's'}{i}-abc"
            d.mkdir(parents=True)
            (d / "manifest.json").write_text("{}")
    for stage in ("extract.sv", "accumulate.sv"):  # a sweep frame re-extracted at the end counts once
        d = vol / "jobs" / ("diffuse-extractor" if stage.startswith("extract") else "voxel-merger") / f"run1.{stage}.s0-def"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
    unfinished = vol / "jobs" / "voxel-merger" / "run1.accumulate.s9-abc"
    unfinished.mkdir(parents=True)  # no manifest: still running
    other_run = vol / "jobs" / "diffuse-extractor" / "run2.extract.s0-abc"
    other_run.mkdir(parents=True)
    (other_run / "manifest.json").write_text("{}")
    assert count_done(vol, "run1") == {"indexed": 5, "extracted": 4, "accumulated": 1}
    st = vol / "runs" / "run1" / "stills"
    st.mkdir(parents=True)
    (st / "a.json").write_text(json.dumps({"image": "incoming/run1/a.cbf", "status": "ok"}))
    (st / "b.json").write_text(json.dumps({"image": "incoming/run1/b.cbf", "status": "not_indexed",
                                           "reason": "too few spots"}))
    assert failures(vol, "run1") == {"b.cbf": "not_indexed: too few spots"}


def test_prefect_log_lines_go_to_the_file(tmp_path, capsys):
    log = tmp_path / "logs" / "flows.log"
    with logs_to_file(log):
        logging.getLogger("prefect.task_runs").warning("Task run 'x' - Finished")
    assert "Task run 'x'" in log.read_text()
    assert "Task run 'x'" not in capsys.readouterr().out
