"""The diffuse-extractor's one parameter model: unknown keys refused by name, one name per knob (the library, the
bus and the CLI), the CLI's defaults are the model's, every params dict the orchestration sends is valid, and a bug
in the handler is a failure the bus retries, not a rejection of the input."""
from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError

from diffuse_extractor.cli import app
from diffuse_extractor.core.masks import Shape
from diffuse_extractor.core.params import BackgroundJob, ExtractionParams, ExtractJob, extraction_params
from diffuse_extractor.worker import STAGE


def _reason(exc: ValidationError) -> str:
    """The rejection reason as the runtime words it (diffractflow.runtime, bad_params)."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


@pytest.mark.parametrize("params, key", [({"smoothr": True}, "smoothr"),
                                         ({"user_shapes": []}, "user_shapes"),
                                         ({"mode": "background", "bragg_radius_px": 5}, "bragg_radius_px"),
                                         ({"mode": "background", "background_bin_px": 8}, "background_bin_px")])
def test_unknown_params_are_refused_naming_the_key(params, key):
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate(params)
    assert key in _reason(e.value) and "Extra inputs are not permitted" in _reason(e.value)


def test_job_kind_by_mode_and_shapes_parsed_once():
    job = STAGE.params_model.model_validate({"mask_shapes": ["circle:0:10,20,5"], "beamstop": "NONE"}).root
    assert isinstance(job, ExtractJob) and job.beamstop == "none"
    assert job.mask_shapes == [Shape("circle", 0, (10.0, 20.0, 5.0))]
    assert job.as_dict()["mask_shapes"] == ["circle:0:10,20,5"]  # provenance written back as text
    assert isinstance(STAGE.params_model.model_validate({"mode": "background"}).root, BackgroundJob)
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate({"mode": "integrate"})
    assert "mode must be 'extract' or 'background'" in _reason(e.value)
    with pytest.raises(ValidationError) as e:
        STAGE.params_model.model_validate({"mask_shapes": ["hexagon:0:1,2,3"]})
    assert "mask_shapes" in _reason(e.value) and "bad mask shape" in _reason(e.value)


def test_library_gets_exactly_the_jobs_knobs():
    job = ExtractJob(bragg_delpsi_max=0.005, gain=2.0, pngs=False, hot_dead=False)
    p = extraction_params(job)
    assert type(p) is ExtractionParams and p.bragg_delpsi_max == 0.005 and p.gain == 2.0
    bkg = extraction_params(BackgroundJob(outlier_nsigma=3.0, beamstop="none"))
    # the background job's outlier cut is for its frames: the extraction knob of that name keeps its own default
    assert bkg.beamstop == "none" and bkg.outlier_nsigma == ExtractionParams().outlier_nsigma != 3.0


# CLI option -> model field where the names differ
CLI_NAMES = {"run": {"image_index": "image_indices", "all_images": "all_images", "mask_shape": "mask_shapes",
                     "bragg_radius": "bragg_radius_px", "bragg_delpsi": "bragg_delpsi_max"},
             "background": {"smooth": "smooth_bins", "mask_shape": "mask_shapes"}}


@pytest.mark.parametrize("command, model, skip", [
    ("run", ExtractJob, {"mode", "bragg_d_min", "outlier_grow_px", "use_observed_spots", "air_density_g_cm3",
                         "beamstop_ratio", "pixel_stats", "pixel_stats_min_stills", "beamstop_per_run",
                         "beamstop_record"}),
    ("background", BackgroundJob, {"mode", "detect_arm", "beamstop_ratio", "beamstop_record"})])
def test_cli_defaults_are_the_models(command, model, skip):
    cmd = typer.main.get_command(app).commands[command]
    checked = set()
    for p in cmd.params:
        field = CLI_NAMES[command].get(p.name, p.name)
        if field in model.model_fields:
            want = model.model_fields[field].get_default(call_default_factory=True)
            got = p.default
            if field == "beamstop":
                want, got = [want], got  # one option value per shape
            assert got == want or list(got or []) == list(want or []), (command, p.name, got, want)
            checked.add(field)
    # every field a user sets from the command line has its option (the rest are run-level, set by the flows)
    assert checked == set(model.model_fields) - skip, set(model.model_fields) - skip - checked


def test_orchestration_params_are_valid():
    """The params orchestration/diffuse.py sends the extractor (background flow and per-still extraction)."""
    assert isinstance(STAGE.params_model.model_validate({"mode": "background"}).root, BackgroundJob)
    per_still = {"pngs": False, "pixel_stats": "runs/r/pixel_stats.h5", "bragg_radius_px": 6.5,
                 "isotropic_background": True}
    job = STAGE.params_model.model_validate(per_still).root
    assert isinstance(job, ExtractJob) and job.bragg_radius_px == 6.5 and job.isotropic_background


def test_a_bug_is_a_failure_retried_not_a_rejection(planted_bug, volume, monkeypatch):
    """A ValueError from a bug inside the extraction is retried, then dead-lettered as a failure; the old worker
    turned any ValueError into a rejection (bad_input) at once."""
    import diffuse_extractor.worker as worker

    expt = volume / "incoming" / "x.expt"
    expt.parent.mkdir(parents=True)
    expt.write_text("{}")
    monkeypatch.setattr(worker, "load_experiments", lambda p: [None])
    assert planted_bug(STAGE, worker.pipeline, "process", {"experiments": expt}, {"all_images": True}) == \
        (2, [("bug", "failure")])
