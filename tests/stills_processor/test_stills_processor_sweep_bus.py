"""A sweep through the real bus (nats-server with JetStream and auth, `stills-processor serve` as a subprocess),
as the orchestration drives it: frames 1-6 of a rendered 8-frame sweep as one sequence (mode ``sequence``, the
default scan-static refinement), then frame 8, beyond that range, as its own experiment (mode
``frame_model``); a frame of another sweep is rejected, not retried."""
from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest

import dials  # noqa: F401  (part of the platform: a missing DIALS is a failure, not a skip)

from diffractflow.artifacts import Volume
from orchestration.tasks import JobRejected, submit_and_wait


def _submit(settings, inputs, params, job_id, timeout=600):
    return asyncio.run(submit_and_wait("stills-processor", inputs, params, run_id="sweep-bus", job_id=job_id,
                                       timeout=timeout, settings=settings))


def test_sweep_sequence_then_frame_model_over_the_bus(settings, workers, volume, probe):
    from dials.array_family import flex
    from dials.command_line.find_spots import working_phil
    from dxtbx.model.experiment_list import ExperimentList
    from scipy.spatial import cKDTree

    from stills_processor.synthetic import write_rotation_sequence

    truth = write_rotation_sequence(volume / "incoming" / "sweep", n_frames=8, osc_deg=0.5, seed=5)
    workers.start("stills-processor")
    vol = Volume(volume)

    seq = _submit(settings, {f"image{i}": p for i, p in enumerate(truth.paths[:6])},
                  {"mode": "sequence", "space_group": "P41212", "phil": ["indexing.method=fft1d"]}, "sweep-seq")
    assert seq.status == "ok", workers.log_text()[-3000:]
    assert {"summary", "experiments", "reflections", "indexed"} <= set(seq.outputs)
    m = seq.metrics
    assert m["status"] == "indexed" and m["n_frames"] == 6 and m["image_range"] == [1, 6]
    assert m["scan_varying"] is False  # the default for mode sequence: scan-static refinement
    np.testing.assert_allclose(m["unit_cell"], truth.unit_cell, rtol=1e-3)
    model_path = vol.open_ref(seq.outputs["experiments"])  # hash checked
    model = ExperimentList.from_file(str(model_path), check_format=False)[0]
    assert model.crystal.num_scan_points == 0
    refl = flex.reflection_table.from_file(str(vol.open_ref(seq.outputs["reflections"])))
    assert len(refl) == m["n_indexed"] > 300

    fm = _submit(settings, {"model": seq.outputs["experiments"], "image0": truth.paths[7]}, {"mode": "frame_model"},
                 "sweep-frame-8", timeout=120)
    assert fm.status == "ok" and set(fm.outputs) == {"experiments"}
    assert fm.metrics["frame_number"] == 8 and not fm.metrics["inside_model_scan"]
    el = ExperimentList.from_file(str(vol.open_ref(fm.outputs["experiments"])))
    assert el[0].scan.get_image_range() == (8, 8) and el[0].scan.get_oscillation() == pytest.approx((3.5, 0.5))
    p = working_phil.extract()
    p.spotfinder.mp.nproc = 1
    obs = np.array(flex.reflection_table.from_observations(el, p)["xyzobs.px.value"]).reshape(-1, 3)
    cal = np.array(flex.reflection_table.from_predictions(el[0])["xyzcal.px"]).reshape(-1, 3)
    d, _ = cKDTree(obs[:, :2]).query(cal[:, :2])
    assert len(cal) > 100 and np.median(d) < 1.0 and np.mean(d < 2.0) > 0.75

    # a frame of another sweep (same names, start angle off the sweep's): rejected, dead-lettered, not retried
    src = truth.paths[7].read_bytes()
    head, n = re.subn(rb"Start_angle 3\.5000", b"Start_angle 8.5000", src[:4096], count=1)
    assert n == 1
    other = volume / "incoming" / "other" / truth.paths[7].name
    other.parent.mkdir(parents=True)
    other.write_bytes(head + src[4096:])
    with pytest.raises(JobRejected, match="not of the sweep of model"):
        _submit(settings, {"model": seq.outputs["experiments"], "image0": other}, {"mode": "frame_model"},
                "sweep-frame-other", timeout=120)
    kinds = {l.job_id: l.kind for l in probe.dead_letters()}
    assert kinds == {"sweep-frame-other": "bad_input"}
    assert [r.attempt for r in probe.results_for("stills-processor", "sweep-frame-other")] == [1]
