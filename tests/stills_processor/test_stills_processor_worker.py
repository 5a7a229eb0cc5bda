"""The bus handler (STAGE) through the runtime's inline runner: inputs on a volume, summary registered."""
from __future__ import annotations

import bz2
from pathlib import Path

import pytest

pytest.importorskip("dials")

from diffractflow.artifacts import sha256_file
from diffractflow.config import Settings
from diffractflow.messages import ArtifactRef, JobRequest
from diffractflow.runtime import BadInput, run_inline

from stills_processor.artifacts import read_summary
from stills_processor.worker import STAGE, Params

THAUMATIN = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "thaumatin_grid"


def _ref(volume, path):
    return ArtifactRef(path=str(path.relative_to(volume)), sha256=sha256_file(path))


def test_worker_batch_reports_non_hit_and_unreadable(tmp_path):
    if not THAUMATIN.is_dir():
        pytest.skip(f"{THAUMATIN} absent")
    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    blank = vol / "in" / "thau_3_2_0017.cbf"
    blank.write_bytes(bz2.decompress((THAUMATIN / "thau_3_2_0017.cbf.bz2").read_bytes()))
    junk = vol / "in" / "junk.cbf"
    junk.write_bytes(b"###CBF: VERSION 1.5\n# Angle_increment 0.0000 deg.\nno image here\n")
    job = JobRequest(job_id="sp-test-1", service="stills-processor",
                     inputs={"image0": _ref(vol, blank), "image1": _ref(vol, junk)},
                     params={"space_group": "P41212", "unit_cell": [57.8, 57.8, 150, 90, 90, 90], "nproc": 1})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    rows = read_summary(ctx.outputs["summary"])
    assert [r["status"] for r in rows] == ["non_hit", "error"]
    assert rows[0]["n_spots"] <= 1 and "junk.cbf" in rows[1]["reason"]
    assert ctx.metrics["n_non_hit"] == 1 and ctx.metrics["n_error"] == 1
    assert (ctx.out_dir / "manifest.json").exists()


def test_worker_rejects_job_without_images(tmp_path):
    job = JobRequest(job_id="sp-test-2", service="stills-processor", inputs={}, params={})
    with pytest.raises(BadInput, match="no image inputs"):
        run_inline(STAGE, job, Settings(volume=tmp_path))


def test_worker_params_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="unknown space group"):
        Params(space_group="P 7")
    with pytest.raises(ValidationError):
        Params(unit_cell=[57.8, 57.8, 150])
    with pytest.raises(ValidationError, match="not a DIALS parameter"):
        Params(phil=["definitely_not_a_dials_key=1"])
    with pytest.raises(ValidationError, match="mode"):
        Params(mode="stills")
    p = Params(space_group="P41212", phil=["spotfinder.filter.d_min=2.5"])
    assert p.space_group == "P 41 21 2"
    assert (p.mode, p.scan_varying, p.integrate) == ("auto", False, False)


def test_worker_frame_model_needs_model_and_one_image(tmp_path):
    (tmp_path / "a.cbf").write_bytes(b"x")
    job = JobRequest(job_id="sp-test-4", service="stills-processor",
                     inputs={"image0": _ref(tmp_path, tmp_path / "a.cbf")}, params={"mode": "frame_model"})
    with pytest.raises(BadInput, match="needs inputs 'model'"):
        run_inline(STAGE, job, Settings(volume=tmp_path))


def test_worker_single_still_registers_its_dials_files_as_outputs(tmp_path):
    """A one-image job (mode auto) names its .expt / integrated .refl / indexed .refl as job outputs, so the
    orchestration need not open summary.h5; the per-unit figures are in the metrics."""
    from dials.array_family import flex
    from dxtbx.model.experiment_list import ExperimentList

    if not THAUMATIN.is_dir():
        pytest.skip(f"{THAUMATIN} absent")
    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    still = vol / "in" / "thau_3_2_0003.cbf"
    still.write_bytes(bz2.decompress((THAUMATIN / "thau_3_2_0003.cbf.bz2").read_bytes()))
    job = JobRequest(job_id="sp-test-3", service="stills-processor", inputs={"image0": _ref(vol, still)},
                     params={"space_group": "P41212", "unit_cell": [57.8, 57.8, 150, 90, 90, 90], "nproc": 1})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    row = read_summary(ctx.outputs["summary"])[0]
    assert row["status"] == "indexed", row["reason"]
    assert set(ctx.outputs) == {"summary", "experiments", "reflections", "indexed"}
    assert str(ctx.outputs["experiments"]) == row["expt_path"]
    assert str(ctx.outputs["reflections"]) == row["refl_path"]
    assert str(ctx.outputs["indexed"]) == row["indexed_refl_path"]
    expt = ExperimentList.from_file(str(ctx.outputs["experiments"]), check_format=False)[0]
    a, b, c = expt.crystal.get_unit_cell().parameters()[:3]
    assert abs(a / 57.8 - 1) < 0.01 and abs(c / 150.3 - 1) < 0.01  # thaumatin's cell
    integrated = flex.reflection_table.from_file(str(ctx.outputs["reflections"]))
    assert integrated.get_flags(integrated.flags.integrated_sum).count(True) == row["n_integrated"] > 0
    m = ctx.metrics
    assert m["n_indexed"] == 1 and m["n_units"] == 1  # unit counts, as before
    assert m["n_indexed_spots"] == row["n_indexed"] > 40 and m["status"] == "indexed"
    assert m["unit_cell"] == pytest.approx(row["unit_cell"]) and m["rmsd_x_px"] == pytest.approx(row["rmsd_x_px"])
