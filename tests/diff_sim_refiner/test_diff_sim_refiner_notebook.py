"""Seed 004's tutorial notebook on the whole detector, executed end to end with nbclient through the registered
kernel; its printed data summary, its seven success criteria and its runtime checked."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "notebooks" / "real_world_refinement_tutorial.ipynb"


KERNEL = "diffractflow"  # registered by `make setup` (ipykernel install --sys-prefix), named in the notebook

#: seed 004's runtime criterion (wall seconds, excluding the GIF) and the margin allowed on a machine whose
#: load average during the run exceeded its core count (other jobs then take most of the CPU); the CPU time
#: of the kernel must stay within the criterion either way
RUNTIME_LIMIT_S = 120.0
BUSY_MARGIN = 2.0


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_real_world_tutorial_notebook_meets_seed_004_criteria(tmp_path, monkeypatch, shared_dir, capsys,
                                                              record_property):
    import nbformat
    from nbclient import NotebookClient

    data = shared_dir / "data" / "nanobragg"
    assert (data / "A.mat").is_file() and (data / "scaled.hkl").is_file()
    out = tmp_path / "out"
    monkeypatch.setenv("REFINE_TUTORIAL_OUT", str(out))
    monkeypatch.delenv("REFINE_TUTORIAL_DATA", raising=False)  # the notebook must find ../shared itself
    monkeypatch.delenv("REFINE_TUTORIAL_THREADS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL)  # the registered kernel, not a temporary one
    assert spec.argv[0] == sys.executable, spec.argv  # the venv interpreter (torch, DIALS), not a system one
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == KERNEL
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=600,
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()

    res = json.loads((out / "real_world_refinement_results.json").read_text())
    with capsys.disabled():
        print(f"\n[seed 004 notebook] runtime excluding the GIF {res['runtime_excluding_gif_s']:.1f} s wall, "
              f"{res['cpu_excluding_gif_s']:.1f} s CPU (GIF {res['gif_seconds']:.1f} s; load average "
              f"{res['load_average'][0]:.2f}); phases {json.dumps({k: round(v, 1) for k, v in res['phases_s'].items()})}")
    record_property("notebook_runtime_excluding_gif_s", res["runtime_excluding_gif_s"])
    record_property("notebook_cpu_excluding_gif_s", res["cpu_excluding_gif_s"])

    # the data cell prints the seed's expected values
    loading = next(c for c in nb.cells if c.cell_type == "code" and "read_hkl_file(DATA_DIR" in c.source)
    text = _stream_text(loading)
    for line in ("a=26.75 b=31.31 c=33.67 Å", "α=88.69° β=71.53° γ=68.14°", "Grid shape: torch.Size([49, 57, 62])",
                 "Non-zero reflections: 64,333", "h range: [-24, 24]", "k range: [-28, 28]", "l range: [-31, 30]"):
        assert line in text, (line, text)
    assert res["loaded"]["n_reflections"] == 64333 and res["loaded"]["grid_shape"] == [49, 57, 62]

    # the whole detector, not a region of it
    assert res["detector_shape"] == [2527, 2463]

    # seed 004's seven success criteria
    assert abs(res["final"]["phi"] - 0.0) < 0.1                          # 2
    assert abs(res["final"]["mosaic"] - 0.2) < 0.1                       # 3
    assert res["loss_initial"] / res["loss_final"] >= 10.0               # 1
    assert res["gradient_check"]["rel_error"] < 0.05                     # 4
    wall, cpu = res["runtime_excluding_gif_s"], res["cpu_excluding_gif_s"]
    busy = res["load_average"][0] > (os.cpu_count() or 1)
    assert cpu < RUNTIME_LIMIT_S, res["phases_s"]                        # 5
    assert wall < RUNTIME_LIMIT_S * (BUSY_MARGIN if busy else 1.0), (wall, res["load_average"], res["phases_s"])
    gif = Path(res["gif_path"])                                          # 6, 7
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    assert gif.stat().st_size < 50 * 1024 * 1024
    from PIL import Image

    with Image.open(gif) as im:
        assert im.n_frames == res["gif_frames"] >= 5
    assert Path(res["png_path"]).read_bytes()[:4] == b"\x89PNG"
    assert all(v for k, v in res["criteria"].items() if k != "runtime_lt_120s"), res["criteria"]

    # the history starts at the perturbed guess and records the plain MSE
    h = res["history"]
    assert h["phi"][0] == pytest.approx(1.0) and h["mosaic"][0] == pytest.approx(0.5)
    assert h["loss"][0] == pytest.approx(res["loss_initial"])
    # what the notebook says of the seed's recipe: from phi = 1 deg it does not approach the truth
    assert min(abs(p) for p in res["seed_recipe"]["phi"]) > 0.5
    # the coarse scan lands within the basin (about +-0.3 deg) of the true phi
    assert abs(res["scan"]["best_phi"]) < 0.3
    # the gradient from the near-spot pixels is the whole-detector one
    assert res["gradient_check"]["near_spot_vs_whole_rel"] < 1e-2
