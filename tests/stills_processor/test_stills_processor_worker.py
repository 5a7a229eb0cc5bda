"""The bus handler (STAGE) through the runtime's inline runner: inputs on a volume, summary registered."""
from __future__ import annotations

import bz2
import json
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

    from stills_processor.core.params import SequenceJob, StillsJob

    with pytest.raises(ValidationError, match="unknown space group"):
        Params.model_validate({"space_group": "P 7"})
    with pytest.raises(ValidationError, match="unit_cell"):
        Params.model_validate({"unit_cell": [57.8, 57.8, 150]})
    with pytest.raises(ValidationError, match="not a DIALS parameter"):
        Params.model_validate({"phil": ["definitely_not_a_dials_key=1"]})
    with pytest.raises(ValidationError, match="mode must be"):
        Params.model_validate({"mode": "stills"})
    p = Params.model_validate({"space_group": "P41212", "phil": ["spotfinder.filter.d_min=2.5"]}).root
    assert isinstance(p, StillsJob) and p.space_group == "P 41 21 2"
    # mode auto follows DIALS' own sequence defaults (as `run` does); mode sequence refines scan-static and
    # does not integrate unless asked (the sweep flow's diffuse extraction needs neither)
    assert (p.mode, p.scan_varying, p.integrate) == ("auto", None, True)
    s = Params.model_validate({"mode": "sequence"}).root
    assert isinstance(s, SequenceJob) and (s.scan_varying, s.integrate) == (False, False)
    assert s.settings().integrate_sequences is False and s.settings().scan_varying is False


@pytest.mark.parametrize("params,key", [
    ({"smoothr": True}, "smoothr"),  # a misspelt key is not silently ignored
    ({"mode": "sequence", "strategies": ["default"]}, "strategies"),  # a stills-only key on a sequence job
    ({"mode": "frame_model", "nproc": 2}, "nproc"),  # frame_model takes no parameters
])
def test_worker_rejects_unknown_params_naming_the_key(tmp_path, params, key):
    """The runtime validates with the stage's model: a job with an unknown key is rejected before it runs, and
    the reason names the key."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        STAGE.params_model.model_validate(params)
    assert [e["loc"][-1] for e in err.value.errors()] == [key]
    assert err.value.errors()[0]["type"] == "extra_forbidden"
    (tmp_path / "a.cbf").write_bytes(b"x")
    job = JobRequest(job_id="sp-extra", service="stills-processor",
                     inputs={"image0": _ref(tmp_path, tmp_path / "a.cbf")}, params=params)
    with pytest.raises(ValidationError, match=key):
        run_inline(STAGE, job, Settings(volume=tmp_path))


def test_service_input_errors_are_the_platforms_input_error(tmp_path):
    """Bad input raised by the science code is the platform's one input-error class, so the runtime rejects
    it without retry (and only it: the worker does not turn other errors into rejections)."""
    from diffractflow.errors import InputError
    from stills_processor.core.params import PhilError
    from stills_processor.core.pipeline import UnreadableImage
    from stills_processor.core.sweep import FrameMismatch

    assert all(issubclass(c, InputError) for c in (PhilError, UnreadableImage, FrameMismatch))
    # raised as is by the handler (no wrapping): a model file dxtbx cannot read is the job's input at fault
    (tmp_path / "model.expt").write_text("{ not json")
    (tmp_path / "f_0001.cbf").write_bytes(b"x")
    job = JobRequest(job_id="sp-badmodel", service="stills-processor", params={"mode": "frame_model"},
                     inputs={"model": _ref(tmp_path, tmp_path / "model.expt"),
                             "image0": _ref(tmp_path, tmp_path / "f_0001.cbf")})
    with pytest.raises(FrameMismatch, match="model.expt: not a DIALS experiment list"):
        run_inline(STAGE, job, Settings(volume=tmp_path))


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
    assert m["n_spots"] == row["n_spots"] and m["strategy"] == row["strategy"] == "default"
    assert m["validation_passed"] is True and m["reason"] == ""
    # the DIALS files are in the manifest with their hashes (the runtime's idempotency check covers them)
    manifest = json.loads((ctx.out_dir / "manifest.json").read_text())
    for name in ("experiments", "reflections", "indexed"):
        ref = manifest["outputs"][name]
        assert (vol / ref["path"]) == ctx.outputs[name] and ref["sha256"] == sha256_file(ctx.outputs[name])
    assert manifest["metrics"]["status"] == "indexed"
    # what the diffuse flow takes from such a result (its outputs and metrics, not summary.h5)
    from orchestration.diffuse import _still_outcome

    seen = _still_outcome({"outputs": manifest["outputs"], "metrics": manifest["metrics"]})
    assert (seen["status"], seen["n_spots"], seen["n_indexed"], seen["strategy"], seen["validation_passed"]) == (
        "indexed", row["n_spots"], row["n_indexed"], "default", True)
    assert {k: vol / seen[k]["path"] for k in ("experiments", "reflections", "indexed")} == {
        "experiments": Path(row["expt_path"]), "reflections": Path(row["refl_path"]),
        "indexed": Path(row["indexed_refl_path"])}


def test_worker_non_hit_still_reports_status_in_metrics(tmp_path):
    """A blank still is data, not an error: an ok result whose metrics say non_hit and why, and no DIALS
    files among the outputs (the orchestration records the still as not indexed)."""
    if not THAUMATIN.is_dir():
        pytest.skip(f"{THAUMATIN} absent")
    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    blank = vol / "in" / "thau_3_2_0017.cbf"
    blank.write_bytes(bz2.decompress((THAUMATIN / "thau_3_2_0017.cbf.bz2").read_bytes()))
    job = JobRequest(job_id="sp-test-5", service="stills-processor", inputs={"image0": _ref(vol, blank)},
                     params={"nproc": 1})
    ctx = run_inline(STAGE, job, Settings(volume=vol))
    m = ctx.metrics
    assert m["status"] == "non_hit" and "too few strong spots" in m["reason"] and m["n_spots"] <= 1
    assert m["n_non_hit"] == 1 and m["validation_passed"] is None and m["strategy"] is None
    assert set(ctx.outputs) == {"summary"}
    from orchestration.diffuse import _still_outcome

    manifest = json.loads((ctx.out_dir / "manifest.json").read_text())
    seen = _still_outcome({"outputs": manifest["outputs"], "metrics": manifest["metrics"]})
    assert seen["status"] == "non_hit" and seen["experiments"] is None and seen["n_spots"] == m["n_spots"]
