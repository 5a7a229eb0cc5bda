"""Diagnostic PNGs of one still (the seed's visual checks) and a text summary of an artifact."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffractflow.artifacts import atomic_write_path

from .core.masks import MaskBit


def radial_profile(q: np.ndarray, intensity: np.ndarray, n_bins: int = 200):
    """Mean corrected intensity per |q| bin: (bin centres 1/A, mean, count)."""
    if q.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, int)
    edges = np.linspace(0.0, float(q.max()) * 1.0001, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, q, side="right") - 1, 0, n_bins - 1)
    cnt = np.bincount(idx, minlength=n_bins)
    s = np.bincount(idx, intensity.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / cnt
    return 0.5 * (edges[1:] + edges[:-1]), mean, cnt


def write_pngs(out_dir: str | Path, raw: list[np.ndarray], flags: list[np.ndarray], table: dict,
               stem: str = "still") -> dict[str, Path]:
    """raw image, mask bits, corrected image and radial profile as PNGs; returns name -> path."""
    # matplotlib (~0.5 s): only PNGs need it, not an extraction or the CLI's start
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"), hence here
    from matplotlib.colors import ListedColormap  # noqa: I001 - with pyplot, for the same reason

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(raw)
    paths = {}

    def save(fig, name):
        p = out_dir / f"{stem}_{name}.png"
        with atomic_write_path(p) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        plt.close(fig)
        paths[name] = p

    def grid(title):
        cols = min(n, 4)
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 4.5 * rows), squeeze=False)
        fig.suptitle(title)
        for ax in axes.ravel()[n:]:
            ax.axis("off")
        return fig, axes.ravel()

    # raw
    good = np.concatenate([r[f == 0].ravel() for r, f in zip(raw, flags)]) if n else np.zeros(1)
    vmax = float(np.percentile(good, 99)) if good.size else 1.0
    fig, axes = grid("raw counts (99th percentile scale)")
    for i in range(n):
        im = axes[i].imshow(np.clip(raw[i], 0, None), cmap="gray_r", vmin=0, vmax=vmax, interpolation="nearest")
        axes[i].set_title(f"panel {i}")
    fig.colorbar(im, ax=list(axes[:n]), shrink=0.6)
    save(fig, "raw")
    # masks: one colour per highest bit
    colours = ["white", "black", "red", "orange", "magenta", "cyan", "yellow", "blue", "lightgrey"]
    cmap = ListedColormap(colours)
    fig, axes = grid("masks: " + ", ".join(f"{c}={b.name}" for c, b in zip(colours[1:], MaskBit)))
    for i in range(n):
        code = np.zeros(flags[i].shape, np.uint8)
        for j, b in enumerate(MaskBit):
            code[(flags[i] & np.uint8(b)) != 0] = j + 1
        axes[i].imshow(code, cmap=cmap, vmin=0, vmax=len(colours) - 1, interpolation="nearest")
        axes[i].set_title(f"panel {i}: {100 * (flags[i] != 0).mean():.1f}% masked")
    save(fig, "masks")
    # corrected
    ci = []
    for i in range(n):
        img = np.full(flags[i].shape, np.nan, np.float32)
        sel = table["panel"] == i
        img[table["y"][sel], table["x"][sel]] = table["intensity"][sel]
        ci.append(img)
    allc = table["intensity"]
    cmax = float(np.percentile(allc, 99)) if allc.size else 1.0
    fig, axes = grid("corrected intensity (masked = grey)")
    for i in range(n):
        cm = plt.get_cmap("viridis").copy()
        cm.set_bad("0.6")
        im = axes[i].imshow(np.ma.masked_invalid(ci[i]), cmap=cm, vmin=0, vmax=cmax, interpolation="nearest")
    fig.colorbar(im, ax=list(axes[:n]), shrink=0.6)
    save(fig, "corrected")
    # radial profile
    qc, mean, cnt = radial_profile(table["q"], table["intensity"])
    _, mraw, _ = radial_profile(table["q"], table["raw"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = cnt > 0
    ax.plot(qc[ok], mean[ok], label="corrected")
    ax.plot(qc[ok], mraw[ok], label="raw", alpha=0.7)
    ax.set_xlabel("|q| = 1/d (1/angstrom)")
    ax.set_ylabel("mean intensity per pixel")
    ax.legend()
    ax.set_title("radial profile of unmasked pixels")
    save(fig, "radial")
    return paths


def summarise(artifact: dict) -> str:
    """Human-readable summary of a read artifact (``artifacts.read_still``)."""
    px = artifact["pixels"]
    info = artifact["info"]
    prov = artifact["provenance"]
    lines = [
        f"schema {prov.get('schema')} v{prov.get('schema_version')} by {prov.get('producer')} "
        f"{prov.get('producer_version')} at {prov.get('created')}",
        f"image {artifact['attrs'].get('image_path')} [{artifact['attrs'].get('image_index')}]",
        f"pixels used {len(px['intensity'])} of {info.get('n_pixels_total')}",
    ]
    for b in MaskBit:
        lines.append(f"  masked {b.name.lower():9s} {info.get('n_masked_' + b.name.lower(), 0)}")
    if len(px["intensity"]):
        for c in ("q", "intensity", "sigma", "polarisation", "lorentz", "efficiency", "solid_angle", "air", "correction"):
            if c in px:
                v = px[c]
                lines.append(f"  {c:12s} min {np.nanmin(v):.4g}  median {np.nanmedian(v):.4g}  max {np.nanmax(v):.4g}")
        finite = all(np.isfinite(px[c]).all() for c in ("intensity", "sigma", "q"))
        lines.append(f"  all finite: {finite}")
    if "crystal" in artifact:
        lines.append(f"crystal {artifact['crystal']['space_group']} cell "
                     + " ".join(f"{v:.2f}" for v in artifact["crystal"]["unit_cell"]))
    return "\n".join(lines)
