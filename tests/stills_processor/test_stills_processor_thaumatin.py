"""Real thaumatin stills (../shared/data/thaumatin_grid) through `stills-processor run`, processed once.

Images 1-15 hold a crystal (thaumatin, P 41 21 2, a = b ~ 57.8 A, c ~ 150.3 A); 16-19 are blank.
A truncated copy of image 2 must fail cleanly, naming the file, while everything else finishes.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

pytest.importorskip("dials")

CRYSTALS = [f"thau_3_2_{i:04d}" for i in range(1, 16)]
BLANKS = [f"thau_3_2_{i:04d}" for i in range(16, 20)]


def test_run_finishes_everything_and_reports_the_truncated_file(thaumatin_run):
    r = thaumatin_run
    assert len(r.rows) == 20, r.stdout[-2000:]
    assert r.exit_code == 1  # one unreadable input -> non-zero, after all others were processed
    bad = r.row("truncated_0002")
    assert bad["status"] == "error"
    assert "truncated_0002.cbf" in bad["reason"] and "cannot be decoded" in bad["reason"]
    assert "truncated_0002.cbf" in r.stderr
    assert bad["expt_path"] == "" and not list(r.out.glob("truncated_0002*"))
    assert "stills-processor summary" in r.stdout  # the printed table


def test_all_crystal_images_index_in_thaumatin_cell(thaumatin_run):
    for name in CRYSTALS:
        row = thaumatin_run.row(name)
        assert row["kind"] == "still"
        assert row["status"] == "indexed", (name, row["reason"])
        assert row["strategy"] == "default" and row["attempts"] == []  # the first strategy, as before the cascade
        assert row["space_group"] == "P 41 21 2"
        a, b, c, al, be, ga = row["unit_cell"]
        assert abs(a / 57.8 - 1) < 0.01 and abs(b / 57.8 - 1) < 0.01, (name, row["unit_cell"])
        assert abs(c / 150.3 - 1) < 0.01, (name, row["unit_cell"])
        assert (al, be, ga) == pytest.approx((90, 90, 90), abs=1e-6)
        # a real lattice: many strong spots indexed and kept by refinement, with a ~1 px fit
        # (measured here: 41-86% of spots kept, RMSD x/y <= 1.0 px; image 15 has only 51 spots)
        assert row["n_spots"] >= 40 and row["n_indexed"] >= row["n_refined"] >= 0.35 * row["n_spots"], (name, row)
        assert row["rmsd_x_px"] < 1.5 and row["rmsd_y_px"] < 1.5, (name, row)
        assert row["n_integrated"] >= 100


def test_blank_images_are_non_hits_with_spot_counts(thaumatin_run):
    for name in BLANKS:
        row = thaumatin_run.row(name)
        assert row["status"] == "non_hit", (name, row)
        assert row["n_spots"] <= 1  # 0-1 strong spots on the blanks (data README)
        assert f"({row['n_spots']} < 16)" in row["reason"]
        assert row["expt_path"] == ""


def test_q_vector_validation_recorded_and_passed(thaumatin_run):
    for name in CRYSTALS:
        row = thaumatin_run.row(name)
        assert row["validation_passed"], (name, row)
        assert row["validation_n"] == row["n_refined"]
        # one detector pixel at ~345 mm and 0.97 A subtends ~5e-4 1/A: errors are below a few pixels
        assert row["q_median_error"] < 2e-3 and row["px_median_error"] < 2.0


def test_expt_and_refl_files_load_and_match_the_summary(thaumatin_run):
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    inputs = {p.stem: p for p in thaumatin_run.inputs}
    for name in CRYSTALS[:3] + CRYSTALS[-1:]:
        row = thaumatin_run.row(name)
        el = ExperimentList.from_file(row["expt_path"], check_format=False)
        assert len(el) == 1 and el[0].scan is None and el[0].goniometer is None  # a true still
        assert el[0].imageset.paths() == [str(inputs[name].resolve())]  # the expt names its input
        A = np.array(el[0].crystal.get_A()).reshape(3, 3)
        np.testing.assert_allclose(A, np.array(row["A_matrix"]), rtol=1e-9)
        np.testing.assert_allclose(el[0].crystal.get_unit_cell().parameters(), row["unit_cell"], rtol=1e-9)
        integ = flex.reflection_table.from_file(row["refl_path"])
        assert integ.get_flags(integ.flags.integrated_sum).count(True) == row["n_integrated"]
        idx = flex.reflection_table.from_file(row["indexed_refl_path"])
        assert len(idx) == row["n_refined"]
        # independent check of the saved model: q = A h of indexed spots has the cctbx d-spacing
        hkl = np.array(idx["miller_index"]).reshape(-1, 3)
        d_ref = np.array(el[0].crystal.get_unit_cell().d(idx["miller_index"]))
        np.testing.assert_allclose(1 / np.linalg.norm(hkl @ A.T, axis=1), d_ref, rtol=1e-9)


def test_stored_orientation_is_consistent(thaumatin_run):
    """A = U B with U a proper rotation, for every indexed still."""
    for n in CRYSTALS:
        row = thaumatin_run.row(n)
        U, B, A = (np.array(row[k]) for k in ("U_matrix", "B_matrix", "A_matrix"))
        np.testing.assert_allclose(U @ U.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(U) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(U @ B, A, atol=1e-9)


def test_summary_h5_schema(thaumatin_run):
    path = thaumatin_run.out / "summary.h5"
    with h5py.File(path) as f:
        assert f.attrs["schema"] == "diffractflow.stills_summary"
        assert f.attrs["producer"] == "stills-processor"
        params = json.loads(f.attrs["parameters"])
        assert params["symmetry"]["space_group"] == "P 41 21 2" and params["nproc"] == 2
        g = f["summary"]
        assert g.attrs["n_units"] == 20 and g.attrs["n_indexed"] == 15
        assert g.attrs["n_non_hit"] == 4 and g.attrs["n_error"] == 1
        assert g["A_matrix"].shape == (20, 3, 3) and g["A_matrix"].attrs["units"] == "1/angstrom"


def test_show_command_prints_the_summary(thaumatin_run):
    from typer.testing import CliRunner

    from stills_processor.cli import app

    res = CliRunner().invoke(app, ["show", str(thaumatin_run.out / "summary.h5")])
    assert res.exit_code == 0
    assert "thau_3_2_0001" in res.stdout and "non_hit" in res.stdout
