"""When a rotation sweep counts as complete on disk (orchestration.sweep.sweep_complete): then it is refined
scan-varying once and each frame extracted once; otherwise the live path (scan-static first, re-extraction at the
end) is taken."""
from __future__ import annotations

from pathlib import Path

from orchestration.diffuse import DiffuseRunConfig
from orchestration.sweep import sweep_complete


def _frames(n):
    return [Path(f"sweep_{i:04d}.cbf") for i in range(1, n + 1)]


def test_all_expected_frames_of_the_run_on_disk_is_complete():
    cfg = DiffuseRunConfig(unit_cell=[40, 40, 60, 90, 90, 90], expected_stills=12)
    assert sweep_complete(cfg, _frames(12))


def test_a_sweep_still_landing_or_a_run_with_stills_too_takes_the_live_path():
    cfg = DiffuseRunConfig(unit_cell=[40, 40, 60, 90, 90, 90], expected_stills=12)
    assert not sweep_complete(cfg, _frames(11))       # frames still to come, or stills in the same run
    assert not sweep_complete(DiffuseRunConfig(unit_cell=[40, 40, 60, 90, 90, 90]), _frames(12))  # count unknown
    off = DiffuseRunConfig(unit_cell=[40, 40, 60, 90, 90, 90], expected_stills=12, sweep_scan_varying=False)
    assert not sweep_complete(off, _frames(12))        # no scan-varying model asked for
    one = DiffuseRunConfig(unit_cell=[40, 40, 60, 90, 90, 90], expected_stills=1)
    assert not sweep_complete(one, _frames(1))         # one frame: nothing to refine scan-varying
