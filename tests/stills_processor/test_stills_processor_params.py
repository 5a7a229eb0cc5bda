"""The job parameter models are the one place the defaults live: the CLI reads them, unknown keys are refused."""
from __future__ import annotations

import pytest

import dials  # noqa: F401,E402  (DIALS is a hard requirement: make setup installs it)

import typer
from typer.testing import CliRunner

from stills_processor.cli import app, job_params
from stills_processor.core.params import ProcessingSettings, StillsJob

RUN_FIELDS = [n for n in StillsJob.model_fields if n != "mode"]


def _run_command():
    return typer.main.get_command(app).commands["run"]


def test_cli_options_are_the_model_fields_with_the_model_defaults():
    """Every field of the mode-auto model is a `run` option whose click default (what --help shows and what an
    omitted option gives) is the model's default."""
    params = {p.name: p for p in _run_command().params}
    assert set(RUN_FIELDS) <= set(params)
    model = StillsJob()
    for name in RUN_FIELDS:
        default = params[name].default
        expected = getattr(model, name)
        assert (list(default) if isinstance(default, (list, tuple)) else default) == expected, name
    # and the science settings built from a default job are the dataclass's own defaults
    assert model.settings() == ProcessingSettings()


def _params_of(args, tmp_path):
    """The StillsJob `run` would use for ARGS (parsed by click, without processing anything)."""
    cmd = _run_command()
    ctx = cmd.make_context("run", [str(tmp_path / "x.cbf"), "--out", str(tmp_path / "o"), *args])
    p = ctx.params
    return job_params(ctx, p["config"], p["set_"])


def test_cli_config_set_and_options_in_that_order(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("min_spots: 30\nq_tolerance: 0.01\nunit_cell: [57.8, 57.8, 150, 90, 90, 90]\n"
                   "strategies: default,strict_spots\n")
    p = _params_of(["--config", str(cfg), "--set", "q_tolerance=0.02", "--set", "integrate=false",
                    "--space-group", "P41212"], tmp_path)
    assert p.min_spots == 30  # from the file; the option left at its default does not override it
    assert p.q_tolerance == 0.02 and p.integrate is False  # --set over the file
    assert p.space_group == "P 41 21 2" and p.unit_cell == [57.8, 57.8, 150.0, 90.0, 90.0, 90.0]
    assert p.strategies == ["default", "strict_spots"]
    p = _params_of(["--config", str(cfg), "--min-spots", "5"], tmp_path)
    assert p.min_spots == 5  # an option given on the command line wins


@pytest.mark.parametrize("args,key", [
    (["--set", "smoothr=true"], "smoothr"),
    (["--set", "mode=sequence"], "mode"),
    (["--min-spots", "0"], "min_spots"),
    (["--unit-cell", "57.8,57.8,150"], "unit_cell"),
])
def test_cli_rejects_unknown_or_bad_params_naming_the_key(tmp_path, args, key):
    res = CliRunner().invoke(app, ["run", str(tmp_path / "x.cbf"), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    assert f"error: {key}" in res.output
    assert not (tmp_path / "o").exists()


def test_cli_rejects_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("min_spot: 30\n")
    res = CliRunner().invoke(app, ["run", str(tmp_path / "x.cbf"), "--out", str(tmp_path / "o"), "--config", str(cfg)])
    assert res.exit_code == 2 and "min_spot: Extra inputs are not permitted" in res.output
