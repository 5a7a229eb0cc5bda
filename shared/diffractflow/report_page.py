"""One self-contained HTML page per run or job: the pieces every report uses, and the page of a service job.

A page is a title, a status line and sections of HTML; figures are PNGs embedded as base64 (no external JS, CSS or
images), and links point to local files relative to the page, so the page can be opened from the file system,
copied with its directory, or served. :func:`check_links` tells whether a written page keeps those promises.

The diffuse-run page is built from these pieces in ``orchestration.report``; a service job that writes its run
description to ``logs/run.json`` (stem-polar does) gets its page from :func:`write_job_report`, which the service's
worker and CLI call themselves (services do not import orchestration).
"""
from __future__ import annotations

import base64
import datetime as _dt
import functools
import html
import html.parser
import importlib.metadata as md
import io
import json
import os
import platform
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .artifacts import atomic_write_path


REPORT_NAME = "report.html"


# ============================================================================ page model
@dataclass
class Page:
    """What a page shows; ``links`` holds every local file it links to (absolute paths); ``refresh_s``: the page
    reloads itself that often (a run still collecting), None for a finished page."""

    title: str
    status: str
    sections: list[str] = field(default_factory=list)
    links: set[Path] = field(default_factory=set)
    refresh_s: float | None = None


class Linker:
    """Makes ``<a>`` elements to local files, relative to the page's directory, and records them in the page."""

    def __init__(self, page: Page, page_dir: Path):
        self.page, self.page_dir = page, Path(page_dir)

    def __call__(self, path: Path | None, label: str | None = None) -> str:
        """An <a> to a local file relative to the page, or the plain label when the file does not exist."""
        if path is None:
            return esc(label or "–")
        path = Path(path)
        if not path.is_file():
            return esc(label or path.name)
        self.page.links.add(path.resolve())
        rel = os.path.relpath(path.resolve(), self.page_dir.resolve())
        return f'<a href="{esc(urllib.parse.quote(Path(rel).as_posix()))}">{esc(label or path.name)}</a>'


# ============================================================================ small HTML pieces
def esc(x) -> str:
    """HTML-escaped text of ``x`` ("" for None)."""
    return html.escape("" if x is None else str(x))


def fmt(v, nd: int = 3) -> str:
    """A number for a table cell: ``nd`` significant digits, large values without decimals, "–" for None."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table of already-escaped HTML cells under an escaped header."""
    th = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def kv_table(d: dict) -> str:
    """A key/value table (lists and mappings shown as JSON)."""
    return table(["key", "value"], ([esc(k), esc(json.dumps(v) if isinstance(v, (list, dict)) else v)]
                                    for k, v in d.items()), "kv")


def img(b64: str | None, caption: str, legend_html: str = "") -> str:
    """A figure with an embedded PNG (base64), its caption and an optional legend (HTML); "" without an image."""
    if not b64:
        return ""
    legend = f"<div class=legend>{legend_html}</div>" if legend_html else ""
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}">'
            f'<figcaption>{esc(caption)}</figcaption>{legend}</figure>')


def img_file(path: Path, caption: str) -> str:
    """A figure embedding a PNG file as it is."""
    return img(base64.b64encode(Path(path).read_bytes()).decode(), caption)


# ============================================================================ figures
def figure(w: float, h: float):
    """A matplotlib figure (inches) without pyplot: no global state, safe in a server's threads."""
    from matplotlib.figure import Figure  # matplotlib (~0.5 s) only when a page draws a figure

    return Figure(figsize=(w, h))


def png_b64(fig, dpi: int = 90) -> str:
    """The figure as base64 PNG text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib only when a page draws a figure

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def warm_up_figures() -> None:
    """Pay matplotlib's one-time costs (pyplot with the Agg backend, the font cache, text layout, the PNG writer)
    once, when a worker starts: a service's first figure costs ~1 CPU-s more than the next ones, and with a
    long-running worker that first figure would fall in a user's run (at the end of it, where nothing overlaps)."""
    import matplotlib  # heavy: the whole point is to import it here, at the worker's start

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    fig, ax = plt.subplots(figsize=(2, 2), dpi=50)
    im = ax.imshow(np.arange(16.0).reshape(4, 4), cmap="viridis")
    ax.plot([0, 1], [0, 1], ".-")
    ax.set_xlabel("h")
    ax.set_ylabel("1/Å")
    ax.set_title("warm-up")
    fig.colorbar(im, ax=ax, label="intensity")
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def map_png(a: np.ndarray, cmap: str = "viridis", discrete: bool = False, label: str = "",
            min_px: int = 256) -> tuple[str, str]:
    """A 2-D map (scan rows down, as stored) as a base64 PNG without axes, and its legend as HTML.

    Pixels are repeated so the image is at least ``min_px`` wide; non-finite values are grey. ``discrete``: one
    colour per integer class (legend: a swatch per class); else the colour map over the 1st-99th percentile
    (legend: a colour bar with its range and ``label``). Written with Pillow, no figure: a few ms per map, where a
    matplotlib figure with axes costs a quarter of a second."""
    # matplotlib (colour maps) and Pillow only when a page has a map
    import matplotlib
    from PIL import Image

    a = np.asarray(a, dtype=float)
    ok = np.isfinite(a)
    rgba = np.empty(a.shape + (4,))
    if discrete:
        classes = np.unique(a[ok])
        base = matplotlib.colormaps["tab10" if classes.size <= 10 else "tab20"]
        idx = np.searchsorted(classes, np.where(ok, a, classes[0] if classes.size else 0))
        rgba[:] = np.asarray([base(k % base.N) for k in range(max(classes.size, 1))])[idx]
        legend = " ".join(
            f'<span style="display:inline-block;width:.9em;height:.9em;vertical-align:middle;background:'
            f'{matplotlib.colors.to_hex(base(k % base.N))}"></span> {esc(_num(c))}' for k, c in enumerate(classes))
    else:
        finite = a[ok]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        if vmax <= vmin:
            vmax = vmin + 1.0
        cm = matplotlib.colormaps[cmap]
        rgba[:] = cm(np.clip((np.where(ok, a, vmin) - vmin) / (vmax - vmin), 0.0, 1.0))
        stops = ",".join(matplotlib.colors.to_hex(cm(x)) for x in np.linspace(0, 1, 9))
        legend = (f'{esc(_num(vmin))} <span style="display:inline-block;width:10em;height:.9em;vertical-align:middle;'
                  f'background:linear-gradient(to right,{stops})"></span> {esc(_num(vmax))}')
    if label:
        legend += f" &nbsp;{esc(label)}"
    rgba[~ok] = (0.85, 0.85, 0.85, 1.0)
    k = max(1, -(-min_px // max(max(a.shape), 1)))
    big = np.repeat(np.repeat((rgba * 255).round().astype(np.uint8), k, axis=0), k, axis=1)
    buf = io.BytesIO()
    Image.fromarray(big, "RGBA").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode(), legend


def _num(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() and abs(v) < 1e9 else f"{v:.3g}"


# ============================================================================ versions
DEFAULT_PACKAGES = ("diffractflow", "numpy", "h5py", "matplotlib")


@functools.lru_cache(maxsize=8)
def software_versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Python's and the installed distributions' versions (those of ``packages`` that are installed)."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# ============================================================================ rendering
CSS = """
body{font-family:sans-serif;margin:1.2em 2em;color:#222;max-width:1400px}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.4em}
table{border-collapse:collapse;font-size:.85em;margin:.4em 0} th,td{border:1px solid #ddd;padding:2px 6px;
text-align:left;vertical-align:top} th{background:#f2f2f2} table.kv td:first-child{font-weight:bold}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;border:1px solid #eee;padding:4px}
figure img{max-width:100%} figcaption,.legend{font-size:.8em;color:#555}
.status{font-size:1em;padding:4px 8px;background:#eef;display:inline-block}
.st-ok{color:#070} .st-failed,.st-validation_failed,.st-not_indexed{color:#b00} .warn{color:#b00}
.foot{font-size:.75em;color:#777;margin-top:2em}
"""


def render_html(page: Page, generator: str = "diffractflow report") -> str:
    """The page as one HTML document (inline CSS; a refresh meta tag when ``page.refresh_s`` is set)."""
    refresh = (f'<meta http-equiv="refresh" content="{max(1, int(round(page.refresh_s)))}">'
               if page.refresh_s else "")
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    live = " (refreshes every %d s while the run collects)" % round(page.refresh_s) if page.refresh_s else ""
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{esc(page.title)}</title>{refresh}<style>{CSS}</style></head><body>"
            f"<h1>{esc(page.title)}</h1><div class=status>{esc(page.status)}</div>"
            + "".join(page.sections)
            + f"<div class=foot>{esc(generator)}, generated {now}{esc(live)}</div></body></html>\n")


def write_page(page: Page, path: Path) -> Path:
    """Write the page atomically (readers never see half a page); returns ``path``."""
    path = Path(path)
    with atomic_write_path(path) as tmp:
        Path(tmp).write_text(render_html(page), encoding="utf-8")
    return path


class _Refs(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a" and "href" in a:
            self.hrefs.append(a["href"] or "")
        if tag in ("img", "script", "iframe") and "src" in a:
            self.srcs.append(a["src"] or "")
        if tag == "link" and "href" in a:
            self.srcs.append(a["href"] or "")


def page_refs(page_path: Path) -> tuple[list[str], list[str]]:
    """(link targets, embedded-resource sources) of a written page."""
    p = _Refs()
    p.feed(Path(page_path).read_text(encoding="utf-8"))
    return p.hrefs, p.srcs


def check_links(page_path: Path) -> list[str]:
    """What breaks a page's promises, one line each (empty: none): a link that is not a relative local path or
    names no existing file, and a resource (image, script, style) that is not embedded."""
    page_path = Path(page_path)
    hrefs, srcs = page_refs(page_path)
    bad = []
    for href in hrefs:
        u = urllib.parse.urlsplit(href)
        if u.scheme or u.netloc or href.startswith("/"):
            bad.append(f"{href}: not a relative local link")
            continue
        target = page_path.parent / urllib.parse.unquote(u.path)
        if not target.is_file():
            bad.append(f"{href}: no such file ({target})")
    bad += [f"{s[:60]}: not embedded" for s in srcs if not s.startswith("data:")]
    return bad


# ============================================================================ a service job's page
#: what to draw from a service's output maps: (file relative to the job directory, caption, colour-bar label,
#: colour map, discrete classes). Maps a job did not write are left out.
JOB_MAPS: dict[str, list[tuple[str, str, str, str, bool]]] = {
    "stem-polar": [
        ("realspace/E_mag.tif", "field magnitude |E|", "|E| (units: see the configuration)", "magma", False),
        ("realspace/E_angle.tif", "field direction atan2(Ey, Ex)", "degrees", "twilight", False),
        ("realspace/S_argmax.tif", "cluster map (argmax of the matched-filter scores S)", "cluster ids", "", True),
        ("realspace/S_confidence.tif", "cluster assignment confidence", "softmax confidence", "viridis", False),
    ],
}

#: distributions whose versions a service job's page lists, by service
JOB_PACKAGES: dict[str, tuple[str, ...]] = {
    "stem-polar": ("diffractflow", "numpy", "scipy", "h5py", "numba", "tifffile", "matplotlib"),
}

_FILE_KINDS = {".png": "figure", ".h5": "HDF5 / NeXus", ".nxs": "NeXus", ".json": "JSON", ".tif": "TIFF map",
               ".npy": "numpy array", ".yaml": "configuration", ".txt": "text"}


def _read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def _read_map(path: Path) -> np.ndarray | None:
    try:
        import tifffile  # only for pages with maps (stem-polar)

        a = np.asarray(tifffile.imread(path))
    except Exception:  # noqa: BLE001 - a map that cannot be read is left out of the page, not fatal
        return None
    return a if a.ndim == 2 else None


def job_page(job_dir: Path) -> Page:
    """The page of a service job directory holding ``logs/run.json`` (service, version, config, report with its
    quality checks and warnings, timings, outputs): what ran, the checks and warnings, the gate diagnostics, the
    job's PNG figures and maps drawn from its outputs, timings, configuration, versions and links to every file.

    Raises FileNotFoundError naming the file when ``logs/run.json`` is absent or unreadable."""
    d = Path(job_dir).resolve()
    run_file = d / "logs" / "run.json"
    run = _read_json(run_file)
    if not isinstance(run, dict):
        raise FileNotFoundError(f"{run_file}: no readable run description (a job directory has logs/run.json)")
    service = str(run.get("service") or "job")
    rep = run.get("report") or {}
    q = rep.get("quality") or {}
    failed = list(q.get("failed") or [])
    warnings_ = list(rep.get("warnings") or [])
    status = ("quality checks failed: " + ", ".join(failed) if failed else
              "quality checks passed" if q else "done")
    if warnings_:
        status += f"; {len(warnings_)} warning{'s' if len(warnings_) > 1 else ''}"
    page = Page(title=f"{service} job {run.get('job_id') or d.name}", status=status)
    link = Linker(page, d)
    S = page.sections

    # --- what ran
    head = {"service": service, "version": run.get("version"), "job": run.get("job_id") or d.name}
    for k in ("scan_shape", "frame_shape", "n_frames", "dtype", "device"):
        if k in rep:
            head[k] = rep[k]
    if run.get("data_gb") is not None:
        head["data (GB)"] = round(float(run["data_gb"]), 4)
    c = rep.get("center") or {}
    if "y" in c and "x" in c:
        head["beam centre (y, x) px"] = f"{c['y']:.2f}, {c['x']:.2f} ({c.get('method', '')})"
    conf = rep.get("confidence") or {}
    if conf.get("mean") is not None:
        head["mean confidence"] = f"{conf['mean']:.3f} ({conf.get('note', '')})"
    if (rep.get("engine") or {}).get("path"):
        head["engine"] = json.dumps(rep["engine"])
    for k in ("wall_time_s", "command"):
        if run.get(k) is not None:
            head[k] = round(run[k], 3) if isinstance(run[k], float) else run[k]
    S.append("<h2>Summary</h2>" + kv_table(head))

    # --- checks and warnings
    checks = q.get("checks") or {}
    if checks:
        rows = []
        for name, chk in checks.items():
            chk = chk if isinstance(chk, dict) else {"value": chk}
            ok = name not in failed and chk.get("ok", True) is not False
            rows.append([esc(name), f'<span class="st-{"ok" if ok else "failed"}">{"ok" if ok else "failed"}</span>',
                         esc(chk.get("message", "")),
                         esc(json.dumps({k: v for k, v in chk.items() if k not in ("ok", "passed", "message")}))])
        S.append("<h2>Quality checks</h2>" + table(["check", "result", "message", "details"], rows))
    S.append("<h2>Warnings</h2>" + ("<ul>" + "".join(f"<li class=warn>{esc(w)}</li>" for w in warnings_) + "</ul>"
                                    if warnings_ else "<p>none</p>"))
    gates = rep.get("gate_coverage") or {}
    if gates:
        rows = [[esc(cid), f'<span class="st-{"ok" if g.get("ok", True) else "failed"}">'
                 f'{"ok" if g.get("ok", True) else "weak"}</span>', esc(fmt(g.get("coverage"))),
                 esc(fmt(g.get("support"))), esc(fmt(g.get("signal_captured"))), esc(fmt(g.get("max_overlap"))),
                 esc(fmt((conf.get("per_cluster_mean") or {}).get(str(cid)))), esc(g.get("status", ""))]
                for cid, g in gates.items()]
        skipped = (rep.get("clusters") or {}).get("skipped") or []
        S.append("<h2>Gates per cluster</h2>"
                 + table(["cluster", "gate", "coverage", "support", "signal captured", "max overlap",
                          "mean confidence", "diagnosis"], rows)
                 + ("<p class=warn>skipped clusters: " + esc("; ".join(f"{s.get('id')}: {s.get('reason')}"
                                                                       for s in skipped)) + "</p>" if skipped else ""))

    # --- figures: the job's own PNGs, then maps drawn from its outputs
    figs = []
    for p in sorted((d / "figures").glob("*.png")) + sorted((d / "kspace").glob("*.png")):
        figs.append(img_file(p, p.relative_to(d).as_posix()))
    for rel, caption, label, cmap, discrete in JOB_MAPS.get(service, []):
        a = _read_map(d / rel)
        if a is not None:
            b64, legend = map_png(a, cmap or "viridis", discrete, label)
            figs.append(img(b64, f"{caption} ({rel})", legend))
    S.append("<h2>Figures</h2>" + ("<div class=figs>" + "".join(figs) + "</div>" if figs else "<p>none</p>"))

    # --- timings, configuration, inputs, versions
    if run.get("timings_s"):
        S.append("<h2>Timings</h2>" + table(["stage", "seconds"], ([esc(k), esc(fmt(v))]
                                                                 for k, v in run["timings_s"].items())))
    if run.get("config"):
        S.append("<h2>Configuration</h2>" + kv_table(run["config"]))
    if run.get("inputs"):
        S.append("<h2>Inputs</h2>" + kv_table(run["inputs"]))
    versions = {**software_versions(JOB_PACKAGES.get(service, DEFAULT_PACKAGES)),
                f"{service} (the job's)": run.get("version")}
    S.append("<h2>Versions</h2>" + kv_table(versions))

    # --- every file of the job
    rows = []
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        if p.name == REPORT_NAME or any(part.startswith(".") for part in p.relative_to(d).parts):
            continue
        rows.append([link(p, p.relative_to(d).as_posix()), esc(_FILE_KINDS.get(p.suffix, "")),
                     esc(f"{p.stat().st_size / 1e6:.3f} MB")])
    S.append("<h2>Files</h2>" + table(["file", "what", "size"], rows))
    return page


def write_job_report(job_dir: Path) -> Path:
    """Write ``report.html`` into a service job directory (see :func:`job_page`); returns its path."""
    d = Path(job_dir)
    return write_page(job_page(d), d / REPORT_NAME)
