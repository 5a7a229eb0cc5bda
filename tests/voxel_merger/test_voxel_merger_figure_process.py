"""The merged map's figures: drawn from planes taken from the merge's store (before the map is written), they show
what the written map holds; drawn by the service's figure process, they are the same files as drawn in process,
and a figure process that died costs nothing but the overlap."""
import os
import signal

import h5py
import numpy as np
import pytest

from diffractflow import figure_process
from voxel_merger.artifacts import map_planes, read_map, write_slice_pngs, write_still
from voxel_merger.core.grid import CrystalModel, GlobalGrid
from voxel_merger.pipeline import MergeOptions, accumulate_one, merge_partials

CELL = (30.0, 30.0, 40.0, 90.0, 90.0, 90.0)
PNGS = ("slice_h0.png", "slice_k0.png", "slice_l0.png", "radial_profile.png")


def _partials(tmp_path, n=3, space_group="P 4"):
    """Single-still partials of random observations on a box that holds h=0, k=0 and l=0 off its centre."""
    grid = GlobalGrid(ndiv=3, lo=(-5, -8, -4), shape=(13, 15, 11), unit_cell=CELL, space_group=space_group)
    rng = np.random.default_rng(7)
    parts = []
    for i in range(n):
        hkl = rng.uniform(-2.9, 2.9, (4000, 3))
        write_still(tmp_path / f"s{i}.h5", f"img_{i:04d}.cbf#0", *hkl.T, rng.gamma(2.0, 3.0, 4000),
                    rng.uniform(0.5, 2.0, 4000), crystal=CrystalModel(CELL, space_group))
        parts.append(tmp_path / f"p{i}.h5")
        accumulate_one(tmp_path / f"s{i}.h5", grid, parts[-1], MergeOptions())
    return parts


@pytest.fixture
def helper():
    figure_process.start()
    try:
        yield
    finally:
        figure_process.stop()


@pytest.mark.parametrize("backend", ["hdf5", "memory"])
@pytest.mark.parametrize("symmetry", ["P 4", "P 1"])
def test_figures_show_the_written_map_and_the_figure_process_draws_the_same_files(tmp_path, backend, symmetry,
                                                                                   request, monkeypatch):
    parts = _partials(tmp_path)
    opt = MergeOptions(symmetry=symmetry, backend=backend)
    here, _ = merge_partials(parts, tmp_path / "here", opt)
    assert not figure_process.running()
    # the planes drawn are the written map's planes (NaN where empty): same figure as drawn from the file
    grid = read_map(here["map"]).grid
    with h5py.File(here["map"], "r") as f:
        from_file = map_planes(grid, f["entry/map/intensity"])
    (tmp_path / "from_file").mkdir()
    drawn = write_slice_pngs(tmp_path / "from_file", grid, from_file)
    assert len(drawn) == 3
    for name in PNGS[:3]:
        assert (tmp_path / "here" / name).read_bytes() == (tmp_path / "from_file" / name).read_bytes(), name
    request.getfixturevalue("helper")
    assert figure_process.running()
    drawings = []
    draw_later = figure_process.draw_later
    monkeypatch.setattr(figure_process, "draw_later", lambda *a: drawings.append(draw_later(*a)) or drawings[-1])
    there, _ = merge_partials(parts, tmp_path / "there", opt)
    assert len(drawings) == 1 and drawings[0].in_helper and drawings[0]._future.exception() is None
    assert sorted(there) == sorted(here)
    for name in PNGS:
        assert (tmp_path / "there" / name).read_bytes() == (tmp_path / "here" / name).read_bytes(), name
    with h5py.File(here["map"], "r") as a, h5py.File(there["map"], "r") as b:
        np.testing.assert_array_equal(a["entry/map/intensity"][()], b["entry/map/intensity"][()])


def test_a_figure_process_that_died_costs_only_the_overlap(tmp_path, helper):
    parts = _partials(tmp_path, n=2)
    pid = next(iter(figure_process._POOL._processes))
    os.kill(pid, signal.SIGKILL)
    out, _ = merge_partials(parts, tmp_path / "m", MergeOptions(symmetry="P 4"))
    for name in PNGS:
        assert (tmp_path / "m" / name).stat().st_size > 1000, name
        assert str(tmp_path / "m" / name) in {str(p) for p in out.values()}
    assert not figure_process.running()  # a broken helper is not used again until started anew
    figure_process.start()
    assert figure_process.running()
