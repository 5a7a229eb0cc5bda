"""A stem-polar job writes its own report page (issue 21), from the CLI and from the bus worker: what ran, the quality
checks and warnings, the gate diagnostics, the job's figures and maps drawn from its outputs, links to every file.

The page is rendered by headless Chromium with the screenshot helper of tests/orchestration/test_report.py."""
from __future__ import annotations

import base64
import hashlib
import html
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from diffractflow.report_page import check_links, page_refs


@pytest.fixture(scope="module")
def shots():
    """tests/orchestration/test_report.py's Chromium screenshot and pixel helpers (one implementation of them)."""
    path = Path(__file__).resolve().parents[1] / "orchestration" / "test_report.py"
    spec = importlib.util.spec_from_file_location("_report_page_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, scan):
    d = tmp_path_factory.mktemp("in")
    with h5py.File(d / "p.h5", "w") as f:
        f.create_dataset("patterns", data=scan["data"])
    # label values 1, 2, 4 and a declared cluster 8 without positions: skipped, with a warning
    np.savez(d / "clusters.npz", labels=np.array([4, 1, 2])[scan["labels"]], cluster_ids=np.array([1, 2, 4, 8]))
    np.save(d / "labels.npy", scan["labels"])
    return d


def _files(d: Path) -> set[str]:
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != "report.html"}


def _linked(page: Path) -> set[str]:
    hrefs, _ = page_refs(page)
    return {(page.parent / h).resolve().relative_to(page.parent.resolve()).as_posix() for h in hrefs}


def _images(page: Path) -> dict[str, bytes]:
    """Embedded PNGs by caption."""
    text = page.read_text()
    out = {}
    for fig in text.split("<figure>")[1:]:
        src = fig.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
        cap = html.unescape(fig.split("<figcaption>", 1)[1].split("</figcaption>", 1)[0])
        out[cap] = base64.b64decode(src)
    return out


def test_cli_run_writes_a_page_chromium_renders_with_checks_warnings_figures_and_links(inputs, tmp_path, shots):
    from stem_polar.cli import app

    out = tmp_path / "job"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(app, ["run", "--data", str(inputs / "p.h5"), "--dset", "patterns", "--labels",
                                     str(inputs / "clusters.npz"), "--scan-shape", "24", "24", "--out", str(out),
                                     "--set", "dpc.baseline=rowcol", "-q"])
    assert r.exit_code == 0, r.output
    page = out / "report.html"
    assert page.is_file()
    assert check_links(page) == []  # every link resolves to a file, every image is embedded
    assert _linked(page) == _files(out)  # every file the job wrote, and nothing else
    run = json.loads((out / "logs/run.json").read_text())
    rep = run["report"]
    text = page.read_text()

    # the checks as the job judged them: rowcol removes most of this field (the seed's example of a bad baseline)
    failed = rep["quality"]["failed"]
    assert "baseline" in failed
    assert f"quality checks failed: {', '.join(failed)}; {len(rep['warnings'])} warnings" in text
    for name, chk in rep["quality"]["checks"].items():
        verdict = "ok" if chk["ok"] else "failed"
        assert f'<td>{name}</td><td><span class="st-{verdict}">{verdict}</span>' in text, name
    for w in rep["warnings"]:
        assert html.escape(w) in text
    assert any("cluster 8" in w for w in rep["warnings"])
    assert "skipped clusters: 8:" in text
    for cid in rep["gate_coverage"]:
        assert f"<td>{cid}</td>" in text
    assert html.escape(json.dumps(run["config"]["dpc"])) in text  # the configuration that ran

    # figures: the job's own PNGs as they are on disk, then the maps drawn from its TIFFs
    imgs = _images(page)
    for png in sorted(out.rglob("*.png")):
        assert imgs[png.relative_to(out).as_posix()] == png.read_bytes()
    maps = {c: v for c, v in imgs.items() if c.endswith(".tif)")}
    assert [c.rsplit("(", 1)[1] for c in maps] == ["realspace/E_mag.tif)", "realspace/E_angle.tif)",
                                                    "realspace/S_argmax.tif)", "realspace/S_confidence.tif)"]
    # the cluster map: one colour per cluster of the job's own argmax map, laid out as that map
    import tifffile

    argmax = tifffile.imread(out / "realspace/S_argmax.tif")
    cluster = shots.png_pixels(next(v for c, v in maps.items() if "cluster map" in c))
    k = cluster.shape[0] // argmax.shape[0]
    assert cluster.shape[:2] == (k * argmax.shape[0], k * argmax.shape[1]) and k >= 2
    cells = cluster[::k, ::k].reshape(-1, 3)
    assert sorted(np.unique(argmax)) == [1, 2, 4]
    for c in (1, 2, 4):  # each cluster's positions share one colour, no other cluster's
        mine = np.unique(cells[argmax.ravel() == c], axis=0)
        others = cells[argmax.ravel() != c]
        assert len(mine) == 1 and not (others == mine[0]).all(axis=1).any(), c

    rgb = shots.screenshot(page, tmp_path, size=(1300, 2600))
    assert rgb.std() > 30  # not blank
    assert shots.colourful_fraction(rgb[1200:]) > 0.05  # the figures are drawn below the tables


def test_worker_job_registers_its_page_linking_the_nexus_file(inputs, tmp_path):
    from diffractflow.config import Settings
    from diffractflow.messages import JobRequest
    from diffractflow.runtime import run_inline

    from stem_polar.worker import STAGE

    vol = tmp_path / "vol"
    (vol / "in").mkdir(parents=True)
    shutil.copy(inputs / "p.h5", vol / "in/p.h5")
    shutil.copy(inputs / "labels.npy", vol / "in/l.npy")
    job = JobRequest(job_id="sp-report", service="stem-polar", inputs={"data": {"path": "in/p.h5"},
                                                                       "labels": {"path": "in/l.npy"}},
                     params={"dset": "patterns", "config": {"dpc": {"gate_mode": "union", "baseline": "median"}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = run_inline(STAGE, job, Settings(volume=vol))
    page = ctx.outputs["report"]
    assert Path(page) == ctx.out_dir / "report.html" and Path(page).is_file()
    assert check_links(page) == []
    linked = _linked(Path(page))
    assert "polar_maps.h5" in linked  # the NeXus file the worker writes beside the seed's layout
    assert linked == _files(ctx.out_dir) - {"manifest.json"}  # the manifest comes after the handler, listing the page
    manifest = json.loads((ctx.out_dir / "manifest.json").read_text())
    ref = manifest["outputs"]["report"]
    assert ref["path"] == Path(page).relative_to(vol).as_posix()
    assert ref["sha256"] == hashlib.sha256(Path(page).read_bytes()).hexdigest()
    assert {Path(p).relative_to(ctx.out_dir).as_posix() for k, p in ctx.outputs.items() if k != "report"} <= linked
    text = Path(page).read_text()
    assert "stem-polar job sp-report" in text and "quality checks passed" in text
    assert len(_images(Path(page))) == len(list(ctx.out_dir.rglob("*.png"))) + 4
