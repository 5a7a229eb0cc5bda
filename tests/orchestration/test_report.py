"""The run report (issue 21 item 2): one self-contained HTML page per run, live while the run collects.

A small diffuse run is built with the services' own Python APIs (synthetic stills on the Ewald sphere, the
voxel-merger's per-still accumulation, its merge and the scaler's relative scaling) in the volume layout the flows
write (runs/<run>/config.json, stills/<stem>.json, jobs/<service>/<job>/...). The page is rendered by headless
Chromium (Debian's ``chromium``) and its screenshot checked for figures; every local link must resolve.
"""
from __future__ import annotations

import base64
import html.parser
import io
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CELL = (40.0, 40.0, 60.0, 90.0, 90.0, 90.0)
SG = "P 43 21 2"
RUN = "trun"
CHROMIUM = "/usr/bin/chromium"


def _truth(h, k, l):
    """A smooth diffuse-like intensity with the Laue symmetry of P 4/mmm (even in h, k, l; h <-> k)."""
    r2 = (h * h + k * k + (l / 1.5) ** 2) / 25.0
    return 20.0 + 10.0 * np.cos(np.pi * h) * np.cos(np.pi * k) + 30.0 * np.exp(-r2)


def _still_record(i: int, status: str = "ok") -> dict:
    rec = {"image": f"incoming/{RUN}/still_{i:04d}.cbf", "status": status, "reason": "", "strategy": "default",
           "n_spots": 150 + i, "n_indexed": 140 + i,
           "stage_seconds": {"stills-processor": 10.0 + i, "diffuse-extractor": 2.0, "voxel-merger": 1.5}}
    if status == "ok":
        rec.update(diffuse={"path": f"jobs/diffuse-extractor/{RUN}.extract.still_{i:04d}/still_{i:04d}_0000.h5"},
                   partial={"path": f"jobs/voxel-merger/{RUN}.accumulate.still_{i:04d}/partial.h5"})
    else:
        rec["reason"] = "too few spots to index (12 found)"
        rec["stage_seconds"] = {"stills-processor": 4.0}
    rec["seconds"] = round(sum(rec["stage_seconds"].values()), 2)
    return rec


def add_still(volume: Path, i: int, grid, status: str = "ok") -> dict:
    """One still through the voxel-merger's accumulation, recorded as the diffuse-still flow records it."""
    from voxel_merger.artifacts import write_still
    from voxel_merger.pipeline import MergeOptions, accumulate_one
    from voxel_merger.synthetic import synthetic_still

    rec = _still_record(i, status)
    if status == "ok":
        rng = np.random.default_rng(100 + i)
        s = synthetic_still(f"still_{i:04d}.cbf#0", CELL, _truth, rng, space_group=SG, n_side=90, pixel=0.8,
                            sigma0=2.0, scale=float(np.exp(0.2 * np.sin(i))))
        table = volume / rec["diffuse"]["path"]
        table.parent.mkdir(parents=True, exist_ok=True)
        write_still(table, s.still_id, s.h, s.k, s.l, s.intensity, s.sigma, s.q_magnitude, s.crystal)
        part = volume / rec["partial"]["path"]
        part.parent.mkdir(parents=True, exist_ok=True)
        accumulate_one(table, grid, part, MergeOptions(d_min=4.0))
    from diffractflow.artifacts import atomic_write_json

    atomic_write_json(volume / "runs" / RUN / "stills" / f"still_{i:04d}.json", rec)
    return rec


def new_run(volume: Path, n_ok: int, failed: tuple[int, ...] = ()):
    from diffractflow.artifacts import atomic_write_json
    from orchestration.diffuse import DiffuseRunConfig, grid_spec
    from voxel_merger.core.grid import grid_from_spec

    cfg = DiffuseRunConfig(space_group=SG, unit_cell=list(CELL), d_min=4.0, symmetry=SG, expected_stills=8)
    rdir = volume / "runs" / RUN
    (rdir / "stills").mkdir(parents=True)
    atomic_write_json(rdir / "config.json", cfg.model_dump())
    grid = grid_from_spec(grid_spec(cfg))
    for i in range(1, n_ok + 1):
        add_still(volume, i, grid)
    for i in failed:
        add_still(volume, i, grid, status="not_indexed")
    return rdir, grid


def partials_of(rdir: Path) -> list[Path]:
    vol = rdir.parent.parent
    recs = [json.loads(p.read_text()) for p in sorted((rdir / "stills").glob("*.json"))]
    return [vol / r["partial"]["path"] for r in recs if r["status"] == "ok"]


@pytest.fixture(scope="module")
def collecting(tmp_path_factory):
    """A run still collecting: 5 stills accumulated, one not indexed, no merged map yet."""
    vol = tmp_path_factory.mktemp("collecting") / "volume"
    rdir, grid = new_run(vol, 5, failed=(6,))
    return rdir, grid


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A finished run in the layout of `process diffuse`: OUT/summary.json and copied outputs, the volume in
    OUT/.diffractflow/volume; merged by the voxel-merger (symmetry) and relatively scaled by the scaler."""
    from diffractflow.artifacts import atomic_write_json
    from orchestration.process import copy_results, run_summary_for_user
    from scaler.pipeline import run_relative
    from voxel_merger.pipeline import MergeOptions, merge_partials

    out = tmp_path_factory.mktemp("complete") / "out"
    vol = out / ".diffractflow" / "volume"
    rdir, grid = new_run(vol, 6, failed=(7,))
    odir = rdir / "output"
    parts = partials_of(rdir)
    first, _ = merge_partials(parts, vol / "jobs" / "merge.unscaled", MergeOptions(symmetry=SG))
    scaled, _ = run_relative(first["observations"], vol / "jobs" / "scale.relative", plots=False, space_group=SG)
    final, _ = merge_partials(parts, odir, MergeOptions(symmetry=SG), scales_path=scaled["scales"],
                              table_path=first["observations"])
    for p in scaled.values():
        shutil.copy2(p, odir / Path(p).name)
    atomic_write_json(odir / "run_summary.json", {
        "run_id": RUN, "stills_total": 7, "stills_processed": 6, "stills_failed": 1,
        "failed": {"incoming/trun/still_0007.cbf": "not_indexed: too few spots to index (12 found)"},
        "stage_seconds": {"merge_unscaled": 1.0, "scale_relative": 2.0, "merge_scaled": 1.0},
        "outputs": sorted(p.name for p in odir.iterdir())})
    summary = run_summary_for_user(rdir, 42.0)
    summary["files"] = copy_results(odir, out)
    summary["outputs"] = str(out)
    atomic_write_json(out / "summary.json", summary)
    return out, rdir


# ----------------------------------------------------------------------------- helpers
class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs, self.imgs, self.meta = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "meta":
            self.meta.append(a)


def parse(text: str) -> _Links:
    p = _Links()
    p.feed(text)
    return p


def assert_links_resolve(page: Path, expect_at_least: int) -> list[Path]:
    """Every link of the page is local and relative, and names an existing file."""
    p = parse(page.read_text())
    assert len(p.hrefs) >= expect_at_least
    targets = []
    for href in p.hrefs:
        u = urllib.parse.urlsplit(href)
        assert not u.scheme and not u.netloc and not href.startswith("/"), href
        t = (page.parent / urllib.parse.unquote(u.path)).resolve()
        assert t.is_file(), f"broken link {href} -> {t}"
        targets.append(t)
    # no external resources: every image is embedded
    assert p.imgs and all(s.startswith("data:image/png;base64,") for s in p.imgs)
    return targets


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)


def screenshot(page: Path, tmp: Path, size=(1300, 2200)) -> np.ndarray:
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} missing: Debian's chromium is part of the platform (make setup)"
    shot = tmp / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={size[0]},{size[1]}",
           f"--screenshot={shot}", page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"chromium wrote no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    return png_pixels(shot.read_bytes())


def colourful_fraction(rgb: np.ndarray) -> float:
    """Share of pixels with a saturated colour (figures: viridis maps, bar charts; text is grey/blue/black)."""
    mx, mn = rgb.max(axis=2), rgb.min(axis=2)
    return float(((mx - mn) > 60).mean())


# ----------------------------------------------------------------------------- live map
@pytest.mark.parametrize("symmetry", [SG, None])
def test_live_slices_equal_the_voxel_mergers_merge_of_the_same_partials(collecting, tmp_path, symmetry):
    """The live map (sums of the partials read so far) is the voxel-merger's own merge of them, unscaled."""
    from orchestration.report import live_map, map_file_planes
    from voxel_merger.pipeline import MergeOptions, merge_partials

    rdir, grid = collecting
    parts = partials_of(rdir)
    lm = live_map(parts, symmetry)
    merge_partials(parts, tmp_path, MergeOptions(symmetry=symmetry))
    ref_grid, ref = map_file_planes(tmp_path / "map.h5")
    assert ref_grid == lm.grid == grid and set(ref) == set(lm.planes) == {0, 1, 2}
    for ax in ref:
        assert np.array_equal(np.isnan(ref[ax]), np.isnan(lm.planes[ax]))
        np.testing.assert_allclose(lm.planes[ax], ref[ax], rtol=1e-9, equal_nan=True)
        assert np.isfinite(ref[ax]).sum() > 200  # the planes hold data: the comparison means something
    # a merge of fewer stills differs: the live view follows the stills landed
    fewer = live_map(parts[:2], symmetry)
    assert not np.allclose(np.nan_to_num(fewer.planes[2]), np.nan_to_num(lm.planes[2]))


def test_collecting_page_shows_status_reasons_and_live_slices(collecting, tmp_path):
    from orchestration.report import REPORT_NAME, write_report

    rdir, _ = collecting
    page = write_report(rdir)
    assert page == rdir / REPORT_NAME
    text = page.read_text()
    assert "collecting: 6/8 stills landed, 5 accumulated, 1 failed" in text
    assert "too few spots to index (12 found)" in text and "not_indexed" in text
    assert "live: 5 stills accumulated" in text
    p = parse(text)
    assert len(p.imgs) >= 2  # live slices and timings
    slices = png_pixels(base64.b64decode(p.imgs[0].split(",", 1)[1]))
    assert colourful_fraction(slices) > 0.05
    targets = assert_links_resolve(page, expect_at_least=5 * 2 + 6)
    assert sum(t.name == "partial.h5" for t in targets) == 5


# ----------------------------------------------------------------------------- finished run
def test_finished_run_page_renders_in_chromium_with_figures_and_no_broken_links(complete, tmp_path):
    from orchestration.report import locate, write_report

    out, rdir = complete
    layout = locate(out)
    assert layout.run_dir == rdir.resolve() and layout.output_dir == out.resolve()
    page = write_report(out)
    assert page == out.resolve() / "report.html"
    text = page.read_text()
    assert "complete: 6/7 stills merged" in text and "http-equiv" not in text  # no refresh once complete
    assert "merged map: scaled, merged in P 43 21 2, no outlier rejection" in text  # from the merger's stats
    p = parse(text)
    # the three slices of the merged map, radial profile, CC½ + symmetry agreement, scales, timings
    assert len(p.imgs) == 7, len(p.imgs)
    for cap in ("merged map slice h=0", "merged map slice k=0", "merged map slice l=0", "radial profile",
                "CC½ and symmetry agreement", "per-still scales", "seconds per stage"):
        assert cap in text
    # the services' own figures are embedded as they are, not drawn again
    import base64

    for name in ("slice_h0.png", "slice_k0.png", "slice_l0.png", "radial_profile.png"):
        assert f"data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}" in p.imgs, name
    targets = assert_links_resolve(page, expect_at_least=20)
    names = {t.name for t in targets}
    assert {"map.h5", "observations.h5", "scales.json", "stats.json", "config.json"} <= names
    # the per-still tables and partials on the volume are linked relative to the page (../.diffractflow/...)
    assert sum(t.name == "partial.h5" for t in targets) == 6
    rgb = screenshot(page, tmp_path)
    assert rgb.shape[0] >= 2000 and rgb.std() > 30
    assert colourful_fraction(rgb) > 0.03, colourful_fraction(rgb)
    # the figures sit in the upper part of the page: a band of it is mostly figure
    top = rgb[200:1400]
    assert colourful_fraction(top) > 0.06


def test_report_of_a_volume_run_dir_links_the_merged_outputs(complete):
    from orchestration.report import write_report

    _, rdir = complete
    page = write_report(rdir)
    assert page.parent == rdir
    names = {t.name for t in assert_links_resolve(page, expect_at_least=15)}
    assert {"map.h5", "run_summary.json", "scales.json", "slice_h0.png"} <= names


# ----------------------------------------------------------------------------- live serving
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def _raw_status(srv, path: str) -> int:
    """Status of a GET of ``path`` sent as is (no client-side normalisation of '..')."""
    import http.client

    host, port = srv.httpd.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", path)
    status = c.getresponse().status
    c.close()
    return status


def test_served_page_follows_stills_as_they_land(tmp_path):
    from orchestration.report import ReportServer

    vol = tmp_path / "volume"
    rdir, grid = new_run(vol, 3)
    with ReportServer(rdir, port=0, refresh_s=2) as srv:
        status, a = _get(urllib.parse.urljoin(srv.url, "/"))  # "/" redirects to the page
        assert status == 200 and b"3 accumulated" in a
        meta = parse(a.decode()).meta
        assert any(m.get("http-equiv") == "refresh" and m.get("content") == "2" for m in meta)
        status, again = _get(srv.url)
        assert status == 200 and srv.renders == 1  # nothing changed: cached
        add_still(vol, 4, grid)
        status, b = _get(srv.url)
        assert status == 200 and srv.renders == 2
        assert a != b and b"4 accumulated" in b and b"still_0004.cbf" in b and b"still_0004.cbf" not in a
        assert b"live: 4 stills accumulated" in b
        # the live slices changed with the new still
        img_a = parse(a.decode()).imgs[0]
        img_b = parse(b.decode()).imgs[0]
        assert img_a != img_b
        # linked files are served; anything else is not
        href = next(h for h in parse(b.decode()).hrefs if h.endswith("partial.h5"))
        status, data = _get(urllib.parse.urljoin(srv.url, href))
        target = (rdir / urllib.parse.unquote(href)).resolve()
        assert status == 200 and data == target.read_bytes()
        for raw in ("/runs/trun/../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/runs/trun/config.json%00"):
            assert _raw_status(srv, raw) == 404, raw
        secret = vol / "jobs" / "not-linked.txt"
        secret.write_text("x")
        assert _get(urllib.parse.urljoin(srv.url, "/jobs/not-linked.txt"))[0] == 404
    assert (rdir / "report.html").read_bytes() == b  # the served page is also written next to the run


# ----------------------------------------------------------------------------- command line
def test_cli_report_command_writes_the_page_and_names_bad_targets(collecting, tmp_path):
    import typer
    from typer.testing import CliRunner

    from orchestration.report import register

    app = typer.Typer()
    register(app)

    @app.command("other")  # a second command, so typer keeps `report` as a sub-command like in diffractflow
    def _other():
        pass

    rdir, _ = collecting
    r = CliRunner().invoke(app, ["report", str(rdir)])
    assert r.exit_code == 0, r.output
    assert Path(r.output.strip()) == rdir / "report.html" and (rdir / "report.html").is_file()
    # a run id is looked up in the topology's volume (--home)
    home = tmp_path / "home"
    (home / "volume" / "runs").mkdir(parents=True)
    shutil.copytree(rdir, home / "volume" / "runs" / "copied", ignore=shutil.ignore_patterns("report.html"))
    r = CliRunner().invoke(app, ["report", "copied", "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert (home / "volume" / "runs" / "copied" / "report.html").is_file()
    r = CliRunner().invoke(app, ["report", "nosuchrun", "--home", str(home)])
    assert r.exit_code == 2 and "nosuchrun" in r.output and str(home) in r.output


# ----------------------------------------------------------------------------- stem-polar job
def test_stem_polar_job_report_embeds_its_figures_and_links_its_outputs(tmp_path):
    import warnings

    from typer.testing import CliRunner

    from stem_polar.cli import app as stem_app
    from stem_polar.synthetic import make_scan

    import h5py

    scan = make_scan()
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f.create_dataset("patterns", data=scan["data"])
    np.save(tmp_path / "labels.npy", scan["labels"])
    out = tmp_path / "job"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = CliRunner().invoke(stem_app, ["run", "--data", str(tmp_path / "p.h5"), "--dset", "patterns", "--labels",
                                          str(tmp_path / "labels.npy"), "--scan-shape", "24", "24", "--out", str(out),
                                          "-q"])
    assert r.exit_code == 0, r.output
    from orchestration.report import write_report

    assert (out / "report.html").is_file()  # `stem-polar run` wrote its page itself
    (out / "report.html").unlink()
    page = write_report(out)
    assert page == out.resolve() / "report.html"
    text = page.read_text()
    run = json.loads((out / "logs" / "run.json").read_text())
    pngs = sorted(out.rglob("*.png"))
    # the job's PNGs, plus |E|, the field direction, the cluster map and the confidence drawn from its TIFF maps
    assert len(parse(text).imgs) == len(pngs) + 4 and len(pngs) >= 4
    for check in run["report"]["quality"]["checks"]:
        assert check in text
    targets = assert_links_resolve(page, expect_at_least=len(run["outputs"]))
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "report.html"}
    assert {t.relative_to(out.resolve()).as_posix() for t in targets} == on_disk >= set(run["outputs"])
    # a stem-polar demo directory (dataset/ and result/) is reported as its result job
    demo = tmp_path / "demo"
    shutil.copytree(out, demo / "result")
    assert write_report(demo) == (demo / "result" / "report.html").resolve()


# ----------------------------------------------------------------------------- background profiles
def test_background_profiles_are_the_extractors_and_are_plotted(tmp_path):
    """A still table written by the diffuse-extractor itself (synthetic two-panel still): the page plots its
    isotropic background profile, the one the extractor's own reader returns."""
    from diffractflow.artifacts import atomic_write_json
    from diffuse_extractor import ExtractionParams, extract_still, synthetic
    from diffuse_extractor.artifacts import read_still, write_still

    from orchestration.report import _background_profiles, locate, write_report

    s = synthetic.render(synthetic.make_experiment())
    res = extract_still(s.experiment, s.data, s.reflections, params=ExtractionParams(beamstop="none"))
    vol = tmp_path / "volume"
    rel = "jobs/diffuse-extractor/r.extract.still_0001/still_0001_0000.h5"
    (vol / rel).parent.mkdir(parents=True)
    write_still(vol / rel, res, s.experiment, parameters={}, inputs={})
    rdir = vol / "runs" / "r"
    rec = {"image": "incoming/r/still_0001.cbf", "status": "failed", "reason": "voxel-merger job failed: test",
           "diffuse": {"path": rel}, "stage_seconds": {"diffuse-extractor": 1.0}}
    atomic_write_json(rdir / "stills" / "still_0001.json", rec)
    layout = locate(rdir)
    prof = _background_profiles(layout, [rec])
    expected = read_still(vol / rel)["background_profile"]
    assert list(prof) == ["still_0001"] and np.isfinite(expected[:, 1]).sum() > 5
    np.testing.assert_array_equal(prof["still_0001"], expected)
    text = write_report(rdir).read_text()
    assert "isotropic background estimate" in text and "voxel-merger job failed: test" in text
    assert "no still accumulated yet" in text
    assert len(parse(text).imgs) == 2  # background profile and timings


def test_an_out_directory_of_a_run_still_collecting_finds_its_run(collecting, tmp_path):
    """`report OUT` during `process diffuse --out OUT` (no summary.json yet): the run in OUT/.diffractflow."""
    from orchestration.report import ReportError, locate

    rdir, _ = collecting
    runs = tmp_path / "out" / ".diffractflow" / "volume" / "runs"
    shutil.copytree(rdir, runs / "a", ignore=shutil.ignore_patterns("report.html"))
    layout = locate(tmp_path / "out")
    assert layout.run_dir == (runs / "a").resolve() and layout.volume == runs.parent.resolve()
    shutil.copytree(rdir, runs / "b", ignore=shutil.ignore_patterns("report.html"))
    with pytest.raises(ReportError, match=r"2 runs .*\(a, b\)"):
        locate(tmp_path / "out")
    with pytest.raises(ReportError, match="not a run directory"):
        locate(tmp_path)


# ----------------------------------------------------------------------------- figures drawn ahead
def test_still_figures_drawn_ahead_are_the_final_pages_and_redrawn_when_records_change(complete, monkeypatch):
    """`process` draws the per-still figures while the end-of-run stages run (predraw_still_figures); the final page
    of the out directory embeds exactly those, without drawing them again; a changed record is drawn anew."""
    from orchestration import report

    out, rdir = complete
    report._STILL_FIGURES.clear()
    drawn = []
    draw = report._draw_timings
    monkeypatch.setattr(report, "_draw_timings", lambda rows: drawn.append(len(rows)) or draw(rows))
    report.predraw_still_figures(report.locate(rdir))
    assert drawn == [7]
    ahead = [png for key, png in report._STILL_FIGURES.items() if key[0] == "timings"]
    assert len(ahead) == 1 and ahead[0]
    page = report.write_report(out, home=out / ".diffractflow").read_text()
    assert drawn == [7]  # not drawn again
    assert f"data:image/png;base64,{ahead[0]}" in page
    rec_path = sorted((rdir / "stills").glob("*.json"))[0]
    rec = json.loads(rec_path.read_text())
    try:
        rec["stage_seconds"]["voxel-merger"] += 1.0
        rec_path.write_text(json.dumps(rec))
        page2 = report.write_report(out, home=out / ".diffractflow").read_text()
    finally:
        rec["stage_seconds"]["voxel-merger"] -= 1.0
        rec_path.write_text(json.dumps(rec))
    assert drawn == [7, 7] and f"data:image/png;base64,{ahead[0]}" not in page2
