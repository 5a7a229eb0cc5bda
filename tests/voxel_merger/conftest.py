"""Helpers shared by the voxel-merger tests."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from voxel_merger.cli import app


def _partials_through_cli(paths, tmp_path):
    """The stills' common grid (grid.json in tmp_path) and one partial accumulator per still, through the CLI."""
    runner = CliRunner()
    r = runner.invoke(app, ["grid", *map(str, paths), "--out", str(tmp_path / "grid.json")])
    assert r.exit_code == 0, r.output
    partials = []
    for i, p in enumerate(paths):
        part = tmp_path / f"part_{i}.h5"
        r = runner.invoke(app, ["accumulate", str(p), "--grid", str(tmp_path / "grid.json"), "--out", str(part)])
        assert r.exit_code == 0, r.output
        partials.append(part)
    return partials


@pytest.fixture
def cli_partials():
    """``cli_partials(paths, tmp_path)``: `voxel-merger grid` then `accumulate` per still; the partials' paths."""
    return _partials_through_cli
