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
    p = Params(space_group="P41212", phil=["spotfinder.filter.d_min=2.5"])
    assert p.space_group == "P 41 21 2"
