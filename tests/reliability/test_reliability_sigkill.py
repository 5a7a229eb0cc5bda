"""SIGKILL of each of the six real services while it holds a job: JetStream redelivers the job to a new replica,
which completes it once; outputs complete, hashes valid, nothing half-written left behind."""
from __future__ import annotations


import numpy as np

from diffractflow.artifacts import Volume
from diffractflow.messages import ArtifactRef, JobRequest
from orchestration.diffuse import DiffuseRunConfig, grid_spec


def _job(volume: Volume, service: str, job_id: str, inputs: dict, params: dict) -> JobRequest:
    refs = {k: v if isinstance(v, ArtifactRef) else volume.ref(v) for k, v in inputs.items()}
    return JobRequest(job_id=job_id, run_id="kill", service=service, inputs=refs, params=params)


def test_sigkill_each_diffuse_stage_mid_job(kill_mid_job_and_recover, thaumatin_cbf, volume):
    """A real thaumatin still through stills-processor, diffuse-extractor and voxel-merger, with every stage
    killed while it works on the still; each stage's recovered output feeds the next."""
    v = Volume(volume)
    cbf = thaumatin_cbf(volume / "incoming", 1)
    cfg = DiffuseRunConfig(space_group="P 41 21 2", unit_cell=[57.8, 57.8, 150.3, 90, 90, 90], d_min=3.0)

    res = kill_mid_job_and_recover(_job(
        v, "stills-processor", "k-index", {"image0": cbf},
        {"space_group": cfg.space_group, "unit_cell": cfg.unit_cell, "nproc": 1}))
    assert res.metrics["status"] == "indexed", res.metrics

    res = kill_mid_job_and_recover(_job(
        v, "diffuse-extractor", "k-extract",
        {"experiments": res.outputs["experiments"], "reflections": res.outputs["reflections"]}, {"pngs": False}))
    still = res.outputs["still_0000"]

    res = kill_mid_job_and_recover(_job(
        v, "voxel-merger", "k-accumulate", {"still": still},
        {"mode": "accumulate", "grid_spec": grid_spec(cfg)}), hold_s=0.05)  # the job takes 0.25-0.5 s
    assert "partial" in res.outputs
    assert res.metrics.get("n_observations", 1) > 0


def test_sigkill_scaler_mid_job(kill_mid_job_and_recover, volume):
    from scaler.artifacts import write_observations

    rng = np.random.default_rng(3)
    n_stills, per, n_vox = 300, 20_000, 50_000
    still = np.repeat(np.arange(n_stills), per)
    vox = rng.integers(0, n_vox, still.size)
    q = rng.uniform(0.1, 0.6, n_vox)[vox]
    b = np.exp(rng.normal(0, 0.2, n_stills))
    model = b[still] * (rng.gamma(2.0, 50.0, n_vox) + 10.0)[vox]
    obs = write_observations(volume / "incoming" / "obs.h5", still, vox, q,
                             model * (1 + 0.05 * rng.normal(size=model.size)), 0.05 * model)
    v = Volume(volume)
    res = kill_mid_job_and_recover(_job(v, "scaler", "k-scale", {"observations": obs},
                                                           {"mode": "relative"}), hold_s=0.3)
    assert res.metrics.get("convergence_achieved") is True, res.metrics


def test_sigkill_stem_polar_mid_job(kill_mid_job_and_recover, volume):
    from stem_polar.synthetic import write_demo_dataset

    write_demo_dataset(volume / "incoming", h=128, w=128, k=64, seed=2)
    v = Volume(volume)
    res = kill_mid_job_and_recover(_job(
        v, "stem-polar", "k-polar", {"data": volume / "incoming/patterns.h5", "labels": volume / "incoming/labels.npy"},
        {"dset": "patterns", "chunks": 256}), hold_s=0.3)
    assert any(name.endswith("Ex.tif") or "Ex" in name for name in res.outputs), sorted(res.outputs)


def test_sigkill_diff_sim_refiner_mid_job(kill_mid_job_and_recover, volume):
    flags = ("-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1.0 -distance 100 -detpixels 2048 "
             "-pixel 0.1 -oversample 4 -misset 5 3 -2 -mosaic 0.5 -mosaic_domains 6 -mosaic_seed 7 "
             "-phisteps 4 -osc 0.4").split()
    v = Volume(volume)
    res = kill_mid_job_and_recover(_job(v, "diff-sim-refiner", "k-sim", {}, {"nanobragg": flags}),
                                   hold_s=0.5)
    assert res.metrics["sum_photons"] > 0 and res.metrics["orientations"] == 4 * 6
