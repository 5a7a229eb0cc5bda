"""`stem-polar demo`: generated scan -> maps scored against the planted truth (what `make demo` runs)."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from stem_polar.cli import app


def test_demo_recovers_planted_field_and_domains(tmp_path):
    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--size", "24"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "demo/summary.json").read_text())
    assert s["corr_Ex_vs_planted"] >= 0.95 and s["corr_Ey_vs_planted"] >= 0.95
    assert s["cluster_map_match"] >= 0.95
    assert (tmp_path / "demo/result/figures/hsv_polarisation.png").is_file()
